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

# Row sub-chunk for the ground-truth pre-pass (small GEMMs, cheap).
_PREPASS_ROWS = 64
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
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
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


def _slots(key_sorted: np.ndarray, n_keys: int) -> np.ndarray:
    """Position of each element inside its run of equal keys (keys sorted ascending)."""
    first = np.searchsorted(key_sorted, np.arange(n_keys))
    return np.arange(key_sorted.size) - first[key_sorted]


def _row_counts(
    S: np.ndarray,
    thr: np.ndarray,
    nq: np.ndarray,
    col_runs: list[tuple[int, int, int]],
    buf: np.ndarray,
) -> np.ndarray:
    """out[r, k] = sum_b colweight_b * [S[r, b] >= thr[r, k]] for rows with nq[r] > k.

    ``nq`` is non-increasing, so the rows having a k-th query are a prefix (no gathers)."""
    c, n_slots = thr.shape
    out = np.zeros((c, n_slots), np.int64)
    unit = len(col_runs) == 1 and col_runs[0][2] == 1
    for k in range(n_slots):
        n = int(np.count_nonzero(nq > k))
        if n == 0:
            break
        m = np.greater_equal(S[:n], thr[:n, k : k + 1], out=buf[:n])
        if unit:
            out[:n, k] = np.count_nonzero(m, axis=1)
        else:
            for a, b, wt in col_runs:
                out[:n, k] += wt * np.count_nonzero(m[:, a:b], axis=1)
    return out


def _col_counts(
    S: np.ndarray,
    gt: np.ndarray,
    col_prefix: np.ndarray,
    row_runs: list[tuple[int, int, int]],
    acc: np.ndarray,
    buf: np.ndarray,
) -> None:
    """acc[b, k] += sum_r rowweight_r * [S[r, b] >= gt[b, k]] for columns with a k-th query."""
    for k in range(gt.shape[1]):
        m_k = int(col_prefix[k])
        m = np.greater_equal(S[:, :m_k], gt[None, :m_k, k], out=buf[:, :m_k])
        for a, b, wt in row_runs:
            # uint8 view + int64 accumulator is the fastest column count numpy offers
            acc[:m_k, k] += wt * m[a:b].view(np.uint8).sum(axis=0, dtype=np.int64)


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

    # Captions sorted by (row, image): per block, per image contiguous.
    cap_sorted = np.lexsort((t2i, cap_row))
    cap_sorted_row = cap_row[cap_sorted]

    # i2t queries: images ("standard") or captions ("diagonal"), sorted by row.
    if standard:
        q_order = np.argsort(img_row, kind="stable")
    else:
        q_order = cap_sorted
    q_row = img_row[q_order] if standard else cap_sorted_row
    q_slot = _slots(q_row, n_rows)
    n_rslots = int(row_w[0])

    # t2i queries: captions, slot = position among duplicates of the same caption vector.
    t_order = np.argsort(cap_col, kind="stable")
    t_slot = np.empty(n_txt, np.int64)
    t_slot[t_order] = _slots(cap_col[t_order], n_cols)
    n_cslots = int(col_w[0])
    col_prefix = np.array([np.count_nonzero(col_w > k) for k in range(n_cslots)], np.int64)
    col_runs = _runs(col_w)

    rows_t = torch.from_numpy(rows)
    cols_t = torch.from_numpy(cols)
    n_blocks = -(-n_rows // chunk)

    # t2i needs each caption's ground-truth score before its column is scanned, i.e. before
    # the block holding its image.  With one block it is read from that block; otherwise a
    # cheap pre-pass of small GEMMs (image rows x their own captions) supplies it.  Each
    # caption's own row is then counted explicitly, so rounding differences between the two
    # GEMMs can never drop the query's own image.
    gt = np.empty(n_txt, np.float32)
    gt_pad = np.empty((n_cols, n_cslots), np.float32)
    with torch.inference_mode():
        if n_blocks > 1:
            for s in range(0, n_rows, _PREPASS_ROWS):
                e = min(s + _PREPASS_ROWS, n_rows)
                c0, c1 = np.searchsorted(cap_sorted_row, [s, e])
                js = cap_sorted[c0:c1]
                B = (rows_t[s:e] @ cols_t[torch.from_numpy(cap_col[js])].T).numpy()
                gt[js] = B[cap_row[js] - s, np.arange(js.size)]
            gt_pad[cap_col, t_slot] = gt

        own = np.empty(n_txt, np.float32)  # score(caption, own image) from the main GEMM
        i2t = np.empty(q_order.size, np.int64)
        acc = np.zeros((n_cols, n_cslots), np.int64)
        block = torch.empty((min(chunk, n_rows), n_cols), dtype=torch.float32)
        mask = np.empty((min(chunk, n_rows), n_cols), dtype=bool)
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
                gt_pad[cap_col, t_slot] = gt

            # ---- i2t: thresholds per query, counted along the block rows
            q0, q1 = np.searchsorted(q_row, [s, e])
            if standard:
                imgs = q_order[q0:q1]
                n_caps = per_image[imgs]
                starts = np.concatenate([[0], np.cumsum(n_caps)[:-1]])
                thr_q = np.maximum.reduceat(v, starts)  # best ground-truth caption score
                # ground-truth captions tying the best one are not competitors
                at_max = np.add.reduceat((v >= np.repeat(thr_q, n_caps)).astype(np.int64), starts)
            else:
                thr_q = v
            thr = np.empty((e - s, n_rslots), np.float32)
            thr[q_row[q0:q1] - s, q_slot[q0:q1]] = thr_q
            rc = _row_counts(S, thr, row_w[s:e], col_runs, mask[: e - s])
            cnt = rc[q_row[q0:q1] - s, q_slot[q0:q1]]
            i2t[q0:q1] = (1 + cnt - at_max) if standard else cnt

            # ---- t2i: accumulate column counts of this block against ground-truth scores
            _col_counts(S, gt_pad, col_prefix, _runs(row_w[s:e]), acc, mask[: e - s])

    i2t_ranks = np.empty_like(i2t)
    i2t_ranks[q_order] = i2t
    w_own = row_w[cap_row]
    # replace the own row's counted contribution by its full weight (own image + duplicates)
    t2i_ranks = acc[cap_col, t_slot] - w_own * (own >= gt) + w_own
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
