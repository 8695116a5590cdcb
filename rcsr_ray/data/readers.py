"""Readers of real image-caption datasets: the Karpathy split JSON of MS-COCO / Flickr30K, and a generic
CSV or JSONL of `image_path,caption[,split]`.

Every reader validates its annotation file before any work starts and raises `DatasetError` with
one line naming the file and what is wrong. Images are not opened here: a missing or corrupt
image, like an empty caption, is the encoder's to skip and count.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rcsr_ray.data.store import StoreError

FORMATS = ("coco", "flickr30k", "csv")
KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
# Karpathy's `restval` (COCO val images outside the 5k val/test) is training data by convention.
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "val", "test": "test"}


class DatasetError(StoreError):
    """A dataset (annotation file, image folder) that is missing or malformed; one line."""


@dataclass(frozen=True)
class ImageCaptions:
    """A dataset as the encoder sees it: images (in file order) and their captions, grouped by image."""

    root: Path  # absolute image folder; `paths` are relative to it (or absolute)
    paths: list[str]  # per image
    splits: list[str]  # per image: train / val / test
    captions: list[str]  # raw caption text (possibly empty: the encoder skips and counts those)
    caption_image: np.ndarray  # (num_captions,) int64 image index of each caption, non-decreasing
    annotations: Path  # the annotation file read

    @property
    def num_images(self) -> int:
        return len(self.paths)

    def image_file(self, i: int) -> Path:
        return self.root / self.paths[i]


def read_dataset(kind: str, root: str | Path, annotations: str | Path | None = None) -> ImageCaptions:
    """Read `kind` (coco | flickr30k | csv) with images under `root`; the annotation file defaults to
    root/dataset_coco.json or root/dataset_flickr30k.json (csv needs one: .csv or .jsonl)."""
    if kind not in FORMATS:
        raise DatasetError(f"--dataset {kind!r}: expected one of {', '.join(FORMATS)}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder does not exist")
    if annotations is None:
        if kind == "csv":
            raise DatasetError("--dataset csv needs --annotations FILE (a .csv or .jsonl of image_path,caption[,split])")
        annotations = root / KARPATHY_FILES[kind]
    ann = Path(annotations).expanduser().resolve()
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file does not exist")
    if kind == "csv":
        rows = _read_jsonl(ann) if ann.suffix.lower() in (".jsonl", ".ndjson") else _read_csv(ann)
        return _group_rows(rows, root, ann)
    return _read_karpathy(ann, root, kind)


def _split(value, where: str) -> str:
    split = SPLIT_ALIASES.get(str(value).strip().lower())
    if split is None:
        raise DatasetError(f"{where}: split {value!r} is not one of {', '.join(SPLIT_ALIASES)}")
    return split


def _read_karpathy(ann: Path, root: Path, kind: str) -> ImageCaptions:
    try:
        doc = json.loads(ann.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{ann}: not a text file (expected Karpathy-format JSON)") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{ann}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None
    images = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(images, list):
        raise DatasetError(f"{ann}: not in the Karpathy format (expected an object with an 'images' list)")
    paths, splits, captions, owner = [], [], [], []
    for i, img in enumerate(images):
        where = f"{ann}: images[{i}]"
        if not isinstance(img, dict):
            raise DatasetError(f"{where}: expected an object, got {type(img).__name__}")
        for key, typ in (("filename", str), ("split", str), ("sentences", list)):
            if not isinstance(img.get(key), typ):
                raise DatasetError(f"{where}: missing or invalid '{key}' (expected {typ.__name__})")
        if kind == "coco" and not isinstance(img.get("filepath"), str):
            raise DatasetError(f"{where}: missing 'filepath' (COCO images live in train2014/ or val2014/)")
        # Flickr30K keeps every image in one folder; COCO's `filepath` names the sub-folder.
        paths.append(str(Path(img.get("filepath", "")) / img["filename"]))
        splits.append(_split(img["split"], where))
        for j, sent in enumerate(img["sentences"]):
            raw = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(raw, str):
                raise DatasetError(f"{where}.sentences[{j}]: missing 'raw' caption text")
            captions.append(raw)
            owner.append(len(paths) - 1)
    if not paths:
        raise DatasetError(f"{ann}: the 'images' list is empty")
    return ImageCaptions(root, paths, splits, captions, np.asarray(owner, np.int64), ann)


def _read_csv(ann: Path) -> list[tuple[str, str, str | None, str]]:
    try:
        with ann.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            _check_columns(reader.fieldnames or [], ann)
            return [(r["image_path"], r["caption"], r.get("split"), f"{ann}: line {reader.line_num}")
                    for r in reader]
    except UnicodeDecodeError:
        raise DatasetError(f"{ann}: not a UTF-8 text file (expected CSV with image_path,caption[,split])") from None
    except csv.Error as exc:
        raise DatasetError(f"{ann}: malformed CSV ({exc})") from None


def _read_jsonl(ann: Path) -> list[tuple[str, str, str | None, str]]:
    rows = []
    try:
        lines = ann.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{ann}: not a UTF-8 text file (expected JSON lines)") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{ann}: line {n}: malformed JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{ann}: line {n}: expected an object with image_path, caption[, split]")
        _check_columns(list(obj), ann, f" line {n}:")
        rows.append((obj["image_path"], obj["caption"], obj.get("split"), f"{ann}: line {n}"))
    return rows


def _check_columns(columns: list[str], ann: Path, where: str = "") -> None:
    missing = [c for c in ("image_path", "caption") if c not in columns]
    if missing:
        raise DatasetError(f"{ann}:{where} missing column(s) {', '.join(missing)} "
                           f"(expected image_path,caption[,split]; found {', '.join(map(str, columns)) or 'none'})")


def _group_rows(rows, root: Path, ann: Path) -> ImageCaptions:
    """Rows of (image, caption, split) -> images in first-appearance order with their captions.
    A row without a split (no column or empty cell) is training data."""
    index: dict[str, int] = {}
    paths, splits, per_image = [], [], []
    for image, caption, split, where in rows:
        if not isinstance(image, str) or not image.strip():
            raise DatasetError(f"{where}: image_path must be a non-empty path, got {image!r}")
        if caption is not None and not isinstance(caption, str):
            raise DatasetError(f"{where}: caption must be text, got {type(caption).__name__}")
        split = _split(split, where) if split is not None and str(split).strip() else "train"
        i = index.setdefault(image, len(paths))
        if i == len(paths):
            paths.append(image)
            splits.append(split)
            per_image.append([])
        elif splits[i] != split:
            raise DatasetError(f"{where}: image {image!r} is in split {split!r} here but {splits[i]!r} earlier")
        per_image[i].append(caption or "")
    if not paths:
        raise DatasetError(f"{ann}: no rows")
    owner = np.repeat(np.arange(len(paths), dtype=np.int64), [len(c) for c in per_image])
    return ImageCaptions(root, paths, splits, [c for cs in per_image for c in cs], owner, ann)
