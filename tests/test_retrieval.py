"""Tests for rcsr_ray.eval.retrieval: exact ranks vs a brute-force reference, tie semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcsr_ray.eval import retrieval
from rcsr_ray.eval.retrieval import PROTOCOLS, evaluate, ranks

PROTOS = list(PROTOCOLS)
KEYS = {
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"
}


# ------------------------------------------------------------------------------------------
# brute-force reference: full float64 score matrix, one Python loop per query
# ------------------------------------------------------------------------------------------
def ref_ranks(img, txt, t2i, protocol):
    S = np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T
    t2i = np.asarray(t2i)
    n_img, n_txt = S.shape
    if protocol == "standard":
        i2t = []
        for i in range(n_img):
            gt = t2i == i
            best = S[i, gt].max()
            i2t.append(1 + int(np.sum(S[i, ~gt] >= best)))
        t2i_r = []
        for j in range(n_txt):
            own = S[t2i[j], j]
            others = np.arange(n_img) != t2i[j]
            t2i_r.append(1 + int(np.sum(S[others, j] >= own)))
    else:
        P = S[t2i]  # pair-images (one duplicated image row per caption) x captions
        i2t, t2i_r = [], []
        for p in range(n_txt):
            others = np.arange(n_txt) != p
            i2t.append(1 + int(np.sum(P[p, others] >= P[p, p])))
            t2i_r.append(1 + int(np.sum(P[others, p] >= P[p, p])))
    return np.array(i2t), np.array(t2i_r)


def ref_metrics(r_i2t, r_t2i):
    out = {}
    for name, r in (("i2t", r_i2t), ("t2i", r_t2i)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.mean(r <= k)
    out["rsum"] = sum(out[k] for k in list(out))
    out["i2t_medr"] = float(np.median(r_i2t))
    out["t2i_medr"] = float(np.median(r_t2i))
    return out


def make_data(seed, n_img, d, *, dyadic, max_caps=5):
    """Variable 1..max_caps captions per image, shuffled caption order."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_caps + 1, n_img)
    t2i = rng.permutation(np.repeat(np.arange(n_img), counts))
    if dyadic:
        # small dyadic coordinates: every score is exact in float32 and exact ties abound
        img = rng.integers(-2, 3, (n_img, d)).astype(np.float32) / 2
        txt = rng.integers(-2, 3, (t2i.size, d)).astype(np.float32) / 4
    else:
        img = rng.standard_normal((n_img, d)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = img[t2i] + 0.8 * rng.standard_normal((t2i.size, d)).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, t2i


def min_margin(img, txt, t2i, protocol):
    """Smallest non-zero |competitor - threshold| gap (float64); guards the continuous-data
    tests against near-ties that float32 rounding could legitimately flip.  Zero gaps are the
    exact ties of duplicated pair-images, which the implementation resolves exactly."""
    S = img.astype(np.float64) @ txt.astype(np.float64).T
    gaps = []
    own = S[t2i, np.arange(t2i.size)]
    if protocol == "standard":
        for i in range(S.shape[0]):
            gt = t2i == i
            gaps.append(np.abs(S[i, ~gt] - S[i, gt].max()))
        mask = np.ones_like(S, bool)
        mask[t2i, np.arange(t2i.size)] = False
        gaps.append(np.abs(S - own[None])[mask])
    else:
        P = S[t2i]
        off = ~np.eye(t2i.size, dtype=bool)
        gaps.append(np.abs(P - own[:, None])[off])
        gaps.append(np.abs(P - own[None, :])[off])
    return min(float(g[g > 0].min()) for g in gaps if np.any(g > 0))


# ------------------------------------------------------------------------------------------
# agreement with the reference
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOS)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 16, 1024])
def test_matches_reference_exact_ties(protocol, chunk_size):
    for seed in range(4):
        img, txt, t2i = make_data(seed, n_img=23, d=3, dyadic=True)
        got = ranks(img, txt, t2i, protocol=protocol, chunk_size=chunk_size)
        want = ref_ranks(img, txt, t2i, protocol)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("protocol", PROTOS)
