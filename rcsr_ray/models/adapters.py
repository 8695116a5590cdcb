"""Residual bottleneck adapters, one per modality, with their parameters in one flat buffer.

The flat buffer is what travels between server and clients: loading the global state into a
worker's model is one `copy_`, and an update is one subtraction (the pfl-research habit of keeping
one model per worker and swapping weights in place).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualAdapter(nn.Module):
    """y = normalize(x + up(gelu(down(x)))); `up` starts at (near) zero so training starts at zero-shot."""

    def __init__(self, dim: int, bottleneck: int, init_scale: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            bound = 1 / dim ** 0.5
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.normal_(0.0, init_scale, generator=generator) if init_scale > 0 else self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.up(F.gelu(self.down(x))), dim=-1)


class AdapterPair(nn.Module):
    """The shared (federated) adapters: `image` and `text`, parameters views into `self.flat`."""

    def __init__(self, dim: int, bottleneck: int, init_scale: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image = ResidualAdapter(dim, bottleneck, init_scale, g)
        self.text = ResidualAdapter(dim, bottleneck, init_scale, g)
        params = list(self.parameters())
        self.flat = torch.cat([p.detach().reshape(-1) for p in params])
        offset = 0
        for p in params:
            n = p.numel()
            p.data = self.flat[offset:offset + n].view_as(p)
            offset += n
        # Which flat entries belong to the image adapter (the rest are the text adapter's).
        self.image_numel = sum(p.numel() for p in self.image.parameters())

    def load_flat(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            self.flat.copy_(flat)

    def encode(self, image_emb: torch.Tensor | None, text_emb: torch.Tensor | None):
        img = self.image(image_emb) if image_emb is not None else None
        txt = self.text(text_emb) if text_emb is not None else None
        return img, txt


def initial_params(dim: int, bottleneck: int, init_scale: float, seed: int) -> torch.Tensor:
    """The global adapters at round 0, as a flat float32 vector."""
    return AdapterPair(dim, bottleneck, init_scale, seed).flat.clone()


@torch.inference_mode()
def apply_adapters(model: AdapterPair, params: torch.Tensor, image_emb: torch.Tensor, text_emb: torch.Tensor,
                   chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapted embeddings of whole splits under `params` (chunked to bound memory)."""
    model.load_flat(params)
    img = torch.cat([model.image(image_emb[i:i + chunk]) for i in range(0, len(image_emb), chunk)])
    txt = torch.cat([model.text(text_emb[i:i + chunk]) for i in range(0, len(text_emb), chunk)])
    return img, txt
