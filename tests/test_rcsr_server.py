"""RCSR server state: minimax weights, fusion, EMA global prototypes, router loss and training."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rcsr_ray.fl.rcsr_server import (GlobalPrototypes, RouterTrainer, client_alignment, fuse_weights,
                                     minimax_update, prototype_coherence, router_loss, weight_entropy)
from rcsr_ray.models.router import SemanticRouter

# ---------------------------------------------------------------------------------------------- minimax


def test_minimax_matches_hand_computation():
    q = torch.full((4,), 0.25, dtype=torch.float64)
    new = minimax_update(q, torch.tensor([0, 2]), torch.tensor([1.0, 2.0]), eta=0.1, tau=0.1)
    # q*exp(eta*loss) = [.25e^.1, .25, .25e^.2, .25]; ^(1/1.1); renormalise.
    raw = [(0.25 * math.exp(0.1)) ** (1 / 1.1), 0.25 ** (1 / 1.1), (0.25 * math.exp(0.2)) ** (1 / 1.1), 0.25 ** (1 / 1.1)]
    expected = torch.tensor([r / sum(raw) for r in raw], dtype=torch.float64)
    assert torch.allclose(new, expected, atol=1e-12)
    assert torch.allclose(new, torch.tensor([0.2550128597, 0.2328524248, 0.2792822907, 0.2328524248],
                                            dtype=torch.float64), atol=1e-9)
    assert new.dtype == torch.float64
    assert torch.equal(q, torch.full((4,), 0.25, dtype=torch.float64))  # input untouched


def test_minimax_stays_a_distribution_and_favours_high_loss():
    q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for r in range(20):
        q = minimax_update(q, torch.tensor([r % 4, (r + 1) % 4]), torch.tensor([5.0, 0.1]))
        assert (q >= 0).all() and math.isclose(float(q.sum()), 1.0, rel_tol=0, abs_tol=1e-12)
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    new = minimax_update(q, torch.tensor([0, 1]), torch.tensor([0.5, 3.0]))
    assert new[1] > new[0] > new[2]
    huge = minimax_update(q, torch.tensor([0]), torch.tensor([1e5]))  # no overflow
    assert torch.isfinite(huge).all() and math.isclose(float(huge.sum()), 1.0, abs_tol=1e-12)


def test_minimax_skips_non_finite_losses():
    q = torch.full((3,), 1 / 3, dtype=torch.float64)
    new = minimax_update(q, torch.tensor([0, 1]), torch.tensor([float("nan"), 0.0]))
    assert torch.allclose(new, q, atol=1e-15)  # nan skipped, loss 0 changes nothing, uniform stays uniform
    with pytest.raises(ValueError):
        minimax_update(q, torch.tensor([0, 1]), torch.tensor([1.0]))


# ---------------------------------------------------------------------------------------------- fusion


def test_fuse_is_normalised_product():
    w = fuse_weights(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64))
    # products 0.10, 0.06, 0.12 -> / 0.28
    assert torch.allclose(w, torch.tensor([0.10, 0.06, 0.12], dtype=torch.float64) / 0.28, atol=1e-7)
    assert torch.allclose(fuse_weights(torch.zeros(2), torch.ones(2)), torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_entropy_and_coherence():
    assert math.isclose(weight_entropy(torch.full((4,), 0.25)), math.log(4), rel_tol=1e-6)
    assert weight_entropy(torch.tensor([1.0, 0.0])) == 0.0
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # third client has no text
    assert math.isclose(prototype_coherence(img, txt), 0.5, abs_tol=1e-12)
    assert math.isclose(prototype_coherence(img, txt, torch.tensor([[1, 1], [1, 0], [1, 0]])), 1.0, abs_tol=1e-12)
    assert math.isnan(prototype_coherence(img, torch.zeros(3, 2)))


# ---------------------------------------------------------------------------------------------- prototypes


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def round_one():
    # Client A: paired, cluster 0 only. Client B: image-only, cluster 0.
    a = {"image_sum": t([[2, 0], [0, 0]]), "image_count": t([2, 0]),
         "text_sum": t([[0, 2], [0, 0]]), "text_count": t([1, 0])}
    b = {"image_sum": t([[0, 3], [0, 0]]), "image_count": t([3, 0]), "text_sum": None, "text_count": None}
    return [a, b], torch.tensor([0.25, 0.75])


def test_first_update_takes_weighted_mean_and_skips_empty_clusters():
    g = GlobalPrototypes(num_clusters=2, dim=2, decay=0.95)
    g.update(*round_one())
    # image c0: 0.25*[1,0] + 0.75*[0,1]; text c0: only A has text, weight renormalised to 1 -> [0,2]
    assert torch.allclose(g.image[0], t([0.25, 0.75]))
    assert torch.allclose(g.text[0], t([0.0, 2.0]))
    assert torch.equal(g.image[1], t([0, 0])) and torch.equal(g.text[1], t([0, 0]))
    assert g.seen.tolist() == [[True, True], [False, False]]
    # alignment: normalize([0.25, 0.75] - [0, 2]) = [0.25, -1.25] / sqrt(1.625)
    assert torch.allclose(g.global_align(), t([0.25, -1.25]) / math.sqrt(1.625), atol=1e-6)


def test_second_update_is_ema():
    g = GlobalPrototypes(num_clusters=2, dim=2, decay=0.95)
    g.update(*round_one())
    align1 = g.global_align()
    a = {"image_sum": t([[3, 0], [4, 2]]), "image_count": t([1, 2]),
         "text_sum": t([[0, 0], [0, 1]]), "text_count": t([0, 1])}
    g.update([a], torch.tensor([1.0]))
    # image c0 seen before: 0.95*[0.25, 0.75] + 0.05*[3, 0] = [0.3875, 0.7125]
    assert torch.allclose(g.image[0], t([0.3875, 0.7125]), atol=1e-6)
    # image c1 first seen: taken directly [4,2]/2; text c0 not sent: unchanged; text c1 first seen
    assert torch.allclose(g.image[1], t([2.0, 1.0]))
    assert torch.allclose(g.text[0], t([0.0, 2.0]))
    assert torch.allclose(g.text[1], t([0.0, 1.0]))
    assert g.seen.all()
    # align: only c1 has both this round: normalize([2,1]-[0,1]) = [1,0]; EMA with the first direction
    assert torch.allclose(g.global_align(), 0.95 * align1 + 0.05 * t([1.0, 0.0]), atol=1e-6)
    img, txt = g.pooled()
    assert torch.allclose(img, (t([0.3875, 0.7125]) + t([2.0, 1.0])) / 2, atol=1e-6)


def test_global_granularity_folds_clusters():
    sums, counts = GlobalPrototypes.collapse(t([[2, 0], [0, 4]]), t([2, 2]))
    assert torch.equal(sums, t([[2, 4]])) and torch.equal(counts, t([4]))
    g = GlobalPrototypes(num_clusters=2, dim=2, granularity="global")
    a = {"image_sum": t([[2, 0], [0, 4]]), "image_count": t([2, 2]),
         "text_sum": t([[1, 0], [0, 0]]), "text_count": t([1, 0])}
    g.update([a], torch.tensor([1.0]))
    assert g.image.shape == (1, 2)
    assert torch.allclose(g.image[0], t([0.5, 1.0]))
    view = g.client_view()  # repeated per cluster so clients index by cluster id in both modes
    assert view["image"].shape == (2, 2) and torch.allclose(view["image"][1], t([0.5, 1.0]))
    assert view["seen"].all()
    with pytest.raises(ValueError):
        GlobalPrototypes(2, 2, granularity="per-client")


def test_pool_clients_fills_missing_modality_from_global():
    g = GlobalPrototypes(num_clusters=2, dim=2)
    g.update(*round_one())
    clients, _ = round_one()
    img, txt, has = g.pool_clients(clients)
    assert has.tolist() == [[True, True], [True, False]]
    assert torch.allclose(img, t([[1, 0], [0, 1]]))
    assert torch.allclose(txt[0], t([0, 2]))
    assert torch.allclose(txt[1], g.text[0])  # B's images are in cluster 0 -> global text of cluster 0


def test_prototypes_gathered_once_give_what_the_dicts_give():
    clients, w = round_one()
    by_dicts, gathered = GlobalPrototypes(num_clusters=2, dim=2), GlobalPrototypes(num_clusters=2, dim=2)
    by_dicts.update(clients, w)
    gathered.update(gathered.gather(clients), w)
    assert torch.equal(by_dicts.image, gathered.image) and torch.equal(by_dicts.text, gathered.text)
    # A second round where B also sends text: its clusters now have both, and A's text is pooled.
    b_text = {**clients[1], "text_sum": t([[0, 0], [1, 3]]), "text_count": t([0, 2])}
    again = [clients[0], b_text]
    reported = gathered.gather(again)
    text = reported.sums["text"]
    assert len(reported) == 2 and text.sums.dtype == torch.float64
    # Only the clusters with samples, by client: A's cluster 0, then B's cluster 1.
    assert text.client.tolist() == [0, 1] and text.cluster.tolist() == [0, 1]
    assert torch.equal(text.sums, torch.tensor([[0.0, 2.0], [1.0, 3.0]], dtype=torch.float64))
    assert torch.equal(text.cluster_counts, torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    for got, want in zip(gathered.pool_clients(reported), by_dicts.pool_clients(again)):
        assert torch.equal(got, want)
    assert torch.allclose(gathered.pool_clients(reported)[1][1], t([0.5, 1.5]))  # B's captions pooled: [1,3]/2
    by_dicts.update(again, w)
    gathered.update(reported, w)
    assert torch.equal(by_dicts.text, gathered.text) and torch.equal(by_dicts.global_align(), gathered.global_align())
    with pytest.raises(ValueError, match="3 weights"):
        gathered.update(reported, torch.ones(3))


def _fused_by_loop(g, client_protos, weights, modality):
    """GlobalPrototypes' fusion as a loop over the clients, in their order (its definition)."""
    c = len(g.image)
    num, uniform = torch.zeros(c, g.dim, dtype=torch.float64), torch.zeros(c, g.dim, dtype=torch.float64)
    wsum, contributors = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)
    for proto, w in zip(client_protos, weights):
        if proto.get(f"{modality}_sum") is None:
            continue
        sums, counts = proto[f"{modality}_sum"].double(), proto[f"{modality}_count"].double()
        has = counts > 0
        mean = torch.where(has[:, None], sums / counts.clamp_min(1)[:, None], 0.0)
        num += w * mean
        wsum += torch.where(has, w, 0.0)
        contributors += has.double()
        uniform += mean
    values = torch.where((wsum > 0)[:, None], num / wsum.clamp_min(1e-300)[:, None],
                         uniform / contributors.clamp_min(1)[:, None])
    return values, contributors > 0