@pytest.mark.parametrize("chunk_size", [5, 13, 64, 4096])
def test_matches_reference_continuous(protocol, chunk_size):
    img, txt, t2i = make_data(13, n_img=40, d=16, dyadic=False)
    assert min_margin(img, txt, t2i, protocol) > 1e-5  # test precondition: no near-ties
    got = ranks(img, txt, t2i, protocol=protocol, chunk_size=chunk_size)
    want = ref_ranks(img, txt, t2i, protocol)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    m = evaluate(img, txt, t2i, protocol=protocol, chunk_size=chunk_size)
    exp = ref_metrics(*want)
    assert set(m) == KEYS
    for k in KEYS:
        assert isinstance(m[k], float)
        assert m[k] == pytest.approx(exp[k], abs=1e-9)
    assert 0 < m["rsum"] < 600  # non-trivial data


@pytest.mark.parametrize("protocol", PROTOS)
@pytest.mark.parametrize("prepass_rows", [1, 3, None])
def test_many_blocks_with_duplicates(protocol, prepass_rows, monkeypatch):
    # 2-D dyadic vectors: many bit-identical images/captions spread across blocks.  Small
    # pre-pass groups give many groups of unequal caption counts (several bmm buckets).
    if prepass_rows is not None:
        monkeypatch.setattr(retrieval, "_PREPASS_ROWS", prepass_rows)
    img, txt, t2i = make_data(3, n_img=150, d=2, dyadic=True)
    want = ref_ranks(img, txt, t2i, protocol)
    for cs in (10, 32, 1000):
        got = ranks(img, txt, t2i, protocol=protocol, chunk_size=cs)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("protocol", PROTOS)
@pytest.mark.parametrize("sort_min", [0, 2, None])
def test_heavily_duplicated_lines(protocol, sort_min, monkeypatch):
    # d=1: only 5 distinct vectors per side, so rows/columns carry 40-400 queries each; the
    # per-line sort path (lines with > _SORT_MIN queries) must agree with the compare path.
    # d=6: (almost) distinct captions, i.e. unit column weights, with small sort_min.
    if sort_min is not None:
        monkeypatch.setattr(retrieval, "_SORT_MIN", sort_min)
    for n_img, d in ((200, 1), (40, 6)):
        img, txt, t2i = make_data(7, n_img=n_img, d=d, dyadic=True)
        want = ref_ranks(img, txt, t2i, protocol)
        for cs in (2, 1024):
            got = ranks(img, txt, t2i, protocol=protocol, chunk_size=cs)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_own_scores_prepass_matches_matmul(monkeypatch):
    monkeypatch.setattr(retrieval, "_PREPASS_ROWS", 4)
    rng = np.random.default_rng(0)
    rows = rng.integers(-3, 4, (37, 6)).astype(np.float32)
    cols = rng.integers(-3, 4, (90, 6)).astype(np.float32)
    row = np.sort(rng.integers(0, 37, 300))
    row[:40] = 0  # one heavy row -> unequal group sizes, several buckets
    row.sort()
    col = rng.integers(0, 90, 300)
    got = retrieval._own_scores(torch.from_numpy(rows), torch.from_numpy(cols), row, col)
    np.testing.assert_array_equal(got, np.einsum("nd,nd->n", rows[row], cols[col]))


def test_rank_shapes_and_torch_inputs():
    img, txt, t2i = make_data(5, n_img=12, d=8, dyadic=False)
    a = ranks(img, txt, t2i, "standard")
    assert a[0].shape == (12,) and a[1].shape == (t2i.size,)
    assert a[0].dtype == np.int64 and a[1].dtype == np.int64
    d = ranks(img, txt, t2i, "diagonal")
    assert d[0].shape == (t2i.size,) and d[1].shape == (t2i.size,)
    # torch tensors (float64, non-contiguous) and a list index give identical results
    timg = torch.from_numpy(img.astype(np.float64).T.copy()).T
    b = ranks(timg, torch.from_numpy(txt), torch.from_numpy(t2i), "standard")
    c = ranks(img, txt, t2i.tolist(), "standard")
    for x in (b, c):
        np.testing.assert_array_equal(x[0], a[0])
        np.testing.assert_array_equal(x[1], a[1])


