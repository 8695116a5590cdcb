"""Tests for rcsr_ray.data.partition (non-IID client split + missing modalities)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rcsr_ray.data.partition import (
    IMAGE_ONLY,
    MODALITY_NAMES,
    PAIRED,
    TEXT_ONLY,
    Partition,
    client_kl,
    dirichlet_partition,
    plot_partition,
    semantic_clusters,
    skew_kl,
    summary_frame,
)

N_ITEMS, N_CLUSTERS, N_CLIENTS = 5000, 20, 20


@pytest.fixture(scope="module")
def clusters() -> np.ndarray:
    return np.random.default_rng(123).integers(0, N_CLUSTERS, N_ITEMS)


def _part(clusters, alpha=0.5, num_clients=N_CLIENTS, min_samples=10, missing_rate=0.0,
          image_only_share=0.5, seed=0, **kw) -> Partition:
    return dirichlet_partition(clusters, num_clients, alpha, min_samples, missing_rate,
                               image_only_share, seed, **kw)


def _assert_exact_cover(p: Partition, n: int) -> None:
    allidx = np.concatenate(p.client_indices)
    assert allidx.size == n, "some image is missing or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for ix in p.client_indices:
        assert ix.dtype == np.int64
        assert np.all(np.diff(ix) > 0), "client indices must be strictly increasing"


# ---------------------------------------------------------------- skew vs alpha
def test_skew_decreases_with_alpha(clusters):
    alphas = [0.05, 0.5, 5.0, 100.0]
    skews = [np.mean([skew_kl(_part(clusters, alpha=a, seed=s)) for s in range(3)]) for a in alphas]
    assert all(a > b for a, b in zip(skews, skews[1:])), skews
    assert skews[0] > 1.0  # strongly non-IID
    assert skews[-1] < 0.05  # nearly IID


@pytest.mark.parametrize("alpha", [None, math.inf])
def test_iid_split(clusters, alpha):
    p = _part(clusters, alpha=alpha)
    _assert_exact_cover(p, N_ITEMS)
    sizes = p.client_sizes()
    assert sizes.max() - sizes.min() <= 1  # near-equal parts
    assert skew_kl(p) < 0.1  # only sampling noise (~ (C-1)/(2n) = 0.038)
    assert skew_kl(p) < skew_kl(_part(clusters, alpha=0.5))


def test_iid_none_and_inf_identical(clusters):
    assert _part(clusters, alpha=None, seed=4) == _part(clusters, alpha=math.inf, seed=4)


# ---------------------------------------------------------------- cover + min_samples
@pytest.mark.parametrize("alpha", [0.01, 0.1, 1.0, None])
def test_every_image_assigned_exactly_once(clusters, alpha):
    p = _part(clusters, alpha=alpha, min_samples=50, seed=7)
    _assert_exact_cover(p, N_ITEMS)
    assert p.num_clients == N_CLIENTS
    assert p.cluster_counts().sum() == N_ITEMS


@pytest.mark.parametrize("seed", range(4))
def test_min_samples_honoured_at_tiny_alpha(clusters, seed):
    # 20 clients * 200 = 4000 of 5000 images: a Dirichlet(0.01) draw almost never
    # satisfies this, so the repair (moving images from the largest clients) must.
    p = _part(clusters, alpha=0.01, min_samples=200, seed=seed)
    _assert_exact_cover(p, N_ITEMS)
    assert p.client_sizes().min() >= 200
    assert skew_kl(p) > 0.5  # repair keeps the split non-IID


def test_min_samples_exactly_tight(clusters):
    p = _part(clusters, alpha=0.01, min_samples=N_ITEMS // N_CLIENTS, seed=3)
    _assert_exact_cover(p, N_ITEMS)
    assert np.all(p.client_sizes() == N_ITEMS // N_CLIENTS)


def test_repair_prefers_dominant_cluster():
    # 2 clusters of 100 each; many clients at tiny alpha -> most draws leave clients empty.
    cl = np.repeat([0, 1], 100)
    p = dirichlet_partition(cl, 10, 0.001, 15, 0.0, 0.0, seed=5)
    _assert_exact_cover(p, 200)
    assert p.client_sizes().min() >= 15
    # clients filled by the repair should still be dominated by a single cluster
    frame = summary_frame(p)
    assert frame["top_share"].min() >= 0.5


# ---------------------------------------------------------------- missing modality
@pytest.mark.parametrize(
    "num_clients, missing_rate, image_only_share, n_img, n_txt",
    [
        (20, 0.5, 0.5, 5, 5),
        (10, 0.3, 0.5, 2, 1),  # m=3, round(1.5)=2 image-only
        (10, 0.3, 0.0, 0, 3),
        (10, 0.3, 1.0, 3, 0),
        (20, 0.0, 0.5, 0, 0),
        (20, 1.0, 0.5, 10, 10),
        (7, 1.0, 0.0, 0, 7),
    ],
)
def test_missing_rate_exact(clusters, num_clients, missing_rate, image_only_share, n_img, n_txt):
    p = _part(clusters, num_clients=num_clients, missing_rate=missing_rate,
              image_only_share=image_only_share, seed=11)
    assert p.modality.dtype == np.int8
    assert p.modality.shape == (num_clients,)
    assert int((p.modality != PAIRED).sum()) == round(missing_rate * num_clients)
    assert int((p.modality == IMAGE_ONLY).sum()) == n_img
    assert int((p.modality == TEXT_ONLY).sum()) == n_txt
    assert int((p.modality == PAIRED).sum()) == num_clients - n_img - n_txt


def test_modality_names(clusters):
    p = _part(clusters, missing_rate=1.0, image_only_share=0.5, seed=2)
    names = {p.modality_name(c) for c in range(p.num_clients)}
    assert names == {"image-only", "text-only"}
    assert MODALITY_NAMES[PAIRED] == "paired"
    assert _part(clusters, missing_rate=0.0).modality_name(0) == "paired"


def test_missing_rate_does_not_change_image_assignment(clusters):
    base = _part(clusters, alpha=0.3, missing_rate=0.0, seed=9)
    for rate, share in [(0.25, 0.5), (0.5, 0.0), (1.0, 1.0)]:
        other = _part(clusters, alpha=0.3, missing_rate=rate, image_only_share=share, seed=9)
        assert all(np.array_equal(a, b) for a, b in zip(base.client_indices, other.client_indices))
        assert not np.array_equal(base.modality, other.modality)


def test_unimodal_sets_are_nested_in_missing_rate(clusters):
    small = _part(clusters, missing_rate=0.2, seed=1)
    large = _part(clusters, missing_rate=0.6, seed=1)
    assert set(np.flatnonzero(small.modality != PAIRED)) <= set(np.flatnonzero(large.modality != PAIRED))


# ---------------------------------------------------------------- determinism
def test_same_seed_same_partition(clusters):
    a = _part(clusters, alpha=0.1, missing_rate=0.4, seed=42)
    b = _part(clusters, alpha=0.1, missing_rate=0.4, seed=42)
    assert a == b
    assert all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))
    assert np.array_equal(a.modality, b.modality)


def test_different_seed_different_partition(clusters):
    a = _part(clusters, alpha=0.1, missing_rate=0.4, seed=42)
    b = _part(clusters, alpha=0.1, missing_rate=0.4, seed=43)
    assert a != b
    assert not all(np.array_equal(x, y) for x, y in zip(a.client_indices, b.client_indices))


def test_partition_arrays_readonly(clusters):
    p = _part(clusters)
    with pytest.raises(ValueError):
        p.client_indices[0][0] = 1
    with pytest.raises(ValueError):
        p.modality[0] = TEXT_ONLY


# ---------------------------------------------------------------- diagnostics
def test_cluster_counts_and_summary(clusters):
    p = _part(clusters, alpha=0.2, missing_rate=0.5, seed=5)
    counts = p.cluster_counts()
    assert counts.shape == (N_CLIENTS, N_CLUSTERS)
    assert np.array_equal(counts.sum(axis=0), np.bincount(clusters, minlength=N_CLUSTERS))
    frame = summary_frame(p)
    assert list(frame.columns) == ["client", "modality", "images", "clusters_present",
                                   "top_cluster", "top_share", "kl_to_global"]
    assert len(frame) == N_CLIENTS
    assert frame["images"].sum() == N_ITEMS
    assert np.array_equal(frame["images"].to_numpy(), p.client_sizes())
    assert np.array_equal(frame["top_cluster"].to_numpy(), counts.argmax(axis=1))
    assert np.allclose(frame["top_share"], counts.max(axis=1) / counts.sum(axis=1))
    assert np.array_equal(frame["clusters_present"].to_numpy(), (counts > 0).sum(axis=1))
    assert set(frame["modality"]) <= set(MODALITY_NAMES)
    assert math.isclose(frame["kl_to_global"].mean(), skew_kl(p), rel_tol=1e-9)
    assert np.all(client_kl(p) >= -1e-12)


def test_num_clusters_override(clusters):
    p = _part(clusters, num_clusters=N_CLUSTERS + 5)
    assert p.num_clusters == N_CLUSTERS + 5
    assert p.cluster_counts().shape == (N_CLIENTS, N_CLUSTERS + 5)
    assert np.isfinite(skew_kl(p))


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(alpha=0.0),
        dict(alpha=-1.0),
        dict(alpha=float("nan")),
        dict(missing_rate=1.01),
        dict(missing_rate=-0.1),
        dict(image_only_share=1.5),
        dict(image_only_share=-0.5),
        dict(num_clients=0),
        dict(min_samples=251),  # 20 * 251 > 5000
        dict(num_clusters=N_CLUSTERS - 1),
    ],
)
def test_invalid_inputs_raise(clusters, kwargs):
    with pytest.raises(ValueError):
        _part(clusters, **kwargs)


def test_too_few_items_message():
    with pytest.raises(ValueError, match="at least 5 images"):
        dirichlet_partition(np.zeros(30, dtype=np.int64), 10, 1.0, 5, 0.0, 0.0, seed=0)


# ---------------------------------------------------------------- semantic clusters
def _blobs(seed=0, n_blobs=5, per_blob=80, dim=32, noise=0.05):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_blobs, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[truth] + noise * rng.normal(size=(truth.size, dim))
    perm = rng.permutation(truth.size)
    return x[perm].astype(np.float32), truth[perm]


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_semantic_clusters_recovers_blobs(data_seed):
    x, truth = _blobs(seed=data_seed)
    labels = semantic_clusters(x, 5, seed=0)
    assert labels.shape == truth.shape and labels.dtype == np.int64
    assert labels.min() >= 0 and labels.max() < 5
    # each blob maps to exactly one cluster id, and distinct blobs to distinct ids
    for b in range(5):
        assert np.unique(labels[truth == b]).size == 1
    assert np.unique(labels).size == 5
    # purity in both directions
    table = np.zeros((5, 5), dtype=int)
    np.add.at(table, (truth, labels), 1)
    assert table.max(axis=1).sum() == truth.size
    assert table.max(axis=0).sum() == truth.size


def test_semantic_clusters_deterministic():
    x, _ = _blobs(seed=3, n_blobs=8, per_blob=50)
    x = x + np.random.default_rng(0).normal(scale=0.3, size=x.shape).astype(np.float32)  # ambiguous data
    a = semantic_clusters(x, 6, seed=17)
    b = semantic_clusters(x, 6, seed=17)
    assert np.array_equal(a, b)


def test_semantic_clusters_invalid():
    x, _ = _blobs()
    with pytest.raises(ValueError):
        semantic_clusters(x[:4], 5, seed=0)
    with pytest.raises(ValueError):
        semantic_clusters(x[:, 0], 2, seed=0)
    with pytest.raises(ValueError):
        semantic_clusters(x, 0, seed=0)
    with pytest.raises(ValueError):
        semantic_clusters(x, 3, seed=0, n_init=0)


def test_clusters_feed_partition():
    x, truth = _blobs(per_blob=60)
    labels = semantic_clusters(x, 5, seed=1)
    p = dirichlet_partition(labels, 6, 0.1, 5, 0.5, 0.5, seed=0)
    _assert_exact_cover(p, truth.size)
    assert p.num_clusters == 5


# ---------------------------------------------------------------- plot
def test_plot_partition_writes_png(tmp_path, clusters):
    p = _part(clusters, alpha=0.1, missing_rate=0.4, seed=1)
    out = tmp_path / "sub" / "partition.png"
    plot_partition(p, out, title="test partition")
    data = out.read_bytes()
    assert len(data) > 5000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_partition_truncates_many_clients(tmp_path):
    cl = np.random.default_rng(0).integers(0, 45, 3000)
    p = dirichlet_partition(cl, 150, 0.3, 2, 0.3, 0.5, seed=0)
    from PIL import Image

    def height_px(max_clients: int) -> int:
        out = tmp_path / f"many-{max_clients}.png"
        plot_partition(p, out, max_clients=max_clients)
        return Image.open(out).size[1]

    # One row per client drawn: 100 rows make a shorter figure than all 150, and asking for more
    # clients than exist draws them all.
    assert height_px(100) < height_px(150) == height_px(1000)


def test_partition_pickles(clusters):
    import pickle

    p = _part(clusters, alpha=0.2, missing_rate=0.5, seed=8)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and q.num_clients == p.num_clients