def test_fusion_over_rows_adds_clients_in_order_as_a_loop_does():
    """The fusion sums each cluster's rows with index_add_, which must add them in the round's client
    order: bit for bit what a loop over the clients gives, at a size where order shows in the bits."""
    gen = torch.Generator().manual_seed(3)
    k, c, dim = 40, 12, 64
    g = GlobalPrototypes(num_clusters=c, dim=dim)
    protos = []
    for i in range(k):
        proto = {}
        for modality in ("image", "text"):
            if (i + (modality == "text")) % 5 == 0:
                proto[f"{modality}_sum"] = proto[f"{modality}_count"] = None  # lacks it
                continue
            counts = torch.randint(0, 4, (c,), generator=gen).float() * (torch.rand(c, generator=gen) < 0.4)
            proto[f"{modality}_sum"] = torch.randn(c, dim, generator=gen) * counts[:, None]
            proto[f"{modality}_count"] = counts
        protos.append(proto)
    weights = torch.rand(k, generator=gen, dtype=torch.float64)
    weights[::7] = 0.0
    weights /= weights.sum()
    reported = g.gather(protos)
    for modality in ("image", "text"):
        values, contributed = g._fused(reported, weights, modality)
        want, want_contributed = _fused_by_loop(g, protos, weights, modality)
        assert torch.equal(contributed, want_contributed) and contributed.sum() > c // 2
        assert torch.equal(values, want)


