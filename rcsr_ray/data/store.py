"""The feature store: the one on-disk format everything downstream reads.

A folder holding
- `images.f32`, `captions.f32`: float32 row-major embeddings (numpy memmaps, opened read-only);
- `images.parquet`: one row per image: `split` (train/val/test), `cluster` (-1 if unknown), `path`;
- `captions.parquet`: one row per caption: `image` (row in images), `text`;
- `meta.json`: dim, counts, source, and free-form provenance.
Captions are stored grouped by image (all captions of image i are contiguous), so an image's
captions are a slice; `caption_offsets` gives the slices.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


class StoreError(ValueError):
    """A feature store that is missing or malformed."""


@dataclass(frozen=True)
class SplitView:
    """Images and captions of one split, with captions re-indexed to the split's images."""

    image_rows: np.ndarray  # rows of the split's images in the store
    caption_rows: np.ndarray  # rows of their captions in the store, grouped by image
    caption_image: np.ndarray  # per caption: index into image_rows
    caption_offsets: np.ndarray  # (len(image_rows)+1,) captions of image i are caption_rows[o[i]:o[i+1]]


def concat_ranges(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """np.concatenate([arange(s, e) for s, e in zip(starts, ends)]), vectorised."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    lengths = ends - starts
    offsets = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(starts, lengths) + np.arange(lengths.sum(), dtype=np.int64) - offsets


class FeatureStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise StoreError(f"{self.path}: not a feature store (no meta.json)")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as exc:
            raise StoreError(f"{meta_file}: malformed JSON ({exc.msg})") from None
        self.dim = int(self.meta["dim"])
        self.images = pd.read_parquet(self.path / "images.parquet")
        self.captions = pd.read_parquet(self.path / "captions.parquet")
        n_img, n_cap = len(self.images), len(self.captions)
        self.image_emb = self._memmap("images.f32", n_img)
        self.caption_emb = self._memmap("captions.f32", n_cap)
        cap_img = self.captions["image"].to_numpy(np.int64)
        if n_cap and (np.any(np.diff(cap_img) < 0) or cap_img[0] < 0 or cap_img[-1] >= n_img):
            raise StoreError(f"{self.path}: captions.parquet must be grouped by image with valid image rows")
        self.caption_image = cap_img
        self.caption_offsets = np.searchsorted(cap_img, np.arange(n_img + 1)).astype(np.int64)

    def _memmap(self, name: str, rows: int) -> np.ndarray:
        f = self.path / name
        expected = rows * self.dim * 4
        if not f.is_file() or f.stat().st_size != expected:
            raise StoreError(f"{f}: expected {rows} x {self.dim} float32 ({expected} bytes)")
        if rows == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.memmap(f, dtype=np.float32, mode="r", shape=(rows, self.dim))

    @property
    def has_clusters(self) -> bool:
        return bool((self.images["cluster"].to_numpy() >= 0).all())

    def split(self, name: str) -> SplitView:
        image_rows = np.flatnonzero(self.images["split"].to_numpy() == name).astype(np.int64)
        starts, ends = self.caption_offsets[image_rows], self.caption_offsets[image_rows + 1]
        counts = ends - starts
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        caption_image = np.repeat(np.arange(len(image_rows)), counts)
        return SplitView(image_rows, concat_ranges(starts, ends), caption_image.astype(np.int64), offsets)


def write_store(path: str | Path, image_emb: np.ndarray, caption_emb: np.ndarray, caption_image: np.ndarray,
                split: np.ndarray, cluster: np.ndarray | None = None, image_paths=None, caption_texts=None,
                meta: dict | None = None) -> FeatureStore:
    """Write a store atomically (to a temporary sibling folder, then renamed), captions sorted by image."""
    path = Path(path)
    image_emb = np.asarray(image_emb, np.float32)
    caption_emb = np.asarray(caption_emb, np.float32)
    caption_image = np.asarray(caption_image, np.int64)
    n_img, dim = image_emb.shape
    order = np.argsort(caption_image, kind="stable")
    images = pd.DataFrame({
        "split": np.asarray(split, dtype=object).astype(str),
        "cluster": np.full(n_img, -1, np.int64) if cluster is None else np.asarray(cluster, np.int64),
        "path": [""] * n_img if image_paths is None else list(image_paths),
    })
    captions = pd.DataFrame({
        "image": caption_image[order],
        "text": [""] * len(order) if caption_texts is None else [caption_texts[i] for i in order],
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        image_emb.tofile(tmp / "images.f32")
        caption_emb[order].tofile(tmp / "captions.f32")
        images.to_parquet(tmp / "images.parquet")
        captions.to_parquet(tmp / "captions.parquet")
        info = {"format": FORMAT_VERSION, "dim": int(dim), "num_images": int(n_img),
                "num_captions": int(len(order)), **(meta or {})}
        (tmp / "meta.json").write_text(json.dumps(info, indent=2))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureStore(path)
