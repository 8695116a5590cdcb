"""Residual bottleneck adapters, one per modality, with their parameters in one flat buffer.

The flat buffer is what travels between server and clients: loading the global state into a
worker's model is one `copy_`, and an update is one subtraction (the pfl-research habit of keeping
one model per worker and swapping weights in place). Gradients live in one flat buffer too, so the
optimizer updates a single tensor per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from rcsr_ray.models.optim import FusedAdamW


class ResidualAdapter(nn.Module):
    """y = normalize(x + up(gelu(down(x)))); `up` starts at (near) zero so training starts at zero-shot.

    normalize=False for adapters inside a transformer (on token states, not embeddings)."""

    def __init__(self, dim: int, bottleneck: int, init_scale: float = 0.0, generator: torch.Generator | None = None,
                 normalize: bool = True):
        super().__init__()
        self.normalize = normalize
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            bound = 1 / dim ** 0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.normal_(0.0, init_scale, generator=generator) if init_scale > 0 else self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize and x.dim() == 2:
            return _NormalizedResidual.apply(x, self.down.weight, self.down.bias, self.up.weight, self.up.bias)
        y = x + self.up(F.gelu(self.down(x)))
        return F.normalize(y, dim=-1) if self.normalize else y


class _NormalizedResidual(torch.autograd.Function):
    """normalize(x + up(gelu(down(x)))) on (n, dim) embeddings, with a hand-written backward.

    At adapter sizes the matmuls are small and a CPU client step is bound by per-operation overhead;
    autograd's graph for this expression runs about twice the operations of this backward."""

    @staticmethod
    def forward(ctx, x, down_w, down_b, up_w, up_b):
        pre = torch.addmm(down_b, x, down_w.t())
        hidden = F.gelu(pre)
        z = torch.addmm(up_b, hidden, up_w.t()).add_(x)
        norm = z.norm(dim=-1, keepdim=True).clamp_min_(1e-12)  # F.normalize's eps
        y = z.div_(norm)
        ctx.save_for_backward(x, down_w, up_w, pre, hidden, y, norm)
        return y

    @staticmethod
    @once_differentiable  # a second derivative through this would be wrong: refuse it
    def backward(ctx, grad_y):
        x, down_w, up_w, pre, hidden, y, norm = ctx.saved_tensors
        grad_z = (grad_y - y * (grad_y * y).sum(-1, keepdim=True)).div_(norm)
        grad_pre = torch.ops.aten.gelu_backward(grad_z.mm(up_w), pre)
        grad_x = grad_z + grad_pre.mm(down_w) if ctx.needs_input_grad[0] else None
        return grad_x, grad_pre.t().mm(x), grad_pre.sum(0), grad_z.t().mm(hidden), grad_z.sum(0)


def share_flat(module: nn.Module, device: str | torch.device = "cpu") -> torch.Tensor:
    """Move `module`'s parameters into one flat buffer on `device` (they become views into it), and
    their gradients into `flat.grad` likewise: autograd accumulates into existing gradients in place.

    Parameters are initialised on the CPU first, so the initial weights do not depend on the device.
    """
    params = list(module.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params]).to(device)
    for p, view in zip(params, flat_views(flat, params)):
        p.data = view
    _attach_grads(params, flat)
    return flat


def flat_views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into consecutive views shaped like the tensors in `like`."""
    views, offset = [], 0
    for t in like:
        views.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return views


def _attach_grads(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """(Re)make `flat.grad` and every parameter's gradient a view into it."""
    if flat.grad is None:
        flat.grad = torch.zeros_like(flat)
    for p, view in zip(params, flat_views(flat.grad, params)):
        p.grad = view


class FlatAdapters(nn.Module):
    """Adapters for both modalities whose parameters are views into one flat buffer `self.flat` (what
    travels); subclasses define `image(x)`, `text(x)`, `flat`, `image_numel`, `dim`, `eval_chunk`."""

    def load_flat(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            self.flat.copy_(flat)

    def optimizer(self, lr: float, weight_decay: float) -> FusedAdamW:
        """A fresh AdamW over the flat buffer: one fused kernel per step instead of a dozen operations
        per parameter. Clear gradients with this module's `zero_grad`, not the optimizer's."""
        return FusedAdamW([self.flat], lr, weight_decay)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient in place; `set_to_none` is ignored, since gradients set to None
        would no longer land in it. Views that something else replaced are made again."""
        grad, params = self.flat.grad, list(self.parameters())
        if grad is None or any(p.grad is None or p.grad._base is not grad for p in params):
            _attach_grads(params, self.flat)
        self.flat.grad.zero_()

    def encode(self, image_in: torch.Tensor | None, text_in: torch.Tensor | None):
        img = self.image(image_in) if image_in is not None else None
        txt = self.text(text_in) if text_in is not None else None
        return img, txt


class AdapterPair(FlatAdapters):
    """The shared (federated) adapters on cached embeddings: `image` and `text`."""

    eval_chunk = None  # inputs are embeddings: cheap enough to adapt a whole shard at once

    def __init__(self, dim: int, bottleneck: int, init_scale: float = 0.0, seed: int = 0,
                 device: str | torch.device = "cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.dim = dim  # width of the adapted embeddings
        self.image = ResidualAdapter(dim, bottleneck, init_scale, g)
        self.text = ResidualAdapter(dim, bottleneck, init_scale, g)
        self.flat = share_flat(self, device)
        # Which flat entries belong to the image adapter (the rest are the text adapter's).
        self.image_numel = sum(p.numel() for p in self.image.parameters())


def initial_params(dim: int, bottleneck: int, init_scale: float, seed: int) -> torch.Tensor:
    """The global adapters at round 0, as a flat float32 vector."""
    return AdapterPair(dim, bottleneck, init_scale, seed).flat.clone()


def adapter_model(store, bottleneck: int, init_scale: float = 0.0, seed: int = 0,
                  device: str | torch.device = "cpu") -> nn.Module:
    """The adapters for the rows a store holds: head adapters on cached embeddings, or, for a store
    of raw inputs (`blocks.InputStore`), adapters inside the frozen backbone's blocks."""
    build = getattr(store, "build_adapters", None)
    if build is not None:
        return build(bottleneck, init_scale, seed, device)
    return AdapterPair(store.dim, bottleneck, init_scale, seed, device)


@torch.inference_mode()
def apply_adapters(model: nn.Module, params: torch.Tensor, image_in: torch.Tensor, text_in: torch.Tensor,
                   chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted embeddings (on the CPU) of whole splits under `params`, chunked to bound memory; the
    inputs go to the model's device one chunk at a time."""
    model.load_flat(params)
    chunk = model.eval_chunk or chunk
    device = model.flat.device

    def run(fn, x):
        return torch.cat([fn(x[i:i + chunk].to(device)).cpu() for i in range(0, len(x), chunk)])

    return run(model.image, image_in), run(model.text, text_in)
