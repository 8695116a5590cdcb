"""RCSR's semantic router: one token per participating client in, one routing weight per client out.

A set model (self-attention without positional encoding), so the weights do not depend on the order
in which clients are listed: permuting the tokens permutes the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# cos(image, text prototype), geometry (4), modality mask (2), loss: the token entries besides the prototypes.
EXTRA_FEATURES = 1 + 4 + 2 + 1


def token_width(dim: int) -> int:
    return 2 * dim + EXTRA_FEATURES


class _SetBlock(nn.Module):
    """Pre-LN transformer encoder block over the set of clients (no dropout: the router is tiny and
    sees one set per round, and dropout would make the aggregation weights random)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(), nn.Linear(mlp_ratio * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (1, K, hidden)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class SemanticRouter(nn.Module):
    """tokens (K, 2*dim+8) -> routing weights (K,), a softmax over the participating clients."""

    def __init__(self, dim: int, hidden: int = 128, heads: int = 4, blocks: int = 2, seed: int = 0):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.dim = dim
        self.width = token_width(dim)
        # Seeded inside a forked RNG: the same seed gives the same router, and the caller's global
        # RNG stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = nn.Sequential(nn.Linear(self.width, hidden), nn.LayerNorm(hidden), nn.GELU(),
                                         nn.Linear(hidden, hidden))
            self.blocks = nn.ModuleList(_SetBlock(hidden, heads) for _ in range(blocks))
            # No bias in the final norm or the head: the softmax over clients ignores any shift shared
            # by all logits, so such a bias would never receive a gradient.
            self.norm = nn.LayerNorm(hidden, bias=False)
            self.head = nn.Linear(hidden, 1, bias=False)

    @staticmethod
    def build_tokens(img_proto: torch.Tensor, txt_proto: torch.Tensor, geometry: torch.Tensor, mask: torch.Tensor,
                     loss: torch.Tensor) -> torch.Tensor:
        """[image proto, text proto, cos(image, text), geometry (4), modality mask (2), loss] per client.

        Missing-modality prototypes must already be filled in (METHOD.md: with the global prototype).
        Non-finite entries (e.g. the loss of a client that could not train) become 0, so that one
        client cannot turn every routing weight into NaN.
        """
        img = img_proto.float()
        txt = txt_proto.float()
        k = img.shape[0]
        cos = F.cosine_similarity(img, txt, dim=-1, eps=1e-8).unsqueeze(-1)
        tokens = torch.cat([img, txt, cos, geometry.float().reshape(k, 4), mask.float().reshape(k, 2),
                            loss.float().reshape(k, 1)], dim=-1)
        return torch.nan_to_num(tokens, nan=0.0, posinf=0.0, neginf=0.0)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[-1] != self.width:
            raise ValueError(f"expected tokens of shape (K, {self.width}), got {tuple(tokens.shape)}")
        x = self.encoder(tokens.float()).unsqueeze(0)  # one set = a batch of one
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x)).reshape(-1)
        return torch.softmax(logits, dim=0)
