"""Exact, memory-bounded image-text retrieval metrics.

Scores are inner products (float32, torch matmul on CPU) computed one chunk of image rows at
a time; the full image x caption matrix is never held.  Ranks are exact counts, 1-based, with
*pessimistic* ties: any competitor whose score is >= the ground-truth score counts against the
query, so a collapsed (constant) embedding scores ~0 recall instead of 100.

Protocols
---------
``"standard"``  usual multi-caption protocol.  i2t rank of image i = 1 + #non-ground-truth
                captions scoring >= its best ground-truth caption; t2i rank of caption j =
                1 + #other images scoring >= its own image.
``"diagonal"``  one (image, caption) pair per caption, images duplicated per caption (the
                protocol of the paper we reproduce).  i2t rank of pair p = rank of caption p among
                all captions in its image's row; t2i rank of caption p = rank of pair-image p among
                all pair-images, so duplicates of its own image count as misses.  Images without
                captions never appear as pair-images and are ignored.

Exact duplicate vectors are merged up front and counted by multiplicity: duplicate ties are then
exact by construction, whatever the BLAS rounding does, and the diagonal protocol never
materialises duplicated images.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["PROTOCOLS", "RECALL_KS", "evaluate", "ranks"]

PROTOCOLS = ("standard", "diagonal")
RECALL_KS = (1, 5, 10)

# Rows per group in the ground-truth pre-pass (~1% of the main GEMM's flops at COCO-5K size).
_PREPASS_ROWS = 64
# Lines (rows/columns) with more queries than this are sorted once rather than compared once
# per query: a sort costs roughly as much as ~100 full-line comparisons.
_SORT_MIN = 64
# Rows per comparison tile (~4 MB of scores: cache-resident while compared twice or more).
_TILE_BYTES = 4 << 20
# |score| <= d * max|x| * max|y|; stay well below float32 max (3.4e38) so no score overflows.
_SCORE_LIMIT = 1e38


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------
def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
        if x.is_floating_point():
            x = x.detach().to(device="cpu", dtype=torch.float32)
        else:
            x = x.detach().to(device="cpu")
        return x.numpy()
    return np.asarray(x)


def _embeddings(x: Any, name: str) -> tuple[np.ndarray, float]:
    arr = _to_numpy(x, name)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(arr.shape)}")
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(arr.shape)}")
    with np.errstate(over="ignore"):  # float64 -> float32 overflow becomes inf, rejected below
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    # max/min propagate NaN and inf, so two reductions replace a full isfinite() mask.
    hi, lo = arr.max(), arr.min()
    if not (np.isfinite(hi) and np.isfinite(lo)):
        raise ValueError(f"{name} contains NaN or inf (after conversion to float32)")
    return arr, max(abs(float(hi)), abs(float(lo)))


def _validate(
    image_emb: Any, text_emb: Any, text_to_image: Any, protocol: str, chunk_size: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    img, img_max = _embeddings(image_emb, "image_emb")
    txt, txt_max = _embeddings(text_emb, "text_emb")
    if img.shape[1] != txt.shape[1]:
        raise ValueError(
            f"embedding dims differ: image_emb has d={img.shape[1]}, text_emb has d={txt.shape[1]}"
        )
    if img.shape[1] * img_max * txt_max > _SCORE_LIMIT:
        raise ValueError("embedding magnitudes too large: inner products could overflow float32")

    t2i = _to_numpy(text_to_image, "text_to_image")
    if t2i.ndim != 1:
        raise ValueError(f"text_to_image must be 1-D, got shape {tuple(t2i.shape)}")
    if t2i.dtype == np.bool_ or not np.issubdtype(t2i.dtype, np.integer):
        raise ValueError(f"text_to_image must be an integer array, got dtype {t2i.dtype}")
    if t2i.shape[0] != txt.shape[0]:
        raise ValueError(
            f"text_to_image has {t2i.shape[0]} entries but text_emb has {txt.shape[0]} captions"
        )
    t2i = t2i.astype(np.int64, copy=False)
    if t2i.min() < 0 or t2i.max() >= img.shape[0]:
        bad = int(np.flatnonzero((t2i < 0) | (t2i >= img.shape[0]))[0])
        raise ValueError(
            f"text_to_image[{bad}] = {int(t2i[bad])} is out of range for {img.shape[0]} images"
        )
    return img, txt, t2i


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _group_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group bit-identical rows: (first index of each group, group of each row, group sizes)."""
    n, d = x.shape
    z = x + np.float32(0.0)  # -0.0 -> +0.0: equal vectors must hash equal
    if d % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.float32)], axis=1)
    # Exact integer hash of the bit pattern (uint64 arithmetic wraps); a collision can only
    # merge distinct rows, which the check below catches.
    w = np.random.default_rng(0x5EED).integers(1, 2**63, size=z.shape[1] // 2, dtype=np.uint64)
    h = z.view(np.uint64) @ (w | np.uint64(1))
    _, first, inv, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    inv = inv.reshape(-1)
    dup = np.flatnonzero(counts[inv] > 1)
    if dup.size and not np.array_equal(z[dup], z[first[inv[dup]]]):
        # hash collision between distinct rows (astronomically rare): exact but slower path
        v = np.ascontiguousarray(z).view(np.dtype((np.void, z.dtype.itemsize * z.shape[1])))
        _, first, inv, counts = np.unique(
            v[:, 0], return_index=True, return_inverse=True, return_counts=True
        )
        inv = inv.reshape(-1)
    return first.astype(np.int64), inv.astype(np.int64), counts.astype(np.int64)


def _runs(w: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values in ``w`` as (start, stop, value)."""
    if w.size == 0:
        return []
    cut = np.flatnonzero(w[1:] != w[:-1]) + 1
    starts = np.concatenate([[0], cut])
    stops = np.concatenate([cut, [w.size]])
    return [(int(a), int(b), int(w[a])) for a, b in zip(starts, stops)]


def _run_starts(key_sorted: np.ndarray, n_keys: int) -> np.ndarray:
    """Index of the first element of each key 0..n_keys-1 in ``key_sorted`` (ascending)."""
    return np.searchsorted(key_sorted, np.arange(n_keys))


def _count_ge(values: np.ndarray, thr: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """sum_i weights_i * [values_i >= t] for each t in ``thr``, via one sort of ``values``."""
    if weights is None:
        v = np.sort(values)
        return values.size - np.searchsorted(v, thr, side="left")
    o = np.argsort(values)
    cw = np.concatenate([[0], np.cumsum(weights[o])])
    return cw[-1] - cw[np.searchsorted(values[o], thr, side="left")]


def _weighted_sum_rows(m: np.ndarray, runs: list[tuple[int, int, int]]) -> np.ndarray:
    """sum_b w_b * m[:, b] for a bool matrix whose column weights come in equal runs."""
    if len(runs) == 1 and runs[0][2] == 1:
        return np.count_nonzero(m, axis=1)
    return sum(w * np.count_nonzero(m[:, a:b], axis=1) for a, b, w in runs)


def _weighted_sum_cols(m: np.ndarray, runs: list[tuple[int, int, int]]) -> np.ndarray:
    """sum_r w_r * m[r, :] for a bool matrix whose row weights come in equal runs."""
    # uint8 view + int64 accumulator is the fastest column count numpy offers
    return sum(w * m[a:b].view(np.uint8).sum(axis=0, dtype=np.int64) for a, b, w in runs)


def _row_counts(
    S: np.ndarray,
    thr: np.ndarray,
    start: np.ndarray,
    nq: np.ndarray,
    col_w: np.ndarray,
    col_runs: list[tuple[int, int, int]],
    buf: np.ndarray,
    out: np.ndarray,
) -> None:
    """out[q] = sum_b col_w[b] * [S[r, b] >= thr[q]] for each query q of each row r of S.

    Row r owns queries start[r] : start[r] + nq[r], and ``nq`` is non-increasing, so "rows
    with a k-th query" is a slice and the usual case is one comparison of S per query slot.
    Rows with very many queries are sorted once instead."""
    weights = None if col_runs == [(0, col_w.size, 1)] else col_w
    p = int(np.count_nonzero(nq > _SORT_MIN))
    for r in range(p):
        a = start[r]
        out[a : a + nq[r]] = _count_ge(S[r], thr[a : a + nq[r]], weights)
    for k in range(int(nq[p]) if p < nq.size else 0):
        n = int(np.count_nonzero(nq > k))
        q = start[p:n] + k
        m = np.greater_equal(S[p:n], thr[q][:, None], out=buf[p:n])
        out[q] = _weighted_sum_rows(m, col_runs)


def _col_counts(
    S: np.ndarray,
    thr: np.ndarray,
    start: np.ndarray,
    nq: np.ndarray,
    row_w: np.ndarray,
    acc: np.ndarray,
    buf: np.ndarray,
    sorted_part: bool,
) -> None:
    """acc[q] += sum_r row_w[r] * [S[r, b] >= thr[q]] for each query q of each column b
    (layout as in :func:`_row_counts`, transposed).  ``sorted_part`` selects the columns with
    more than _SORT_MIN queries (one sort each; run per block) or the others (comparisons;
    run per tile)."""
    p = int(np.count_nonzero(nq > _SORT_MIN))
    if sorted_part:
        for b in range(p):
            a = start[b]
            acc[a : a + nq[b]] += _count_ge(S[:, b], thr[a : a + nq[b]], row_w)
        return
    runs = _runs(row_w)
    for k in range(int(nq[p]) if p < nq.size else 0):
        n = int(np.count_nonzero(nq > k))
        q = start[p:n] + k
        m = np.greater_equal(S[:, p:n], thr[q][None, :], out=buf[:, p:n])
        acc[q] += _weighted_sum_cols(m, runs)


def _own_scores(
    rows_t: torch.Tensor, cols_t: torch.Tensor, row: np.ndarray, col: np.ndarray
) -> np.ndarray:
    """Scores rows[row[i]] . cols[col[i]] (``row`` ascending) via batched small GEMMs.

    Groups of _PREPASS_ROWS consecutive rows are multiplied by their own captions only, and
    groups with similar caption counts (same quarter-octave) are batched into one bmm padded
    to their largest count (padding < 19%).  GEMMs, not dot products: they round like the main
    GEMM (dot-product kernels accumulate in another order)."""
    g_rows = _PREPASS_ROWS
    n_rows, n = rows_t.shape[0], row.size
    n_groups = -(-n_rows // g_rows)
    bounds = np.searchsorted(row, np.arange(n_groups + 1) * g_rows)
    bounds[-1] = n
    lens = np.diff(bounds)
    bucket = np.where(lens > 0, np.floor(4 * np.log2(np.maximum(lens, 1))), -1)
    out = np.empty(n, np.float32)
    for bk in np.unique(bucket[lens > 0]):
        gs = np.flatnonzero(bucket == bk)
        width = int(lens[gs].max())
        r_idx = np.minimum(gs[:, None] * g_rows + np.arange(g_rows), n_rows - 1)
        pos = bounds[gs][:, None] + np.arange(width)
        valid = pos < bounds[gs + 1][:, None]
        pos = np.where(valid, pos, bounds[gs][:, None])  # padding repeats a real caption
        A = rows_t[torch.from_numpy(r_idx)]  # (groups, g_rows, d)
        B = cols_t[torch.from_numpy(col[pos])]  # (groups, width, d)
        P = torch.bmm(A, B.transpose(1, 2)).numpy()  # (groups, g_rows, width)
        gi, t = np.nonzero(valid)
        i = pos[gi, t]
        out[i] = P[gi, row[i] - gs[gi] * g_rows, t]
    return out


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def ranks(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    protocol: str = "standard",
    chunk_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks ``(i2t, t2i)`` as int64 arrays.

    ``i2t`` has one entry per image ("standard") or per caption/pair ("diagonal"); ``t2i`` has
    one entry per caption.  Ties are pessimistic (see module docstring).  Raises ValueError on
    bad input (shape/dim mismatch, index out of range, NaN/inf, unknown protocol, and for
    "standard" an image without captions).
    """
    img, txt, t2i = _validate(image_emb, text_emb, text_to_image, protocol, chunk_size)
    chunk = int(chunk_size)
    standard = protocol == "standard"
    n_img, n_txt = img.shape[0], txt.shape[0]
    per_image = np.bincount(t2i, minlength=n_img).astype(np.int64)

    if standard:
        missing = np.flatnonzero(per_image == 0)
        if missing.size:
            raise ValueError(
                f"standard protocol: {missing.size} image(s) have no caption "
                f"(first: image {int(missing[0])})"
            )
        active = np.arange(n_img)
    else:
        active = np.flatnonzero(per_image)  # captionless images are not pair-images

    # Rows = distinct image vectors.  row_w = competitors a row contributes in t2i
    # (= its number of i2t queries): images ("standard") or pair-images ("diagonal").
    # Rows sorted by row_w descending so rows with a k-th query form a prefix.
    g_first, g_inv, g_mult = _group_rows(img[active])
    g_w = g_mult if standard else np.bincount(g_inv, weights=per_image[active]).astype(np.int64)
    r_order = np.argsort(-g_w, kind="stable")
    r_pos = np.empty_like(r_order)
    r_pos[r_order] = np.arange(r_order.size)
    row_w = g_w[r_order]
    rows = img[active[g_first[r_order]]]
    n_rows = rows.shape[0]
    img_row = np.full(n_img, -1, np.int64)
    img_row[active] = r_pos[g_inv]

    # Columns = distinct caption vectors; col_w = multiplicity (= its number of t2i queries).
    c_first, c_inv, c_mult = _group_rows(txt)
    c_order = np.argsort(-c_mult, kind="stable")
    c_pos = np.empty_like(c_order)
    c_pos[c_order] = np.arange(c_order.size)
    col_w = c_mult[c_order]
    cols = txt[c_first[c_order]]
    n_cols = cols.shape[0]
    cap_col = c_pos[c_inv]
    cap_row = img_row[t2i]

    # Captions sorted by (row, image): per block contiguous, and per image contiguous.
    cap_sorted = np.lexsort((t2i, cap_row))
    cap_sorted_row = cap_row[cap_sorted]

    # i2t queries, sorted by row: images ("standard") or captions/pairs ("diagonal").
    # Row r owns queries q_start[r] : q_start[r] + row_w[r].
    q_order = np.argsort(img_row, kind="stable") if standard else cap_sorted
    q_row = img_row[q_order] if standard else cap_sorted_row
    q_start = _run_starts(q_row, n_rows)

    # t2i queries = captions, sorted by column; column b owns t_start[b] : t_start[b] + col_w[b].
    t_order = np.argsort(cap_col, kind="stable")
    t_start = _run_starts(cap_col[t_order], n_cols)
    col_runs = _runs(col_w)

    rows_t = torch.from_numpy(rows)
    cols_t = torch.from_numpy(cols)
    n_blocks = -(-n_rows // chunk)

    # t2i needs each caption's ground-truth score before its column is scanned, i.e. before
    # the block holding its image.  With one block it is read from that block; otherwise a
    # pre-pass of small GEMMs (image rows x their own captions) supplies it.  The caption's
    # own row is then credited explicitly (see the end), so a rounding difference between
    # the two GEMMs can never drop the query's own image from its rank.
    gt = np.empty(n_txt, np.float32)
    own = np.empty(n_txt, np.float32)  # score(caption, own image) from the main GEMM
    i2t = np.empty(q_order.size, np.int64)
    acc = np.zeros(n_txt, np.int64)  # t2i counts in t_order
    with torch.inference_mode():
        if n_blocks > 1:
            gt[cap_sorted] = _own_scores(rows_t, cols_t, cap_sorted_row, cap_col[cap_sorted])
        gt_t = gt[t_order]

        block = torch.empty((min(chunk, n_rows), n_cols), dtype=torch.float32)
        mask = np.empty((min(chunk, n_rows), n_cols), dtype=bool)
        tile = int(np.clip(_TILE_BYTES // (4 * n_cols), 8, 256))
        for s in range(0, n_rows, chunk):
            e = min(s + chunk, n_rows)
            torch.mm(rows_t[s:e], cols_t.T, out=block[: e - s])
            S = block[: e - s].numpy()

            c0, c1 = np.searchsorted(cap_sorted_row, [s, e])
            js = cap_sorted[c0:c1]
            v = S[cap_row[js] - s, cap_col[js]]
            own[js] = v
            if n_blocks == 1:
                gt[:] = own
                gt_t = gt[t_order]

            # ---- i2t thresholds: one per query, compared along its block row
            q0, q1 = q_start[s], (q_start[e] if e < n_rows else q_order.size)
            if standard:
                n_caps = per_image[q_order[q0:q1]]
                first = np.concatenate([[0], np.cumsum(n_caps)[:-1]])
                thr = np.maximum.reduceat(v, first)  # best ground-truth caption score
                # ground-truth captions tying the best one are not competitors
                at_max = np.add.reduceat((v >= np.repeat(thr, n_caps)).astype(np.int64), first)
            else:
                thr = v  # same order: q_order is cap_sorted
            # ---- counting.  i2t: each query against its row; t2i: this block's rows against
            # every caption's ground truth.  Comparisons run on row tiles that stay in cache
            # for both directions; heavily duplicated captions are sorted once per block.
            _col_counts(S, gt_t, t_start, col_w, row_w[s:e], acc, mask, sorted_part=True)
            cnt = np.empty(q1 - q0, np.int64)
            qs = q_start[s:e] - q0
            for a in range(0, e - s, tile):
                b = min(a + tile, e - s)
                _row_counts(S[a:b], thr, qs[a:b], row_w[s + a : s + b], col_w, col_runs,
                            mask[a:b], cnt)
                _col_counts(S[a:b], gt_t, t_start, col_w, row_w[s + a : s + b], acc, mask[a:b],
                            sorted_part=False)
            i2t[q0:q1] = (1 + cnt - at_max) if standard else cnt

    i2t_ranks = np.empty_like(i2t)
    i2t_ranks[q_order] = i2t
    t2i_cnt = np.empty_like(acc)
    t2i_cnt[t_order] = acc
    w_own = row_w[cap_row]
    # replace the own row's counted contribution by its full weight (own image + duplicates)
    t2i_ranks = t2i_cnt - w_own * (own >= gt) + w_own
    return i2t_ranks, t2i_ranks


def evaluate(
    image_emb: Any,
    text_emb: Any,
    text_to_image: Any,
    protocol: str = "standard",
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@{1,5,10} (percent), their sum ``rsum`` and median ranks for both directions."""
    r_i2t, r_t2i = ranks(image_emb, text_emb, text_to_image, protocol, chunk_size)
    out: dict[str, float] = {}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in RECALL_KS:
            out[f"{name}_r{k}"] = float(100.0 * np.count_nonzero(r <= k) / r.size)
    out["rsum"] = float(sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in RECALL_KS))
    out["i2t_medr"] = float(np.median(r_i2t))
    out["t2i_medr"] = float(np.median(r_t2i))
    return out
