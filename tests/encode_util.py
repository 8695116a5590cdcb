"""A shapes dataset with the faults encode must survive: a corrupt JPEG, a missing file, an empty caption."""
from __future__ import annotations

import json
from pathlib import Path

from rcsr_ray.data.shapes import make_shapes_dataset

SPLITS = {"train": 28, "restval": 4, "val": 4, "test": 12}
CAPTIONS_PER_IMAGE = 2
CORRUPT, MISSING, EMPTY_CAPTION = 3, 7, 10  # image indices of the faults


def make_broken_dataset(root: Path) -> dict:
    """Write the dataset; returns what an encode of it must report."""
    ann = make_shapes_dataset(root, SPLITS, captions_per_image=CAPTIONS_PER_IMAGE, seed=1)
    doc = json.loads(ann.read_text())
    images = doc["images"]
    corrupt = root / images[CORRUPT]["filepath"] / images[CORRUPT]["filename"]
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # a truncated JPEG: header fine, data cut off
    (root / images[MISSING]["filepath"] / images[MISSING]["filename"]).unlink()
    images[EMPTY_CAPTION]["sentences"][1]["raw"] = "   "
    ann.write_text(json.dumps(doc))
    n_img = sum(SPLITS.values())
    return {
        "images": n_img,
        "captions": n_img * CAPTIONS_PER_IMAGE,
        "skipped_paths": {f"images/{images[i]['filename']}" for i in (CORRUPT, MISSING)},
        "empty_caption_path": f"images/{images[EMPTY_CAPTION]['filename']}",
        "encoded_images": n_img - 2,
        "encoded_captions": (n_img - 2) * CAPTIONS_PER_IMAGE - 1,
        "skipped_images": 2,
        "skipped_captions": 1,
        "dropped_captions": 2 * CAPTIONS_PER_IMAGE,
    }