# ------------------------------------------------------------------------------------------
# tie semantics
# ------------------------------------------------------------------------------------------
# 3 images, 6 captions, d=2.  Score matrix (images x captions):
#        T0 T1 T2 T3 T4 T5
#   I0 [  1  0  0  1  1  2 ]    captions 0,1 -> I0
#   I1 [  0  1  1  1  1  0 ]    captions 2,3 -> I1
#   I2 [  1  1  1  2  2  2 ]    captions 4,5 -> I2
TINY_IMG = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
TINY_TXT = np.array([[1, 0], [0, 1], [0, 1], [1, 1], [1, 1], [2, 0]], np.float32)
TINY_T2I = np.array([0, 0, 1, 1, 2, 2])


def test_tiny_hand_computed_standard():
    i2t, t2i = ranks(TINY_IMG, TINY_TXT, TINY_T2I, "standard")
    # I0: best GT 1; non-GT T3,T4,T5 >= 1 -> 4.  I1: best 1; T1,T4 -> 3.  I2: best 2; T3 -> 2.
    assert i2t.tolist() == [4, 3, 2]
    # T0: I2 ties (1) -> 2; T1 (0): I1,I2 -> 3; T2 (1): I2 ties -> 2; T3 (1): I0 ties, I2 -> 3;
    # T4 (2): none -> 1; T5 (2): I0 ties at 2 -> 2.
    assert t2i.tolist() == [2, 3, 2, 3, 1, 2]
    m = evaluate(TINY_IMG, TINY_TXT, TINY_T2I, "standard")
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0 and m["i2t_medr"] == 3.0
    assert m["t2i_r1"] == pytest.approx(100 / 6) and m["t2i_medr"] == 2.0


def test_tiny_hand_computed_diagonal():
    # pair-images are [I0, I0, I1, I1, I2, I2]
    i2t, t2i = ranks(TINY_IMG, TINY_TXT, TINY_T2I, "diagonal")
    # p0 row I0, own 1: T3,T4,T5 -> 4; p1 own 0: all 5 others -> 6; p2,p3 row I1, own 1:
    # three other 1s -> 4; p4,p5 row I2, own 2: two other 2s -> 3.
    assert i2t.tolist() == [4, 6, 4, 4, 3, 3]
    # column T0 [1,1,0,0,1,1] own 1 -> 4 (duplicate pair-image counts as a miss);
    # T1 [0,0,1,1,1,1] own 0 -> 6; T2 same column, own 1 -> 4; T3 [1,1,1,1,2,2] own 1 -> 6;
    # T4 same column, own 2 -> 2; T5 [2,2,0,0,2,2] own 2 -> 4.
    assert t2i.tolist() == [4, 6, 4, 6, 2, 4]
    for proto in PROTOS:
        want = ref_ranks(TINY_IMG, TINY_TXT, TINY_T2I, proto)
        got = ranks(TINY_IMG, TINY_TXT, TINY_T2I, proto)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_duplicates_are_pessimistic():
    # image 1 is a copy of image 0, caption 2 a copy of caption 0
    img = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
    txt = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], np.float32)
    t2i = np.array([0, 2, 1, 2])
    i2t, t2i_r = ranks(img, txt, t2i, "standard")
    # I0: GT T0 (1); non-GT T2 ties -> 2.  I1: GT T2 (1); T0 ties -> 2.  I2: GT T1,T3 -> 1.
    assert i2t.tolist() == [2, 2, 1]
    # T0: own I0 = 1, duplicate I1 ties -> 2; T2 likewise; T1, T3 -> 1.
    assert t2i_r.tolist() == [2, 1, 2, 1]
    # -0.0 and +0.0 are the same vector
    img_neg0 = img.copy()
    img_neg0[1, 1] = -0.0
    assert ranks(img_neg0, txt, t2i, "standard")[0].tolist() == [2, 2, 1]


