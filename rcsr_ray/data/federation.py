"""From a feature store and a partition config to per-client shards.

A `Federation` is small and picklable (store path, partition indices): a Ray actor receives it and
reads its own clients' rows from the store's memmaps, so data is never shipped per round.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from rcsr_ray.config import Config, ConfigError, SyntheticConfig
from rcsr_ray.data import synthetic
from rcsr_ray.data.partition import IMAGE_ONLY, PAIRED, TEXT_ONLY, Partition, dirichlet_partition, semantic_clusters
from rcsr_ray.data.store import FeatureStore, SplitView, concat_ranges


@dataclass
class ClientShard:
    client_id: int
    modality: int  # PAIRED / IMAGE_ONLY / TEXT_ONLY (partition.py)
    # (n, d) float32 features, or (n, 3, S, S) pixels in full-backbone mode (uint8 where they can be);
    # (n, 0) for a text-only client: it holds the images' captions and never looks at the images
    # themselves, which in full-backbone mode would mean decoding them for nothing
    image_emb: np.ndarray
    caption_emb: np.ndarray  # (m, d) float32, grouped by image
    caption_offsets: np.ndarray  # (n+1,) captions of image i are rows o[i]:o[i+1]
    clusters: np.ndarray  # (n,) semantic cluster of each image

    @property
    def num_images(self) -> int:
        return len(self.image_emb)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.image_emb, self.caption_emb, self.caption_offsets, self.clusters))

    @property
    def has_image(self) -> bool:
        return self.modality != TEXT_ONLY

    @property
    def has_text(self) -> bool:
        return self.modality != IMAGE_ONLY


@dataclass
class Federation:
    store_path: str
    partition: Partition
    train: SplitView
    # The embedded benchmark the store was generated from (None: real data): its seed and
    # client_shift give each client's domain shift, and a node without the store regenerates it.
    synthetic: SyntheticConfig | None = None
    test: SplitView | None = None  # the global test split, source of the clients' local test sets
    test_clusters: np.ndarray | None = None  # semantic cluster of each test image
    seed: int = 0
    local_test_images: int = 100
    # Reading a client's shard is a cheap memmap gather, so a worker may run clients it does not
    # keep (runtime/schedule.py); not so where a shard means decoding images (blocks mode).
    shards_are_cheap = True

    @cached_property
    def store(self) -> FeatureStore:
        if self.synthetic is not None:
            # On a cluster node without the generated store (no shared cache), generate it again:
            # the benchmark is deterministic, so every node gets the same bytes.
            return synthetic.ensure_store(self.synthetic, Path(self.store_path).parent)
        return FeatureStore(self.store_path)

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("store", None)  # memmaps are reopened on the other side
        return state

    @property
    def num_clients(self) -> int:
        return self.partition.num_clients

    def client_profile(self) -> tuple[np.ndarray, np.ndarray]:
        """Each client's modality and training images: what its update costs."""
        return self.partition.modality, self.partition.client_sizes()

    def shard(self, client: int) -> ClientShard:
        local = self.partition.client_indices[client]  # positions within the train split
        return self._shard(client, local, int(self.partition.modality[client]), self.train)

    def local_test_shard(self, client: int) -> ClientShard:
        """The client's personal test set: global test images drawn with the client's own cluster mix
        (in its own domain, all captions, both modalities whatever the client holds)."""
        mix = np.bincount(self.partition.clusters[self.partition.client_indices[client]],
                          minlength=self.partition.num_clusters).astype(np.float64)
        per_cluster = np.bincount(self.test_clusters, minlength=len(mix)).astype(np.float64)
        # Each test image gets its cluster's share of the client's mix, split over the cluster's images.
        p = mix[self.test_clusters] / np.maximum(per_cluster[self.test_clusters], 1)
        if p.sum() == 0:
            p = np.ones(len(self.test_clusters))
        n = min(self.local_test_images, int(np.count_nonzero(p)))
        rng = np.random.default_rng([self.seed, client, 0x7E57])
        picked = np.sort(rng.choice(len(p), size=n, replace=False, p=p / p.sum()))
        return self._shard(client, picked, PAIRED, self.test, self.test_clusters)

    def pooled_shard(self) -> ClientShard:
        """All clients' training data in one paired shard (the centralized upper bound)."""
        shards = [self._shard(c, self.partition.client_indices[c], PAIRED, self.train) for c in range(self.num_clients)]
        offsets, total = [np.zeros(1, np.int64)], 0
        for s in shards:
            offsets.append(s.caption_offsets[1:] + total)
            total += len(s.caption_emb)
        return ClientShard(0, PAIRED, np.concatenate([s.image_emb for s in shards]),
                           np.concatenate([s.caption_emb for s in shards]), np.concatenate(offsets),
                           np.concatenate([s.clusters for s in shards]))

    def _shard(self, client: int, local: np.ndarray, modality: int, split: SplitView,
               clusters: np.ndarray | None = None) -> ClientShard:
        store = self.store
        has_image = modality != TEXT_ONLY
        image_emb = np.asarray(store.image_emb[split.image_rows[local]]) if has_image \
            else np.empty((len(local), 0), np.float32)
        starts, ends = split.caption_offsets[local], split.caption_offsets[local + 1]
        counts = ends - starts
        caption_emb = np.asarray(store.caption_emb[split.caption_rows[concat_ranges(starts, ends)]])
        if self.synthetic is not None and self.synthetic.client_shift > 0:
            img_shift, txt_shift = synthetic.client_shift_vectors(self.synthetic.seed, client, store.dim,
                                                                  self.synthetic.client_shift)
            if has_image:
                image_emb = _renorm(image_emb + img_shift)
            caption_emb = _renorm(caption_emb + txt_shift)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        clusters = self.partition.clusters if clusters is None else clusters
        pixels = image_emb.dtype == np.uint8  # full-backbone mode: normalised by the adapters
        return ClientShard(client, modality, image_emb if pixels else image_emb.astype(np.float32, copy=False),
                           caption_emb.astype(np.float32, copy=False), offsets,
                           clusters[local])


