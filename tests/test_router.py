"""SemanticRouter: a seeded, permutation-equivariant distribution over the participating clients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rcsr_ray.fl.rcsr_server import client_alignment, router_loss
from rcsr_ray.models.router import SemanticRouter, token_width

DIM = 16


def toy_inputs(k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(k, DIM, generator=g), dim=-1)
    txt = F.normalize(torch.randn(k, DIM, generator=g), dim=-1)
    geometry = torch.rand(k, 4, generator=g)
    mask = torch.ones(k, 2)
    mask[0, 1] = 0  # one image-only client
    loss = torch.rand(k, generator=g) * 3
    return img, txt, geometry, mask, loss


def test_token_layout():
    img, txt, geometry, mask, loss = toy_inputs(3)
    tokens = SemanticRouter.build_tokens(img, txt, geometry, mask, loss)
    assert tokens.shape == (3, 2 * DIM + 8) == (3, token_width(DIM))
    assert torch.equal(tokens[:, :DIM], img)
    assert torch.equal(tokens[:, DIM:2 * DIM], txt)
    assert torch.allclose(tokens[:, 2 * DIM], (img * txt).sum(-1), atol=1e-6)
    assert torch.equal(tokens[:, 2 * DIM + 1:2 * DIM + 5], geometry)
    assert torch.equal(tokens[:, 2 * DIM + 5:2 * DIM + 7], mask)
    assert torch.equal(tokens[:, -1], loss)


def test_nan_loss_does_not_poison_weights():
    img, txt, geometry, mask, loss = toy_inputs(3)
    loss[1] = float("nan")
    w = SemanticRouter(DIM, hidden=32)(SemanticRouter.build_tokens(img, txt, geometry, mask, loss))
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("k", [1, 3, 7])
def test_output_is_distribution_over_participants(k):
    router = SemanticRouter(DIM, hidden=32, heads=4, blocks=2, seed=1)
    w = router(SemanticRouter.build_tokens(*toy_inputs(k)))
    assert w.shape == (k,)
    assert (w >= 0).all()
    assert torch.allclose(w.sum(), torch.tensor(1.0), atol=1e-6)


def test_gradients_reach_every_parameter():
    router = SemanticRouter(DIM, hidden=32, heads=4, blocks=2, seed=0)
    img, txt, geometry, mask, loss = toy_inputs(5)
    w = router(SemanticRouter.build_tokens(img, txt, geometry, mask, loss))
    g_img, g_txt = F.normalize(torch.randn(DIM), dim=0), F.normalize(torch.randn(DIM), dim=0)
    total, _ = router_loss(w, img, txt, g_img, g_txt, client_alignment(img, txt), F.normalize(torch.randn(DIM), dim=0))
    total.backward()
    for name, p in router.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_permuting_clients_permutes_weights():
    router = SemanticRouter(DIM, hidden=32, seed=3)
    tokens = SemanticRouter.build_tokens(*toy_inputs(7, seed=5))
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    assert torch.allclose(router(tokens[perm]), router(tokens)[perm], atol=1e-6)


def test_deterministic_for_a_seed():
    tokens = SemanticRouter.build_tokens(*toy_inputs(4))
    before = torch.random.get_rng_state()
    a, b, c = SemanticRouter(DIM, seed=7), SemanticRouter(DIM, seed=7), SemanticRouter(DIM, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert torch.equal(a(tokens), b(tokens))
    assert not torch.allclose(a(tokens), c(tokens))


def test_rejects_wrong_token_width():
    with pytest.raises(ValueError):
        SemanticRouter(DIM)(torch.zeros(3, 2 * DIM))
