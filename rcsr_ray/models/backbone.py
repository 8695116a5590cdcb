"""The frozen open_clip backbone: one entry point, `load_backbone`, for encoding and full-backbone mode.

The model is frozen (no gradients) and in eval mode, with open_clip's own inference preprocessing
and tokenizer. `pretrained` is an open_clip tag (downloaded on first use), a local checkpoint file,
or None for random weights (tests, timing), which warns. Tiny architectures for tests are
registered in open_clip's config registry on first use, in whichever process loads them (Ray
workers included).
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip import factory as _oc_factory

from rcsr_ray.config import ConfigError

# Small open_clip architectures (open_clip's JSON config format) for tests and CPU benchmarks.
TINY_MODELS: dict[str, dict] = {
    "rcsr-tiny": {
        "embed_dim": 32,  # joint embedding size (the feature store's dim)
        "vision_cfg": {
            "image_size": 32,  # input resolution; preprocess resizes and crops to it
            "layers": 2,  # transformer blocks in the image tower
            "width": 64,  # token width; heads = width // head_width (64) = 1
            "patch_size": 8,  # 4x4 patches + class token
        },
        "text_cfg": {
            "context_length": 32,  # tokens per caption (the tokenizer pads/truncates to it)
            "vocab_size": 49408,  # must match open_clip's SimpleTokenizer
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    },
}


def register_tiny_model(name: str = "rcsr-tiny") -> str:
    """Add a tiny architecture from TINY_MODELS to open_clip's registry (idempotent); returns its name."""
    if name not in TINY_MODELS:
        raise ConfigError("model", name, f"a tiny test model, one of {', '.join(TINY_MODELS)}")
    # open_clip only offers file-based registration; its registry is this dict.
    _oc_factory._MODEL_CONFIGS.setdefault(name, copy.deepcopy(TINY_MODELS[name]))
    return name


def model_config(name: str, key: str = "model") -> dict:
    """open_clip's architecture config of `name` (tiny test models registered on the way); a
    ConfigError on `key` for an unknown name."""
    if name in TINY_MODELS:
        register_tiny_model(name)
    arch = open_clip.get_model_config(name)
    if arch is None:
        raise ConfigError(key, name, "an open_clip model name such as ViT-B-32 (open_clip.list_models() lists them)")
    return arch


@dataclass
class Backbone:
    """A frozen open_clip model with its inference preprocessing and tokenizer."""

    name: str
    model: torch.nn.Module  # open_clip CLIP, eval mode, requires_grad False
    preprocess: Callable  # PIL image -> (3, S, S) float tensor
    tokenizer: Callable  # list[str] -> (n, context_length) int64 tensor
    dim: int  # joint embedding size
    device: torch.device

    @cached_property
    def byte_steps(self) -> tuple[Callable, torch.Tensor, torch.Tensor] | None:
        """`preprocess` cut where its pixels are still bytes: (its steps before ToTensor, PIL image ->
        PIL image; Normalize's mean and std) when it ends in ToTensor then Normalize, as open_clip's
        does; else None. Bytes take a quarter of the memory of the float pixels `preprocess` gives."""
        from torchvision.transforms import Compose, Normalize, ToTensor

        steps = getattr(self.preprocess, "transforms", [])
        if len(steps) < 2 or not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
            return None
        mean, std = (torch.as_tensor(v, dtype=torch.float32) for v in (steps[-1].mean, steps[-1].std))
        return Compose(steps[:-2]), mean, std

    def from_bytes(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) uint8 pixels of `byte_steps` -> what `preprocess` gives for them: the same
        operations as its ToTensor and Normalize, so the same bits."""
        _, mean, std = self.byte_steps
        x = pixels.to(torch.float32).div(255)
        return x.sub_(mean.to(x.device).view(-1, 1, 1)).div_(std.to(x.device).view(-1, 1, 1))

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor | np.ndarray) -> np.ndarray:
        """(n, 3, S, S) preprocessed pixels -> (n, dim) L2-normalised float32 embeddings."""
        x = torch.as_tensor(pixels).to(self.device, torch.float32)
        return F.normalize(self.model.encode_image(x).float(), dim=-1).cpu().numpy()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Captions -> (n, dim) L2-normalised float32 embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu().numpy()


def load_backbone(model_name: str, pretrained: str | None = None, device: str | torch.device = "cpu",
                  seed: int = 0) -> Backbone:
    """Build the frozen open_clip `model_name` with weights from a tag, a local file, or random (None).

    Random weights are drawn from `seed`, so every process (encode actors, client actors) that loads
    the same name and seed holds the same model.
    """
    dim = int(model_config(model_name)["embed_dim"])
    weights = None
    if pretrained is None:
        warnings.warn(f"backbone {model_name}: no pretrained weights given, using random weights "
                      "(fine for tests and timing, meaningless features)", stacklevel=2)
    elif os.path.isfile(pretrained):
        weights = pretrained
    elif open_clip.get_pretrained_cfg(model_name, pretrained):
        weights = _fetch_tag(model_name, pretrained)
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise ConfigError("pretrained", pretrained, f"a local checkpoint file or a pretrained tag of {model_name} "
                          f"({', '.join(tags) if tags else 'it has none'})")
    quiet = logging.root.manager.disable
    if weights is None:
        logging.disable(logging.WARNING)  # open_clip's own "initialized randomly" repeats our warning
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights,
                                                                         device=device)
    except Exception as exc:
        if weights is None:
            raise
        # A checkpoint of another architecture, or a file that is not a checkpoint (torch.load raises
        # pickle, zip, EOF or runtime errors depending on how it is broken).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("pretrained", pretrained, f"a checkpoint for {model_name} ({first[:200]})") from None
    finally:
        logging.disable(quiet)
    model.eval().requires_grad_(False)
    if torch.device(device).type == "cuda":
        # cuDNN's default TF32 convolutions (the patch embedding) put blocks-mode updates up to 2%
        # off the CPU's on an H200; in float32 they agree within 5e-5. Process-wide, as the flag is.
        torch.backends.cudnn.allow_tf32 = False
    return Backbone(name=model_name, model=model, preprocess=preprocess,
                    tokenizer=open_clip.get_tokenizer(model_name), dim=dim, device=torch.device(device))


def _fetch_tag(model_name: str, tag: str) -> str:
    """The local file of a pretrained tag, downloaded (or found in the cache)."""
    try:
        path = open_clip.download_pretrained(open_clip.get_pretrained_cfg(model_name, tag))
    except Exception as exc:  # network, hub and file errors all mean the same thing to the user
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ConfigError("pretrained", tag, f"weights for {model_name} could not be fetched ({reason}); offline, "
                          f"download the checkpoint elsewhere (e.g. open_clip_pytorch_model.bin of "
                          f"{model_name}/{tag}) and pass its local file path as --pretrained") from None
    if not path:
        raise ConfigError("pretrained", tag, f"no download source for {model_name}/{tag}; pass a local checkpoint "
                          "file path as --pretrained")
    return path