def test_prototypes_state_dict_round_trip():
    g = GlobalPrototypes(num_clusters=2, dim=2)
    g.update(*round_one())
    h = GlobalPrototypes(num_clusters=2, dim=2)
    h.load_state_dict(g.state_dict())
    assert torch.equal(h.image, g.image) and torch.equal(h.seen, g.seen) and torch.equal(h.global_align(), g.global_align())
    with pytest.raises(ValueError):
        GlobalPrototypes(num_clusters=3, dim=2).load_state_dict(g.state_dict())


# ---------------------------------------------------------------------------------------------- router loss


def test_router_loss_hand_values():
    img = t([[1, 0], [0, 1]])
    txt = t([[0, 1], [1, 0]])
    a_k = client_alignment(img, txt)  # [1,-1]/sqrt2, [-1,1]/sqrt2
    w = t([1.0, 0.0])
    loss, parts = router_loss(w, img, txt, t([1, 0]), t([1, 0]), a_k, t([1, -1]) / math.sqrt(2))
    # g^_I = [1,0] matches, g^_T = [0,1] orthogonal to [1,0]; H=0; a^ = a_0 = a
    assert math.isclose(parts["image_consistency"], 0.0, abs_tol=1e-6)
    assert math.isclose(parts["text_consistency"], 1.0, abs_tol=1e-6)
    assert math.isclose(parts["entropy"], 0.0, abs_tol=1e-6)
    assert math.isclose(parts["alignment"], 0.0, abs_tol=1e-6)
    assert math.isclose(float(loss), 1.0, abs_tol=1e-6)
    _, none_align = router_loss(w, img, txt, t([1, 0]), t([1, 0]), a_k, None)
    assert math.isclose(none_align["loss"], 1.0, abs_tol=1e-6)


