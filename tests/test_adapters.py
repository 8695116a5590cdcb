"""The head adapters' hand-written backward and the flat gradient/optimizer."""
import pytest
import torch
import torch.nn.functional as F

from rcsr_ray.fl.client import info_nce
from rcsr_ray.models.adapters import AdapterPair, ResidualAdapter


def autograd_reference(adapter: ResidualAdapter, x: torch.Tensor) -> torch.Tensor:
    """The same expression built from plain autograd operations."""
    return F.normalize(x + adapter.up(F.gelu(adapter.down(x))), dim=-1)


def test_hand_written_backward_matches_autograd():
    torch.manual_seed(0)
    adapter = ResidualAdapter(12, 5, init_scale=0.3).double()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    params = (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)
    # gradcheck perturbs its inputs in place, so perturbing `params` perturbs the adapter.
    assert torch.autograd.gradcheck(lambda x, *_: adapter(x), (x, *params))
    weights = torch.randn(7, 12, dtype=torch.float64)
    grads = torch.autograd.grad((adapter(x) * weights).sum(), (x, *params))
    expected = torch.autograd.grad((autograd_reference(adapter, x) * weights).sum(), (x, *params))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(adapter(x), autograd_reference(adapter, x), rtol=1e-12, atol=1e-12)


def test_flat_gradient_and_optimizer_train_like_per_parameter_adamw():
    torch.manual_seed(1)
    img, txt = F.normalize(torch.randn(16, 24), dim=-1), F.normalize(torch.randn(16, 24), dim=-1)
    flat_model, plain_model = AdapterPair(24, 6, init_scale=0.1, seed=3), AdapterPair(24, 6, init_scale=0.1, seed=3)
    # The reference: per-parameter gradients (not views of the flat one) and a per-parameter AdamW.
    plain_params = list(plain_model.parameters())
    for p in plain_params:
        p.grad = None
    plain_opt = torch.optim.AdamW(plain_params, lr=1e-2, weight_decay=0.1, foreach=False)
    flat_opt = flat_model.optimizer(lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        flat_model.zero_grad()
        info_nce(*flat_model.encode(img, txt), 0.1).backward()
        # Gradients landed in the flat buffer through the parameters' views.
        assert flat_model.flat.grad.abs().sum() > 0
        assert flat_model.image.up.weight.grad.data_ptr() == flat_model.flat.grad.data_ptr() + \
            4 * (flat_model.image.down.weight.numel() + flat_model.image.down.bias.numel())
        flat_opt.step()
        plain_opt.zero_grad(set_to_none=True)
        loss = info_nce(*plain_model.encode(img, txt), 0.1)
        loss.backward()
        plain_opt.step()
    moved = (flat_model.flat - AdapterPair(24, 6, init_scale=0.1, seed=3).flat).abs().max()
    assert moved > 1e-3
    torch.testing.assert_close(flat_model.flat, plain_model.flat, rtol=1e-5, atol=1e-6)


def test_gradient_views_survive_being_reset_and_second_derivatives_are_refused():
    model = AdapterPair(24, 6, init_scale=0.1, seed=3)
    img, txt = F.normalize(torch.randn(8, 24), dim=-1), F.normalize(torch.randn(8, 24), dim=-1)
    opt = model.optimizer(lr=1e-2, weight_decay=0.0)
    model.image.zero_grad()  # nn.Module's: sets the image adapter's gradients to None
    opt.zero_grad()  # torch.optim's: sets flat.grad to None
    model.zero_grad()  # ours: makes the views again
    info_nce(*model.encode(img, txt), 0.1).backward()
    assert model.image.down.weight.grad.abs().sum() > 0
    assert torch.equal(model.flat.grad, torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    before = model.flat.clone()
    opt.step()
    assert (model.flat - before)[:model.image_numel].abs().max() > 0
    x = torch.randn(4, 24, requires_grad=True)
    (g,) = torch.autograd.grad(model.image(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()