def test_perfect_alignment_is_perfect():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((50, 32)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    t2i = np.repeat(np.arange(50), 5)
    txt = img[t2i]
    m = evaluate(img, txt, t2i, "standard", chunk_size=16)
    for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert m[k] == 100.0
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_medr"] == 1.0
    # one caption per image: the diagonal protocol is perfect too
    one = np.arange(50)
    m = evaluate(img, img, one, "diagonal", chunk_size=7)
    assert m["rsum"] == 600.0 and m["i2t_medr"] == 1.0 and m["t2i_medr"] == 1.0


@pytest.mark.parametrize("protocol", PROTOS)
@pytest.mark.parametrize("chunk_size", [7, 1024])
def test_constant_embeddings_score_near_zero(protocol, chunk_size):
    v = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    v /= np.linalg.norm(v)  # not exactly representable: exercises rounding, not just ties
    n = 100
    img = np.tile(v, (n, 1))
    t2i = np.repeat(np.arange(n), 5)
    txt = np.tile(v, (t2i.size, 1))
    m = evaluate(img, txt, t2i, protocol, chunk_size=chunk_size)
    assert m["rsum"] == 0.0
    i2t, t2i_r = ranks(img, txt, t2i, protocol, chunk_size=chunk_size)
    if protocol == "standard":
        assert (i2t == 1 + t2i.size - 5).all() and (t2i_r == n).all()
    else:
        assert (i2t == t2i.size).all() and (t2i_r == t2i.size).all()


def test_diagonal_ignores_captionless_images_standard_rejects_them():
    img, txt, t2i = make_data(2, n_img=10, d=3, dyadic=True)
    extra = np.vstack([img, np.full((2, 3), 0.5, np.float32)])  # images 10, 11 uncaptioned
    got = ranks(extra, txt, t2i, "diagonal", chunk_size=4)
    want = ref_ranks(img, txt, t2i, "diagonal")
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    with pytest.raises(ValueError, match="no caption"):
        ranks(extra, txt, t2i, "standard")


# ------------------------------------------------------------------------------------------
# input validation
# ------------------------------------------------------------------------------------------
def _ok():
    return TINY_IMG.copy(), TINY_TXT.copy(), TINY_T2I.copy()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda i, t, m: (np.where(i == 1, np.nan, i), t, m), "image_emb contains NaN"),
        (lambda i, t, m: (i, np.where(t == 2, np.inf, t), m), "text_emb contains NaN or inf"),
        (lambda i, t, m: (i, t, np.array([0, 0, 1, 1, 2, 3])), r"text_to_image\[5\] = 3"),
        (lambda i, t, m: (i, t, np.array([0, -1, 1, 1, 2, 2])), "out of range"),
        (lambda i, t, m: (i, t, m[:5]), "5 entries"),
        (lambda i, t, m: (i, t, m.astype(np.float32)), "integer"),
        (lambda i, t, m: (i, t[:, :1], m), "dims differ"),
        (lambda i, t, m: (i[0], t, m), "2-D"),
        (lambda i, t, m: (i * np.float32(1e30), t * np.float32(1e30), m), "overflow"),
    ],
)
def test_bad_input_raises(mutate, match):
    img, txt, t2i = mutate(*_ok())
    with pytest.raises(ValueError, match=match):
        evaluate(img, txt, t2i)


def test_bad_protocol_and_chunk_size():
    img, txt, t2i = _ok()
    with pytest.raises(ValueError, match="standard, diagonal"):
        evaluate(img, txt, t2i, protocol="paper")
    with pytest.raises(ValueError, match="chunk_size"):
        ranks(img, txt, t2i, chunk_size=0)
    with pytest.raises(ValueError, match="NaN"):
        ranks(torch.full((3, 2), float("nan")), txt, t2i)
