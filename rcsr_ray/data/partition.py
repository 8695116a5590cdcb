"""Non-IID client partitioning of a paired image-text training set.

Images (with all of their captions) are the unit of assignment.  The skew is
controlled by a Dirichlet(alpha) draw over clients for every *semantic
cluster* (faiss spherical k-means over embedding features), the standard
non-IID federated-learning recipe.  On top of the image split, a seeded subset
of clients is made unimodal (image-only or text-only).

Randomness: everything derives from ``seed``.  ``SeedSequence(seed)`` is
spawned into two independent children (exactly what
``np.random.default_rng(seed).spawn(2)`` does): the first drives the image
split, the second the modality draw.  Changing ``missing_rate`` or
``image_only_share`` therefore never changes which images a client holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PAIRED, IMAGE_ONLY, TEXT_ONLY = 0, 1, 2
MODALITY_NAMES = ("paired", "image-only", "text-only")

_MAX_REDRAWS = 100
_KL_EPS = 1e-12

__all__ = [
    "PAIRED",
    "IMAGE_ONLY",
    "TEXT_ONLY",
    "MODALITY_NAMES",
    "Partition",
    "semantic_clusters",
    "dirichlet_partition",
    "client_kl",
    "skew_kl",
    "summary_frame",
    "plot_partition",
]


# --------------------------------------------------------------------------
# semantic clusters
# --------------------------------------------------------------------------
def _kmeanspp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding on unit vectors (squared distance = 2 - 2 * cos).

    faiss initialises k-means with k random points, which regularly puts two
    seeds in one blob and none in another (Lloyd's cannot escape that); D^2
    seeding avoids it.  Cost: about (2 + log k) Lloyd iterations.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    sq_norm = np.einsum("ij,ij->i", x, x)
    closest = np.maximum(sq_norm + sq_norm[first] - 2.0 * (x @ x[first]), 0.0)
    for i in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # all points coincide with chosen centres
            cand = rng.integers(n, size=trials)
        else:
            cdf = np.cumsum(closest, dtype=np.float64)
            cand = np.searchsorted(cdf, rng.random(trials) * cdf[-1], side="right")
            cand = np.minimum(cand, n - 1)
        dist = np.maximum(sq_norm[None, :] + sq_norm[cand][:, None] - 2.0 * (x[cand] @ x.T), 0.0)
        new_closest = np.minimum(closest[None, :], dist)
        best = int(np.argmin(new_closest.sum(axis=1)))
        centers[i] = x[cand[best]]
        closest = new_closest[best]
    return centers


def semantic_clusters(
    features: np.ndarray, k: int, seed: int, niter: int = 20, n_init: int = 3
) -> np.ndarray:
    """Spherical (inner-product) faiss k-means over ``(N, d)`` features.

    Rows are L2-normalised (on a copy; zero rows stay zero) so that the
    inner-product assignment is cosine similarity.  Each of ``n_init`` runs
    seeds its centroids by greedy k-means++ (on at most ``128 * k`` sampled
    points, numpy generator from ``seed``) and refines them with
    ``faiss.Kmeans(d, k, niter=niter, seed=seed + run, spherical=True)``;
    the run with the best objective (largest total cosine similarity) wins.
    Returns ``(N,)`` int64 cluster ids in ``[0, k)``; deterministic for a
    given ``seed``.  Raises ``ValueError`` for ``k < 1``, ``k > N``,
    ``n_init < 1`` or non-2-D / non-finite input.
    """
    import faiss  # local import: keeps the module importable for pure-partition use

    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {x.shape}")
    n, d = x.shape
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"cannot form k={k} clusters from only N={n} points")
    if d < 1:
        raise ValueError("features must have at least one dimension")
    if int(n_init) < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if not np.all(np.isfinite(x)):
        raise ValueError("features contain non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    if k == 1:
        return np.zeros(n, dtype=np.int64)

    # OpenMP start-up dominates tiny problems (100x on a loaded 2-core box); results
    # do not depend on the thread count, so run those single-threaded.
    small = n * k * d < 20_000_000
    prev_threads = faiss.omp_get_max_threads()
    if small:
        faiss.omp_set_num_threads(1)
    try:
        return _spherical_kmeans_runs(faiss, x, k, seed, niter, int(n_init))
    finally:
        if small:
            faiss.omp_set_num_threads(prev_threads)


def _spherical_kmeans_runs(faiss, x, k, seed, niter, n_init) -> np.ndarray:
    n, d = x.shape
    rng = np.random.default_rng(seed)
    best_obj, best_labels = -np.inf, None
    for run in range(n_init):
        sample = x if n <= 128 * k else x[np.sort(rng.choice(n, 128 * k, replace=False))]
        init = _kmeanspp_init(np.ascontiguousarray(sample), k, rng)
        km = faiss.Kmeans(
            d,
            k,
            niter=int(niter),
            seed=int(seed) + run,
            spherical=True,
            verbose=False,
            min_points_per_centroid=1,  # silence the "please provide at least ..." warning
        )
        km.train(x, init_centroids=init)
        sims, labels = km.index.search(x, 1)
        obj = float(sims[:, 0].sum(dtype=np.float64))
        if best_labels is None or obj > best_obj:
            best_obj, best_labels = obj, labels[:, 0]
    return best_labels.astype(np.int64)


# --------------------------------------------------------------------------
# Partition container
# --------------------------------------------------------------------------
def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Partition:
    """Assignment of training images to clients plus each client's modality.

    ``client_indices[c]`` are the sorted int64 indices of the training images
    client ``c`` holds (each image travels with all its captions).  Arrays are
    stored as read-only copies.
    """

    client_indices: tuple[np.ndarray, ...]
    modality: np.ndarray
    clusters: np.ndarray
    num_clusters: int

    def __post_init__(self) -> None:
        idx = tuple(_readonly(np.asarray(ix, dtype=np.int64).ravel()) for ix in self.client_indices)
        modality = _readonly(np.asarray(self.modality, dtype=np.int8).ravel())
        clusters = _readonly(np.asarray(self.clusters, dtype=np.int64).ravel())
        num_clusters = int(self.num_clusters)
        if len(idx) < 1:
            raise ValueError("a partition needs at least one client")
        if modality.shape[0] != len(idx):
            raise ValueError(f"modality has {modality.shape[0]} entries for {len(idx)} clients")
        if modality.size and (modality.min() < 0 or modality.max() > 2):
            raise ValueError("modality values must be PAIRED(0), IMAGE_ONLY(1) or TEXT_ONLY(2)")
        if clusters.size and (clusters.min() < 0 or clusters.max() >= num_clusters):
            raise ValueError(f"cluster ids must lie in [0, {num_clusters})")
        n = clusters.shape[0]
        for c, ix in enumerate(idx):
            if ix.size and (ix.min() < 0 or ix.max() >= n):
                raise ValueError(f"client {c} holds indices outside [0, {n})")
        object.__setattr__(self, "client_indices", idx)
        object.__setattr__(self, "modality", modality)
        object.__setattr__(self, "clusters", clusters)
        object.__setattr__(self, "num_clusters", num_clusters)

    # dataclass(eq=True) would compare arrays element-wise -> ambiguous truth value.
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return (
            self.num_clusters == other.num_clusters
            and len(self.client_indices) == len(other.client_indices)
            and np.array_equal(self.modality, other.modality)
            and np.array_equal(self.clusters, other.clusters)
            and all(np.array_equal(a, b) for a, b in zip(self.client_indices, other.client_indices))
        )

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_images(self) -> int:
        return int(self.clusters.shape[0])

    def client_sizes(self) -> np.ndarray:
        """``(num_clients,)`` int64 number of images per client."""
        return np.array([ix.size for ix in self.client_indices], dtype=np.int64)

    def cluster_counts(self) -> np.ndarray:
        """``(num_clients, num_clusters)`` int64 image counts per cluster."""
        out = np.zeros((self.num_clients, self.num_clusters), dtype=np.int64)
        for c, ix in enumerate(self.client_indices):
            out[c] = np.bincount(self.clusters[ix], minlength=self.num_clusters)
        return out

    def modality_name(self, client: int) -> str:
        return MODALITY_NAMES[int(self.modality[client])]


# --------------------------------------------------------------------------
# Dirichlet partition
# --------------------------------------------------------------------------
def _is_iid(alpha) -> bool:
    return alpha is None or (isinstance(alpha, (int, float, np.floating, np.integer)) and math.isinf(alpha) and alpha > 0)


def _dirichlet(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    s = p.sum()
    if not np.all(np.isfinite(p)) or s <= 0:  # numerical underflow at tiny alpha
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
        return p
    return p / s


def _draw_owner(rng, clusters, members, num_clients, alpha) -> np.ndarray:
    """One Dirichlet draw: owner client per image."""
    owner = np.empty(clusters.shape[0], dtype=np.int64)
    for idx in members:
        if idx.size == 0:
            continue
        idx = rng.permutation(idx)
        p = _dirichlet(rng, alpha, num_clients)
        cuts = (np.cumsum(p)[:-1] * idx.size).astype(np.int64)
        cuts = np.clip(cuts, 0, idx.size)
        sizes = np.diff(np.concatenate(([0], cuts, [idx.size])))
        owner[idx] = np.repeat(np.arange(num_clients), sizes)
    return owner


def _repair(rng, owner, clusters, num_clients, num_clusters, min_samples) -> np.ndarray:
    """Move images from the largest clients to clients below ``min_samples``.

    Donor quotas come from "water-filling from the top": the largest clients
    are cut down to a common level ``L >= min_samples`` until the total
    deficit is covered.  Each deficient client (largest deficit first) then
    takes from the donors with the largest remaining quota, preferring the
    donor's images of the deficient client's own dominant cluster; an empty
    client adopts the dominant cluster of its first donor.
    """
    owner = owner.copy()
    counts = np.bincount(owner, minlength=num_clients).astype(np.int64)
    deficit = np.maximum(0, min_samples - counts)
    total = int(deficit.sum())
    if total == 0:
        return owner

    def surplus_over(level: int) -> int:
        return int(np.maximum(0, counts - level).sum())

    lo, hi = int(min_samples), int(counts.max())  # surplus_over(lo) >= total (N >= K*min_samples)
    while lo < hi:  # largest level with surplus_over(level) >= total
        mid = (lo + hi + 1) // 2
        if surplus_over(mid) >= total:
            lo = mid
        else:
            hi = mid - 1
    level = lo
    quota = np.maximum(0, counts - level)
    excess = int(quota.sum()) - total
    if excess > 0:  # excess < #clients above the level: trim one from the smallest of them
        above = np.flatnonzero(counts > level)
        above = above[np.argsort(counts[above], kind="stable")]
        quota[above[:excess]] -= 1

    for d in np.argsort(counts, kind="stable"):
        need = int(deficit[d])
        if need == 0:
            continue
        own = np.flatnonzero(owner == d)
        dom = int(np.argmax(np.bincount(clusters[own], minlength=num_clusters))) if own.size else -1
        while need > 0:
            donor = int(np.argmax(quota))
            if quota[donor] <= 0:  # cannot happen when num_clients * min_samples <= N
                raise RuntimeError("partition repair ran out of donor images")
            take = int(min(need, quota[donor]))
            donor_items = rng.permutation(np.flatnonzero(owner == donor))
            if dom < 0:
                dom = int(np.argmax(np.bincount(clusters[donor_items], minlength=num_clusters)))
            preferred = clusters[donor_items] == dom
            moved = np.concatenate((donor_items[preferred], donor_items[~preferred]))[:take]
            owner[moved] = d
            quota[donor] -= take
            need -= take
    return owner


def _owner_to_indices(owner: np.ndarray, num_clients: int) -> tuple[np.ndarray, ...]:
    order = np.argsort(owner, kind="stable").astype(np.int64)  # stable -> sorted within client
    sizes = np.bincount(owner, minlength=num_clients)
    return tuple(np.split(order, np.cumsum(sizes)[:-1]))


def _assign_modality(rng, num_clients, missing_rate, image_only_share) -> np.ndarray:
    m = int(round(missing_rate * num_clients))
    n_img = int(round(image_only_share * m))
    modality = np.full(num_clients, PAIRED, dtype=np.int8)
    missing = rng.permutation(num_clients)[:m]
    modality[missing[:n_img]] = IMAGE_ONLY
    modality[missing[n_img:]] = TEXT_ONLY
    return modality


def dirichlet_partition(
    clusters: np.ndarray,
    num_clients: int,
    alpha: float | None,
    min_samples: int,
    missing_rate: float,
    image_only_share: float,
    seed: int,
    num_clusters: int | None = None,
) -> Partition:
    """Split images over clients, non-IID over semantic clusters.

    Parameters
    ----------
    clusters: ``(N,)`` cluster id per training image.
    num_clients: number of clients (>= 1).
    alpha: Dirichlet concentration (> 0); ``None`` or ``math.inf`` -> IID
        (random permutation split into near-equal parts).
    min_samples: every client ends up with at least this many images.
        Up to 100 full redraws are tried, then images are moved from the
        largest clients.  ``num_clients * min_samples > N`` -> ``ValueError``.
    missing_rate: exactly ``round(missing_rate * num_clients)`` clients lack a
        modality (Python ``round``: halves go to even).
    image_only_share: of those ``m`` clients, ``round(image_only_share * m)``
        are IMAGE_ONLY, the rest TEXT_ONLY.
    seed: all randomness derives from it (split and modality streams are
        independent children of ``SeedSequence(seed)``).
    num_clusters: defaults to ``clusters.max() + 1``.
    """
    clusters = np.asarray(clusters)
    if clusters.ndim != 1:
        raise ValueError(f"clusters must be 1-D, got shape {clusters.shape}")
    if clusters.size and not np.issubdtype(clusters.dtype, np.integer):
        if not np.all(np.mod(clusters, 1) == 0):
            raise ValueError("cluster ids must be integers")
    clusters = clusters.astype(np.int64)
    n = int(clusters.shape[0])

    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients = int(num_clients)
    iid = _is_iid(alpha)
    if not iid:
        try:
            a = float(alpha)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a positive number, None or math.inf, got {alpha!r}") from None
        if not (a > 0) or math.isnan(a):
            raise ValueError(f"alpha must be > 0 (or None/math.inf for IID), got {alpha!r}")
        alpha = a
    if not (0.0 <= float(missing_rate) <= 1.0):
        raise ValueError(f"missing_rate must be in [0, 1], got {missing_rate!r}")
    if not (0.0 <= float(image_only_share) <= 1.0):
        raise ValueError(f"image_only_share must be in [0, 1], got {image_only_share!r}")
    min_samples = int(min_samples)
    if min_samples < 0:
        raise ValueError(f"min_samples must be >= 0, got {min_samples}")
    if num_clients * min_samples > n:
        raise ValueError(
            f"cannot give each of {num_clients} clients at least {min_samples} images: "
            f"need {num_clients * min_samples} but only {n} are available"
        )
    if clusters.size and clusters.min() < 0:
        raise ValueError("cluster ids must be >= 0")
    inferred = int(clusters.max()) + 1 if clusters.size else 1
    if num_clusters is None:
        num_clusters = inferred
    num_clusters = int(num_clusters)
    if num_clusters < inferred:
        raise ValueError(f"num_clusters={num_clusters} but cluster ids go up to {inferred - 1}")

    split_ss, modality_ss = np.random.SeedSequence(seed).spawn(2)
    split_rng = np.random.default_rng(split_ss)
    modality_rng = np.random.default_rng(modality_ss)

    if iid:
        parts = np.array_split(split_rng.permutation(n), num_clients)
        owner = np.empty(n, dtype=np.int64)
        for c, part in enumerate(parts):
            owner[part] = c
    else:
        order = np.argsort(clusters, kind="stable")
        sizes = np.bincount(clusters, minlength=num_clusters)
        members = np.split(order, np.cumsum(sizes)[:-1])
        best, best_min = None, -1
        for _ in range(_MAX_REDRAWS):
            owner = _draw_owner(split_rng, clusters, members, num_clients, alpha)
            smallest = int(np.bincount(owner, minlength=num_clients).min()) if n else 0
            if smallest >= min_samples:
                best = owner
                break
            if smallest > best_min:
                best, best_min = owner, smallest
        owner = best
        if n and int(np.bincount(owner, minlength=num_clients).min()) < min_samples:
            owner = _repair(split_rng, owner, clusters, num_clients, num_clusters, min_samples)

    modality = _assign_modality(modality_rng, num_clients, float(missing_rate), float(image_only_share))
    return Partition(
        client_indices=_owner_to_indices(owner, num_clients),
        modality=modality,
        clusters=clusters,
        num_clusters=num_clusters,
    )


# --------------------------------------------------------------------------
# diagnostics
# --------------------------------------------------------------------------
def _global_mix(partition: Partition) -> np.ndarray:
    g = np.bincount(partition.clusters, minlength=partition.num_clusters).astype(np.float64)
    return g / max(g.sum(), 1.0)


def client_kl(partition: Partition) -> np.ndarray:
    """``(num_clients,)`` KL(client cluster mix || global cluster mix); NaN for empty clients."""
    counts = partition.cluster_counts().astype(np.float64)
    q = _global_mix(partition) + _KL_EPS
    q /= q.sum()
    out = np.full(partition.num_clients, np.nan)
    for c in range(partition.num_clients):
        tot = counts[c].sum()
        if tot <= 0:
            continue
        p = counts[c] / tot + _KL_EPS
        p /= p.sum()
        out[c] = float(np.sum(p * np.log(p / q)))
    return out


def skew_kl(partition: Partition) -> float:
    """Mean over (non-empty) clients of KL(client cluster mix || global mix)."""
    kl = client_kl(partition)
    kl = kl[~np.isnan(kl)]
    return float(kl.mean()) if kl.size else 0.0


def summary_frame(partition: Partition):
    """One row per client: client, modality, images, clusters_present, top_cluster, top_share, kl_to_global."""
    import pandas as pd

    counts = partition.cluster_counts()
    sizes = counts.sum(axis=1)
    top = counts.argmax(axis=1)
    top_count = counts.max(axis=1) if counts.size else np.zeros(partition.num_clients, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        top_share = np.where(sizes > 0, top_count / np.maximum(sizes, 1), 0.0)
    return pd.DataFrame(
        {
            "client": np.arange(partition.num_clients, dtype=np.int64),
            "modality": [partition.modality_name(c) for c in range(partition.num_clients)],
            "images": sizes.astype(np.int64),
            "clusters_present": (counts > 0).sum(axis=1).astype(np.int64),
            "top_cluster": np.where(sizes > 0, top, -1).astype(np.int64),
            "top_share": top_share.astype(np.float64),
            "kl_to_global": client_kl(partition),
        }
    )


# --------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------
_MODALITY_STYLE = {
    PAIRED: dict(marker="o", color="#4d4d4d"),
    IMAGE_ONLY: dict(marker="s", color="#e6550d"),
    TEXT_ONLY: dict(marker="^", color="#3182bd"),
}


def _cluster_colors(k: int) -> list:
    import matplotlib

    if k <= 10:
        base = list(matplotlib.colormaps["tab10"].colors)
    else:
        base = (
            list(matplotlib.colormaps["tab20"].colors)
            + list(matplotlib.colormaps["tab20b"].colors)
            + list(matplotlib.colormaps["tab20c"].colors)
        )
    return [base[i % len(base)] for i in range(k)]


def plot_partition(
    partition: Partition,
    path,
    max_clients: int = 100,
    title: str | None = None,
) -> None:
    """Write a PNG of per-client cluster histograms (stacked horizontal bars).

    One bar per client (client id on the y axis, client 0 on top), segments
    coloured by cluster, a modality marker next to each bar.  Only the first
    ``max_clients`` clients are drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    shown = int(min(max(1, int(max_clients)), partition.num_clients))
    counts = partition.cluster_counts()[:shown]
    k = partition.num_clusters
    colors = _cluster_colors(k)
    y = np.arange(shown)

    # ---- layout in inches -------------------------------------------------
    row_in = 0.14 if shown > 30 else 0.26
    top_in, bottom_in = 1.05, 0.6
    axes_h = max(1.9, row_in * shown)
    height = min(top_in + bottom_in + axes_h, 60.0)
    axes_h = height - top_in - bottom_in
    legend_rows = max(1, int(axes_h / 0.19))
    ncol = int(math.ceil(k / legend_rows))
    show_cluster_legend = ncol <= 3
    legend_w = (1.05 * ncol + 0.25) if show_cluster_legend else 0.25
    main_w = 9.5
    width = main_w + legend_w
    fig = plt.figure(figsize=(width, height), dpi=120)
    gs = fig.add_gridspec(1, 2, width_ratios=[1, 40], wspace=0.0)
    ax_tag = fig.add_subplot(gs[0, 0])
    ax = fig.add_subplot(gs[0, 1], sharey=ax_tag)
    fig.subplots_adjust(
        left=0.65 / width,
        right=(width - legend_w) / width,
        top=1 - top_in / height,
        bottom=bottom_in / height,
    )

    # ---- stacked bars -----------------------------------------------------
    # one PolyCollection of non-empty segments (thousands of barh patches are slow)
    bar_h = 0.78 if shown <= 60 else 0.88
    starts = np.cumsum(counts, axis=1) - counts
    rows, cols = np.nonzero(counts)
    x0 = starts[rows, cols].astype(float)
    x1 = x0 + counts[rows, cols]
    y0, y1 = rows - bar_h / 2, rows + bar_h / 2
    verts = np.stack(
        [np.stack([x0, y0], 1), np.stack([x0, y1], 1), np.stack([x1, y1], 1), np.stack([x1, y0], 1)],
        axis=1,
    )
    ax.add_collection(
        PolyCollection(verts, facecolors=[colors[j] for j in cols], edgecolors="none", linewidths=0)
    )
    left = counts.sum(axis=1).astype(float)

    # ---- modality tags (narrow left axis carrying the client ids) -----------
    marker_s = 30 if shown <= 60 else 16
    for code, style in _MODALITY_STYLE.items():
        sel = np.flatnonzero(partition.modality[:shown] == code)
        if sel.size:
            ax_tag.scatter(np.zeros(sel.size), sel, s=marker_s, linewidths=0, **style)
    ax_tag.set_xlim(-1, 1)
    ax_tag.set_xticks([])
    for spine in ("top", "right", "bottom"):
        ax_tag.spines[spine].set_visible(False)
    ax_tag.set_ylim(shown - 0.5, -0.5)  # client 0 on top
    step = 1 if shown <= 100 else int(math.ceil(shown / 100))
    ax_tag.set_yticks(y[::step])
    ax_tag.set_yticklabels([str(c) for c in y[::step]], fontsize=8 if shown <= 40 else 6)
    ax_tag.tick_params(axis="y", length=2, pad=1)
    ax_tag.set_ylabel("client")

    ax.tick_params(axis="y", left=False, labelleft=False)
    for spine in ("left", "top", "right"):
        ax.spines[spine].set_visible(False)
    ax.set_xlabel("images per client (segments coloured by semantic cluster)")
    ax.set_xlim(0, max(1.0, float(left.max()) * 1.02))
    ax.grid(axis="x", color="0.88", linewidth=0.6)
    ax.set_axisbelow(True)

    # ---- legends ----------------------------------------------------------
    mod_handles = [
        Line2D(
            [], [], linestyle="none", markersize=7,
            label=f"{MODALITY_NAMES[c]} ({int((partition.modality == c).sum())})", **s,
        )
        for c, s in _MODALITY_STYLE.items()
    ]
    fig.legend(
        handles=mod_handles,
        title=None,
        loc="lower left",
        bbox_to_anchor=(0.65 / width, 1 - (top_in - 0.02) / height),
        ncol=3,
        fontsize=8,
        frameon=False,
        handletextpad=0.3,
        columnspacing=1.2,
        borderaxespad=0.0,
        borderpad=0.0,
    )
    if show_cluster_legend:
        cl_handles = [Patch(facecolor=colors[j], label=f"cluster {j}") for j in range(k)]
        ax.legend(
            handles=cl_handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            ncol=ncol,
            fontsize=7,
            frameon=False,
            title="cluster",
            title_fontsize=8,
            handlelength=1.2,
            handletextpad=0.4,
            columnspacing=0.8,
            labelspacing=0.25,
            borderaxespad=0.0,
        )

    # ---- titles -----------------------------------------------------------
    sizes = partition.client_sizes()
    info = (
        f"{partition.num_clients} clients, {partition.num_images} images, {k} clusters; "
        f"images/client {int(sizes.min())}-{int(sizes.max())}; "
        f"mean KL(client || global) {skew_kl(partition):.3f}"
    )
    if shown < partition.num_clients:
        info += f"; first {shown} clients shown"
    if not show_cluster_legend:
        info += f"; cluster colours repeat every {min(60, k)}"
    fig.text(0.5, 1 - 0.18 / height, title if title else "Client partition",
             ha="center", va="top", fontsize=11, fontweight="bold")
    fig.text(0.5, 1 - 0.45 / height, info, ha="center", va="top", fontsize=8, color="0.3")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
