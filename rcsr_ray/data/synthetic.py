"""The embedded benchmark: paired image and caption embeddings with the structure of real CLIP features.

How an image and its captions are made (all vectors in R^dim, unit norm where it matters):
- `attributes` shared attribute directions; each of `concepts` concepts is a mix of
  `attributes_per_concept` of them (weight `attribute_weight`) and a direction of its own, so
  concepts overlap and cross-concept negatives are not trivially easy.
- an image's content u = concept direction plus an instance-specific direction (`instance_spread`).
- image embedding: u + image noise + the image side of the modality gap.
- caption embedding: u + caption noise (`caption_noise`: captions describe loosely), rotated in a
  `rotation_dim` subspace by `rotation` radians (a systematic gap that adapters can learn), plus a
  concept-dependent misalignment (`misalignment`): captions of a concept are pushed along a direction
  of that concept, itself built from the concept's attributes. Within one concept this offset is
  constant, so a client that only sees a few concepts cannot see (or learn) it: semantic skew hurts.
- `client_shift`: each client's features get a domain shift of their own, on both the image and the
  caption side (`client_shift_vectors`), applied when a client's shard is built; test data is clean.
Deterministic from `SyntheticConfig.seed`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rcsr_ray.config import SyntheticConfig
from rcsr_ray.data.store import FeatureStore, StoreError, write_store


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _directions(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    return _unit(rng.standard_normal((n, dim))).astype(np.float32)


def _mixed(rng, parts: np.ndarray, members: np.ndarray, weight: float, dim: int) -> np.ndarray:
    """Per row: unit(sqrt(w) * unit(sum of its member parts) + sqrt(1-w) * own direction)."""
    shared = _unit(parts[members].sum(axis=1))
    own = _directions(rng, len(members), dim)
    return _unit(np.sqrt(weight) * shared + np.sqrt(1 - weight) * own).astype(np.float32)


def _noise(rng: np.random.Generator, shape, scale: float) -> np.ndarray:
    # N(0, I/dim): a vector of norm ~1 before scaling.
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale / np.sqrt(shape[-1])))


def generate(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """Arrays for a feature store: image_emb, caption_emb, caption_image, split, cluster (the concept)."""
    rng = np.random.default_rng(cfg.seed)
    d, n_img, r = cfg.dim, cfg.train_images + cfg.test_images, cfg.instance_dim
    attrs = _directions(rng, cfg.attributes, d)
    members = np.stack([rng.choice(cfg.attributes, cfg.attributes_per_concept, replace=False)
                        for _ in range(cfg.concepts)])
    concept_dir = _mixed(rng, attrs, members, cfg.attribute_weight, d)
    # Captions of a concept drift toward its most similar other concept (found through shared attributes).
    sim = concept_dir @ concept_dir.T
    np.fill_diagonal(sim, -np.inf)
    drift = concept_dir[sim.argmax(1)] - concept_dir
    gap_img, gap_txt = _directions(rng, 2, d)
    # Instance detail lives in a low-dimensional subspace, as real features do: instances crowd.
    basis = np.linalg.qr(rng.standard_normal((d, r)))[0].astype(np.float32)
    rot = _plane_rotation(r, cfg.rotation).astype(np.float32)

    # Concept frequencies are uneven, as in real data.
    freq = rng.dirichlet(np.full(cfg.concepts, 5.0))
    concept = rng.choice(cfg.concepts, size=n_img, p=freq)
    detail = _directions(rng, n_img, r)
    content = _unit(np.sqrt(1 - cfg.instance_spread) * concept_dir[concept]
                    + np.sqrt(cfg.instance_spread) * detail @ basis.T).astype(np.float32)
    image_emb = _unit(content + _noise(rng, (n_img, d), cfg.image_noise) + cfg.modality_gap * gap_img)

    k = cfg.captions_per_image
    caption_image = np.repeat(np.arange(n_img), k)
    n_cap = n_img * k
    # A caption sees its image's concept and a noisy, rotated view of the instance detail.
    cap_detail = detail[caption_image] + _noise(rng, (n_cap, r), cfg.caption_noise)
    text = (np.sqrt(1 - cfg.instance_spread) * concept_dir[concept[caption_image]]
            + np.sqrt(cfg.instance_spread) * (cap_detail @ rot.T) @ basis.T)
    text += _noise(rng, (n_cap, d), cfg.image_noise)
    text += cfg.misalignment * drift[concept[caption_image]] + cfg.modality_gap * gap_txt
    caption_emb = _unit(text)

    split = np.array(["train"] * cfg.train_images + ["test"] * cfg.test_images)
    return {"image_emb": image_emb.astype(np.float32), "caption_emb": caption_emb.astype(np.float32),
            "caption_image": caption_image, "split": split, "cluster": concept}


def _plane_rotation(r: int, angle: float) -> np.ndarray:
    """A rotation by `angle` in each of the r//2 coordinate planes."""
    m = np.eye(r)
    c, s = np.cos(angle), np.sin(angle)
    for i in range(0, r - 1, 2):
        m[i, i], m[i, i + 1], m[i + 1, i], m[i + 1, i + 1] = c, -s, s, c
    return m


def client_shift_vectors(data_seed: int, client: int, dim: int, strength: float) -> tuple[np.ndarray, np.ndarray]:
    """The (image, caption) domain shift of one client, of norm `strength`; fixed by data seed and client id."""
    rng = np.random.default_rng([data_seed, 7919, client])
    shift = _directions(rng, 2, dim) * np.float32(strength)
    return shift[0], shift[1]


def config_digest(cfg: SyntheticConfig) -> str:
    return hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "rcsr-ray"


def ensure_store(cfg: SyntheticConfig, cache_dir: str | Path | None = None) -> FeatureStore:
    """The feature store of this benchmark config, generated once and then reused from the cache."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / f"synthetic-{config_digest(cfg)}"
    try:
        return FeatureStore(path)
    except (StoreError, FileNotFoundError):
        pass
    arrays = generate(cfg)
    return write_store(path, **arrays, meta={"source": "synthetic", "synthetic": asdict(cfg)})
