"""Small synthetic image-caption datasets in the COCO Karpathy format, for tests and benchmarks.

Each image shows one or two drawn shapes (kind, colour, size, position) on a plain background; its
captions describe them in a few phrasings. Everything is drawn from `seed`: the same arguments give
byte-identical files.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (140, 60, 170), "orange": (240, 140, 30)}
KINDS = ("circle", "square", "triangle")
SIZES = {"small": 0.18, "large": 0.34}  # half-width as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "centre": (0.5, 0.5)}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (20, 20, 20)}
TEMPLATES = (
    "a {size} {colour} {kind} on the {position}",
    "a {colour} {kind}, {size}, at the {position} of the picture",
    "there is a {size} {kind} coloured {colour} in the {position}",
    "{position}: one {colour} {kind} of {size} size",
    "a picture with a {colour} {kind} near the {position}",
)
SPLIT_NAMES = ("train", "restval", "val", "test")


def _draw(draw: ImageDraw.ImageDraw, side: int, kind: str, colour: str, size: str, position: str) -> None:
    cx, cy = (c * side for c in POSITIONS[position])
    r = SIZES[size] * side
    box = (cx - r, cy - r, cx + r, cy + r)
    fill = COLOURS[colour]
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def make_shapes_dataset(root: str | Path, splits: dict[str, int] | None = None, captions_per_image: int = 3,
                        image_size: int = 48, seed: int = 0) -> Path:
    """Write images under root/images/ and root/dataset_coco.json; returns the annotation file.

    `splits` maps Karpathy split names (train, restval, val, test) to image counts.
    """
    splits = {"train": 24, "restval": 4, "val": 4, "test": 8} if splits is None else splits
    for name in splits:
        if name not in SPLIT_NAMES:
            raise ValueError(f"split {name!r} is not one of {', '.join(SPLIT_NAMES)}")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in 1..{len(TEMPLATES)}")
    rng = random.Random(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, sent_id = [], 0
    for split, count in splits.items():
        for _ in range(count):
            img_id = len(images)
            background = rng.choice(list(BACKGROUNDS))
            picture = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
            draw = ImageDraw.Draw(picture)
            # One or two shapes in distinct positions; captions describe the first (largest drawn last).
            positions = rng.sample(list(POSITIONS), k=rng.choice((1, 2)))
            shapes = [dict(kind=rng.choice(KINDS), colour=rng.choice(list(COLOURS)), size=rng.choice(list(SIZES)),
                           position=p) for p in positions]
            for shape in reversed(shapes):
                _draw(draw, image_size, **shape)
            filename = f"shapes_{img_id:06d}.jpg"
            picture.save(root / "images" / filename, quality=90)
            sentences = []
            for template in rng.sample(TEMPLATES, k=captions_per_image):
                raw = template.format(**shapes[0])
                if len(shapes) > 1:
                    raw += f" and a {shapes[1]['colour']} {shapes[1]['kind']}"
                sentences.append({"raw": raw, "tokens": raw.replace(",", "").replace(":", "").split(),
                                  "imgid": img_id, "sentid": sent_id})
                sent_id += 1
            images.append({"filepath": "images", "filename": filename, "imgid": img_id, "split": split,
                           "sentids": [s["sentid"] for s in sentences], "sentences": sentences})
    ann = root / "dataset_coco.json"
    ann.write_text(json.dumps({"dataset": "coco", "images": images}))
    return ann