@dataclass
class PooledFederation:
    """One client holding every client's training data, paired (the centralized upper bound)."""

    federation: Federation
    num_clients: int = 1
    shards_are_cheap = True

    @property
    def store(self) -> FeatureStore:
        return self.federation.store

    def client_profile(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array([PAIRED]), self.federation.partition.client_sizes().sum(keepdims=True)

    def shard(self, client: int) -> ClientShard:
        return self.federation.pooled_shard()


def _renorm(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def open_store(cfg: Config) -> FeatureStore:
    if cfg.data.source == "synthetic":
        return synthetic.ensure_store(cfg.data.synthetic, cfg.data.cache_dir)
    return FeatureStore(cfg.data.path)


def build_federation(cfg: Config, store: FeatureStore | None = None) -> Federation:
    store = store or open_store(cfg)
    train = store.split("train")
    if len(train.image_rows) == 0:
        raise ValueError(f"{store.path}: the feature store has no training images")
    test = store.split("test")
    if store.has_clusters:
        labels = store.images["cluster"].to_numpy(np.int64)
        clusters, test_clusters = labels[train.image_rows], labels[test.image_rows]
        num_clusters = int(clusters.max()) + 1
    else:
        feats = np.ascontiguousarray(store.image_emb[train.image_rows], dtype=np.float32)
        num_clusters = min(cfg.partition.clusters, len(feats))
        clusters = semantic_clusters(feats, num_clusters, cfg.seed)
        test_clusters = nearest_cluster(feats, clusters, num_clusters, np.asarray(store.image_emb[test.image_rows]))
    p = cfg.partition
    if p.num_clients * p.min_samples > len(clusters):
        raise ConfigError("partition.num_clients", p.num_clients,
                          f"at most {len(clusters) // max(p.min_samples, 1)}: {store.path} has {len(clusters)} "
                          f"training images and each client needs partition.min_samples={p.min_samples}")
    partition = dirichlet_partition(clusters, p.num_clients, p.alpha, p.min_samples, p.missing_rate,
                                    p.image_only_share, cfg.seed, num_clusters=num_clusters)
    federation = Federation(str(store.path), partition, train,
                            cfg.data.synthetic if cfg.data.source == "synthetic" else None,
                            test, test_clusters, cfg.seed, cfg.eval.local_test_images)
    federation.store = store  # already open here; reopened only where the federation is unpickled
    return federation


def nearest_cluster(feats: np.ndarray, clusters: np.ndarray, k: int, queries: np.ndarray) -> np.ndarray:
    """Cluster of each query: the nearest cluster mean of the training features (cosine)."""
    means = np.zeros((k, feats.shape[1]), np.float64)
    np.add.at(means, clusters, feats)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    if len(queries) == 0:
        return np.zeros(0, np.int64)
    return (np.asarray(queries, np.float64) @ means.T).argmax(1).astype(np.int64)
