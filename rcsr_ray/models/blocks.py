"""Full-backbone mode (`model.adapter.placement: blocks`): a residual bottleneck adapter after every
transformer block of both open_clip towers, trained through the frozen backbone on the clients'
images and caption tokens instead of cached features.

The pieces keep the head mode's interfaces so the client update, the server strategies and the
round loop run unchanged:
- `BlockAdapters` has `image`, `text`, `flat`, `load_flat`, `image_numel` and `dim` like
  `AdapterPair`; all adapter parameters are views into one flat buffer, which is what the server
  aggregates.
- `InputStore` stands in for the feature store: the same rows, but `image_emb[rows]` gives
  pixels (as bytes where the preprocessing allows, normalised when the adapters run) and
  `caption_emb[rows]` token ids, so a federation's shards carry the backbone's inputs.
  `BlocksFederation` is a `Federation` whose store is an `InputStore`.
The backbone (name, weights, random seed) is the one the feature store was encoded with, as
recorded in its meta.json, unless `model.name` / `model.pretrained` say otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcsr_ray.config import Config, ConfigError
from rcsr_ray.data.federation import Federation
from rcsr_ray.data.store import FeatureStore, StoreError
from rcsr_ray.models.adapters import FlatAdapters, ResidualAdapter, share_flat
from rcsr_ray.models.backbone import Backbone, load_backbone, model_config


def tower_blocks(model: nn.Module, name: str) -> tuple[nn.ModuleList, int, nn.ModuleList, int]:
    """The residual blocks and token width of the image and the text tower of an open_clip model."""
    visual = getattr(getattr(model, "visual", None), "transformer", None)
    text = getattr(getattr(model, "text", None), "transformer", None) or getattr(model, "transformer", None)
    if not (hasattr(visual, "resblocks") and hasattr(text, "resblocks")):
        raise ConfigError("model.name", name, "an open_clip model with transformer towers on both sides "
                          "(ViT image tower and CLIP text transformer) for model.adapter.placement=blocks")
    return visual.resblocks, int(visual.width), text.resblocks, int(text.width)


class BlockAdapters(FlatAdapters):
    """Adapters after every block of both towers of a frozen backbone, parameters in one flat buffer
    (image tower's first). The backbone is shared, not owned: it is neither a submodule nor in `flat`,
    and the adapters are hooked into it only while this module runs it, so several adapter sets
    (the worker's, MOON's references, the evaluator's) can share one backbone."""

    eval_chunk = 256  # images or captions per forward pass outside training

    def __init__(self, backbone: Backbone, bottleneck: int, init_scale: float = 0.0, seed: int = 0,
                 device: str | torch.device = "cpu"):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        vis, vis_width, txt, txt_width = tower_blocks(backbone.model, backbone.name)
        # On token states inside the transformer: residual, not normalised.
        self.image_adapters = nn.ModuleList(
            ResidualAdapter(vis_width, bottleneck, init_scale, g, normalize=False) for _ in vis)
        self.text_adapters = nn.ModuleList(
            ResidualAdapter(txt_width, bottleneck, init_scale, g, normalize=False) for _ in txt)
        self.flat = share_flat(self, device)
        self.image_numel = sum(p.numel() for p in self.image_adapters.parameters())
        self.dim = backbone.dim
        self._frozen = (backbone, vis, txt)  # a tuple, so nn.Module does not register the blocks

    @contextlib.contextmanager
    def _hooked(self, blocks: nn.ModuleList, adapters: nn.ModuleList):
        handles = [b.register_forward_hook(lambda _m, _in, out, a=a: a(out)) for b, a in zip(blocks, adapters)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) pixels, uint8 (`InputStore`) or preprocessed floats -> (n, dim) unit-norm embeddings."""
        backbone, vis, _ = self._frozen
        if pixels.dtype == torch.uint8:
            pixels = backbone.from_bytes(pixels)
        with self._hooked(vis, self.image_adapters):
            return F.normalize(backbone.model.encode_image(pixels).float(), dim=-1)

    def text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(m, context) token ids (any dtype, shards keep them as float32) -> (m, dim) unit-norm embeddings."""
        backbone, _, txt = self._frozen
        with self._hooked(txt, self.text_adapters):
            return F.normalize(backbone.model.encode_text(tokens.long()).float(), dim=-1)


_LOADED: dict[tuple, Backbone] = {}  # one frozen backbone per process and device


def shared_backbone(name: str, pretrained: str | None, seed: int, device: str | torch.device) -> Backbone:
    """`load_backbone`, once per process for each (name, weights, seed, device)."""
    key = (name, pretrained, seed, str(torch.device(device)))
    if key not in _LOADED:
        _LOADED[key] = load_backbone(name, pretrained, device=device, seed=seed)
    return _LOADED[key]


class _Rows:
    """Row access like a memmap's (`x[rows]`) computed by a function of the row indices."""

    def __init__(self, fn, n: int):
        self.fn, self.n = fn, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows) -> np.ndarray:
        return self.fn(np.asarray(rows))  # callers index with arrays of row numbers


class InputStore:
    """A feature store seen through the backbone's inputs: `image_emb[rows]` are the images' pixels
    (read from meta.json's `root` / the `path` column, preprocessed up to bytes: `Backbone.byte_steps`),
    `caption_emb[rows]` the captions' token ids as float32 (exact: ids are far below 2**24).
    Everything else is the store's."""

    def __init__(self, features: FeatureStore, name: str, pretrained: str | None, seed: int):
        self.features = features
        self.name, self.pretrained, self.seed = name, pretrained, seed
        self.path, self.dim = features.path, features.dim
        self.root = Path(features.meta.get("root") or "")
        self.image_emb = _Rows(self._pixels, len(features.images))
        self.caption_emb = _Rows(self._tokens, len(features.captions))
        self.backbone: Backbone | None = None  # set by build_adapters; else a CPU copy for preprocessing

    def split(self, name: str):
        return self.features.split(name)

    def _backbone(self) -> Backbone:
        return self.backbone or shared_backbone(self.name, self.pretrained, self.seed, "cpu")

    def build_adapters(self, bottleneck: int, init_scale: float, seed: int, device) -> BlockAdapters:
        """Block adapters on this store's backbone, loaded on `device` (`adapters.adapter_model` calls this)."""
        self.backbone = shared_backbone(self.name, self.pretrained, self.seed, device)
        return BlockAdapters(self.backbone, bottleneck, init_scale, seed, device)

    def _pixels(self, rows: np.ndarray) -> np.ndarray:
        from PIL import Image

        backbone = self._backbone()
        steps, size = backbone.byte_steps, backbone.image_size
        out = np.empty((len(rows), 3, size, size), np.uint8 if steps else np.float32)
        paths = self.features.images["path"].to_numpy()
        for i, r in enumerate(rows):
            f = self.root / str(paths[r])
            try:
                with Image.open(f) as img:
                    rgb = img.convert("RGB")
                    out[i] = np.asarray(steps[0](rgb)).transpose(2, 0, 1) if steps else backbone.preprocess(rgb).numpy()
            except (OSError, ValueError) as exc:
                raise StoreError(f"{f}: image {r} of {self.path} cannot be read for model.adapter.placement=blocks "
                                 f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
        return out

    def _tokens(self, rows: np.ndarray) -> np.ndarray:
        texts = self.features.captions["text"].to_numpy()[rows]
        return self._backbone().tokenizer([str(t) for t in texts]).numpy().astype(np.float32)


def backbone_spec(features: FeatureStore, cfg: Config) -> tuple[str, str | None, int]:
    """(name, pretrained, seed) of the backbone: config keys first, else what meta.json records.
    Checked against the store before anything is loaded."""
    meta = features.meta
    name = cfg.model.name or meta.get("model")
    if not name:
        raise ConfigError("model.name", cfg.model.name, f"an open_clip model name: the feature store {features.path} "
                          "records none (meta.json 'model'), and placement=blocks must run the backbone")
    arch = model_config(name, "model.name")
    if int(arch["embed_dim"]) != features.dim:
        raise ConfigError("model.name", name, f"the backbone the feature store {features.path} was encoded with: "
                          f"its embeddings are {features.dim}-d, {name}'s are {arch['embed_dim']}-d")
    pretrained = cfg.model.pretrained if cfg.model.pretrained is not None else meta.get("pretrained")
    return name, pretrained, int(meta.get("seed", 0))


@dataclass
class BlocksFederation(Federation):
    """A `Federation` whose shards hold pixels and token ids (an `InputStore`) instead of embeddings."""

    model_name: str = ""
    pretrained: str | None = None
    backbone_seed: int = 0
    shards_are_cheap = False  # a shard's images are decoded and preprocessed on reading

    @cached_property
    def store(self) -> InputStore:
        return InputStore(FeatureStore(self.store_path), self.model_name, self.pretrained, self.backbone_seed)

    @classmethod
    def wrap(cls, federation: Federation, cfg: Config) -> "BlocksFederation":
        features = federation.store
        name, pretrained, seed = backbone_spec(features, cfg)
        fields = {f.name: getattr(federation, f.name) for f in dataclasses.fields(Federation)}
        blocks = cls(**fields, model_name=name, pretrained=pretrained, backbone_seed=seed)
        blocks.store = InputStore(features, name, pretrained, seed)  # the open store, not a second one
        return blocks