def toy_round(k=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    txt = F.normalize(torch.randn(k, dim, generator=g), dim=-1)
    tokens = SemanticRouter.build_tokens(img, txt, torch.rand(k, 4, generator=g), torch.ones(k, 2),
                                         torch.rand(k, generator=g))
    g_img, g_txt = img[:2].mean(0), txt[:2].mean(0)  # global prototypes close to two of the clients
    return tokens, img, txt, g_img, g_txt, client_alignment(img, txt), F.normalize(g_img - g_txt, dim=0)


def test_router_trainer_step_lowers_loss():
    trainer = RouterTrainer(dim=8, hidden=32, seed=0)
    batch = toy_round()
    w0 = trainer.weights(batch[0])
    assert not w0.requires_grad and torch.allclose(w0.sum(), torch.tensor(1.0), atol=1e-6)
    first = trainer.step(*batch)
    assert set(first) >= {"loss", "entropy"}
    for _ in range(25):
        last = trainer.step(*batch)
    final, _ = router_loss(trainer.weights(batch[0]), *batch[1:])
    assert float(final) < first["loss"] - 1e-3
    assert last["loss"] < first["loss"]


def test_router_step_on_the_routed_forward_is_the_plain_step():
    """The server routes a round's aggregation and then steps on the same forward pass: the same
    weights and the same training as routing and stepping separately."""
    plain, reused = RouterTrainer(dim=8, hidden=32, seed=0), RouterTrainer(dim=8, hidden=32, seed=0)
    for seed in range(3):
        batch = toy_round(seed=seed)
        routed = reused.route(batch[0])
        assert routed.requires_grad and torch.equal(routed.detach(), plain.weights(batch[0]))
        assert plain.step(*batch) == reused.step(*batch, routed=routed)
    assert all(torch.equal(p, q) for p, q in zip(plain.router.parameters(), reused.router.parameters()))
    assert not torch.equal(plain.router.head.weight, RouterTrainer(dim=8, hidden=32, seed=0).router.head.weight)


def test_router_adam_steps_as_torch_optims():
    """The router's Adam (ours, see models/optim.py) moves it as torch.optim's foreach and per-tensor ones do."""
    ours, foreach, per_tensor = (RouterTrainer(dim=8, hidden=32, seed=0) for _ in range(3))
    foreach.optimizer = torch.optim.Adam(foreach.router.parameters(), lr=1e-3, foreach=True)
    per_tensor.optimizer = torch.optim.Adam(per_tensor.router.parameters(), lr=1e-3, foreach=False)
    for seed in range(4):
        batch = toy_round(seed=seed)
        for trainer in (ours, foreach, per_tensor):
            trainer.step(*batch)
    for p, q, r in zip(ours.router.parameters(), foreach.router.parameters(), per_tensor.router.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert not torch.equal(ours.router.head.weight, RouterTrainer(dim=8, hidden=32, seed=0).router.head.weight)


def test_router_trainer_single_client_and_state_dict():
    trainer = RouterTrainer(dim=8, hidden=32, seed=0)
    tokens, img, txt, g_img, g_txt, a_k, a = toy_round(k=1)
    before = [p.clone() for p in trainer.router.parameters()]
    parts = trainer.step(tokens, img, txt, g_img, g_txt, a_k, a)
    assert math.isfinite(parts["loss"])
    assert all(torch.equal(p, q) for p, q in zip(before, trainer.router.parameters()))  # nothing to learn at K=1
    batch = toy_round()
    trainer.step(*batch)
    other = RouterTrainer(dim=8, hidden=32, seed=1)
    other.load_state_dict(trainer.state_dict())
    assert torch.equal(other.weights(batch[0]), trainer.weights(batch[0]))
    trainer.step(*batch)
    other.step(*batch)  # optimiser state travelled too: the next step is identical
    assert torch.equal(other.weights(batch[0]), trainer.weights(batch[0]))
