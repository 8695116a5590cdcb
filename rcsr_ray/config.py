"""Run configuration: dataclasses loaded from YAML, `key.sub=value` overrides, validation.

Precedence, lowest first: dataclass defaults < the YAML file's preset (else S4) < YAML file <
a preset named on the command line (`--preset`, or `preset=`) < the other command-line keys.
Every field carries its meaning inline; `rcsr-ray config` prints the resolved tree.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the key, the value and what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"config error: {key}={value!r}: {allowed}")


@dataclass
class SyntheticConfig:
    """The embedded benchmark (see README, "The embedded benchmark")."""

    seed: int = 0  # the benchmark's own seed: runs with different `seed` share one dataset
    train_images: int = 3000  # training images (each with `captions_per_image` captions)
    test_images: int = 1000  # test images, standard 1k protocol
    captions_per_image: int = 5
    dim: int = 512  # embedding width, as CLIP ViT-B/32
    concepts: int = 50  # semantic concepts (ground-truth clusters)
    attributes: int = 24  # shared attribute vectors concepts are built from (overlap between concepts)
    attributes_per_concept: int = 3
    attribute_weight: float = 0.8  # share of a concept's direction made of shared attributes (0: disjoint concepts)
    instance_spread: float = 0.75  # share of an image's content that is instance-specific, not concept
    caption_noise: float = 1.6  # how loosely a caption describes its image (per-caption noise)
    image_noise: float = 0.35  # per-image encoder noise on the image side
    misalignment: float = 1.05  # concept-dependent offset of captions away from their images
    instance_dim: int = 32  # dimension of the subspace holding instance detail (low: instances crowd)
    rotation: float = 0.1  # angle (radians) by which captions see the instance detail rotated
    modality_gap: float = 0.5  # constant offset between the image and the text cone, as in CLIP
    client_shift: float = 0.35  # client-specific domain shift applied to each client's features, both modalities


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | features
    path: str | None = None  # feature store folder when source=features
    cache_dir: str | None = None  # where generated synthetic stores are kept (default ~/.cache/rcsr-ray)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class PartitionConfig:
    num_clients: int = 20
    alpha: float | None = 0.1  # Dirichlet concentration over semantic clusters; null = IID
    clusters: int = 50  # k-means clusters when the store has none
    min_samples: int = 16  # minimum training images per client
    missing_rate: float = 0.5  # share of clients lacking one modality
    image_only_share: float = 0.5  # of those, share that are image-only (the rest text-only)


@dataclass
class AdapterConfig:
    bottleneck: int = 64  # hidden width of the residual bottleneck
    init_scale: float = 0.0  # std of the up-projection at init; 0 = start exactly at zero-shot
    # head: one adapter per modality on cached features (fast); blocks: an adapter after every
    # transformer block of both open_clip towers, clients run the frozen backbone (data.source=features)
    placement: str = "head"


@dataclass
class ModelConfig:
    # The open_clip backbone for placement=blocks; null = as recorded in the feature store's meta.json
    # (the model it was encoded with). Head placement never loads a backbone.
    name: str | None = None
    pretrained: str | None = None  # pretrained tag or local checkpoint file; null = as in meta.json
    adapter: AdapterConfig = field(default_factory=AdapterConfig)


@dataclass
class TrainConfig:
    """Local training on a client."""

    local_epochs: int = 2
    batch_size: int = 128  # images per batch, one random caption each
    lr: float = 1e-3
    weight_decay: float = 0.0
    temperature: float = 0.07  # InfoNCE temperature


@dataclass
class FedConfig:
    method: str = "rcsr"  # rcsr | fedavg | fedprox | moon | fedper | zeroshot | local | central
    rounds: int = 50
    participation: float = 0.5  # fraction of clients sampled each round
    prox_mu: float = 0.01  # fedprox's proximal weight toward the global adapters (other methods ignore it)
    moon_mu: float = 1.0  # moon's model-contrastive weight
    moon_temperature: float = 0.5  # moon's temperature


@dataclass
class RCSRConfig:
    """RCSR settings (METHOD.md); the four switches turn its pieces off one by one for ablations."""

    router: bool = True  # semantic router; off = uniform router weights
    minimax: bool = True  # minimax fairness weights; off = uniform q
    anchoring: bool = True  # prototype anchoring in the client loss; off = no anchoring term
    personal: bool = False  # client-owned personal adapters for each client's own retrieval (optional)
    granularity: str = "cluster"  # prototypes per semantic cluster, or "global" (one per modality, authors' code)
    anchor_weight: float = 0.5  # weight of the anchoring term (METHOD.md leaves it open)
    anchor_mode: str = "instance"  # instance: pull each embedding (METHOD.md); centroid: pull each cluster's batch mean
    clip_anchor: float = 0.0  # weight of the optional CLIP anchor (adapted embeddings stay near the frozen ones)
    prox_mu: float = 0.01  # proximal term toward the global adapters
    proto_decay: float = 0.95  # EMA decay of the global prototypes and alignment direction
    minimax_eta: float = 0.1
    minimax_tau: float = 0.1
    router_hidden: int = 128
    router_heads: int = 4
    router_blocks: int = 2
    router_lr: float = 1e-3
    b1: float = 1.0  # image prototype consistency
    b2: float = 1.0  # text prototype consistency
    b4: float = 0.1  # router weight entropy bonus
    b5: float = 0.3  # alignment direction consistency
    # How the server keeps each client's previous update (for the cosine in the update geometry):
    # 0 = the update itself; k > 0 = a k-bucket count sketch (estimated cosine); null = auto: exact
    # while every client's update fits in 1 GiB, else 4096 buckets
    history_dims: int | None = None


@dataclass
class EvalConfig:
    protocol: str = "standard"  # standard (all captions per image) | diagonal (the authors' code)
    every: int = 5  # evaluate every N rounds (the last round always)
    local_test_images: int = 100  # images in each client's personal test set (drawn with its cluster mix)


@dataclass
class RuntimeConfig:
    backend: str = "ray"  # ray | local
    num_cpus: int | None = None  # CPUs for a locally started Ray instance (default: all)
    address: str | None = None  # join this Ray cluster (else RAY_ADDRESS, else start a local one)
    client_cpus: float = 1.0  # CPUs reserved per client actor
    client_gpus: float = 0.0  # GPU share per client actor (e.g. 0.1); used only when the cluster has GPUs
    # CPUs reserved for the driver actor; 0 because it and the clients take turns within a round.
    driver_cpus: float = 0.0
    clients_per_actor: int | None = None  # null = auto: one per actor while CPUs allow, else packed
    torch_threads: int = 1  # intra-op threads per client update (keeps results identical across backends)
    # Intra-op threads of the server step (aggregation, router, prototypes): fixed, because its sums
    # round differently with another count, and a process's default follows the machine's cores.
    server_threads: int = 1
    round_timeout_s: float | None = None  # clients not done by then are dropped from the round (Ray backend)
    max_restarts: int = 3  # Ray restarts of a client actor that died or was killed for a timeout
    round_retries: int = 2  # a round where every client failed is retried this often, never aggregated
    checkpoint_every: int = 10  # rounds between checkpoints in the run folder (resume with the same --out)
    faults: str = ""  # testing: inject faults, "kind@round:client,..." with kind raise | die | hang


@dataclass
class Config:
    seed: int = 0  # seeds partition, sampling, initialisation and client training
    preset: str | None = None  # S1..S4; explicit keys override it
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FedConfig = field(default_factory=FedConfig)
    rcsr: RCSRConfig = field(default_factory=RCSRConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The authors' scenarios.
PRESETS: dict[str, dict[str, Any]] = {
    "S1": {"partition.alpha": None, "partition.missing_rate": 0.0, "fed.participation": 1.0},
    "S2": {"partition.alpha": 0.5, "partition.missing_rate": 0.0, "fed.participation": 1.0},
    "S3": {"partition.alpha": 0.1, "partition.missing_rate": 0.0, "fed.participation": 1.0},
    "S4": {"partition.alpha": 0.1, "partition.missing_rate": 0.5, "fed.participation": 0.5},
}
DEFAULT_PRESET = "S4"

METHODS = ("rcsr", "fedavg", "fedprox", "moon", "fedper", "zeroshot", "local", "central")


FAULT_KINDS = ("raise", "die", "hang")


def parse_faults(spec: str) -> dict[tuple[int, int], str]:
    """runtime.faults: "die@2:3,raise@4:1" -> {(2, 3): "die", (4, 1): "raise"}; ValueError if malformed."""
    plan = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, where = item.split("@")
            round_idx, client = (int(x) for x in where.split(":"))
        except ValueError:
            raise ValueError(f"fault {item!r}: expected kind@round:client") from None
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault {item!r}: kind must be one of {', '.join(FAULT_KINDS)}")
        plan[(round_idx, client)] = kind
    return plan


def _valid_faults(v) -> bool:
    try:
        parse_faults(v)
    except ValueError:
        return False
    return True


def _positive(v):
    return v > 0


def _nonneg(v):
    return v >= 0


def _unit(v):
    return 0 <= v <= 1


# key -> (predicate, what is allowed). Keys not listed are only type-checked.
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "preset": (lambda v: v is None or v in PRESETS, f"one of {', '.join(PRESETS)} or null"),
    "data.source": (lambda v: v in ("synthetic", "features"), "one of synthetic, features"),
    "seed": (_nonneg, "an integer >= 0"),
    "data.synthetic.seed": (_nonneg, "an integer >= 0"),
    "data.synthetic.train_images": (_positive, "a positive integer"),
    "data.synthetic.test_images": (_positive, "a positive integer"),
    "data.synthetic.captions_per_image": (_positive, "a positive integer"),
    "data.synthetic.dim": (lambda v: v >= 8, "an integer >= 8"),
    "data.synthetic.concepts": (_positive, "a positive integer"),
    "data.synthetic.attributes": (_positive, "a positive integer"),
    "data.synthetic.attributes_per_concept": (_positive, "a positive integer"),
    "data.synthetic.attribute_weight": (_unit, "a number in [0, 1]"),
    "data.synthetic.instance_spread": (_unit, "a number in [0, 1]"),
    "data.synthetic.caption_noise": (_nonneg, "a number >= 0"),
    "data.synthetic.image_noise": (_nonneg, "a number >= 0"),
    "data.synthetic.misalignment": (_nonneg, "a number >= 0"),
    "data.synthetic.rotation": (_nonneg, "a number >= 0 (radians)"),
    "data.synthetic.instance_dim": (lambda v: v >= 2, "an integer >= 2"),
    "data.synthetic.modality_gap": (_nonneg, "a number >= 0"),
    "data.synthetic.client_shift": (_nonneg, "a number >= 0"),
    "partition.num_clients": (_positive, "a positive integer"),
    "partition.alpha": (lambda v: v is None or v > 0, "a number > 0, or null for IID"),
    "partition.clusters": (_positive, "a positive integer"),
    "partition.min_samples": (_positive, "a positive integer"),
    "partition.missing_rate": (_unit, "a number in [0, 1]"),
    "partition.image_only_share": (_unit, "a number in [0, 1]"),
    "model.adapter.bottleneck": (_positive, "a positive integer"),
    "model.adapter.init_scale": (_nonneg, "a number >= 0"),
    "model.adapter.placement": (lambda v: v in ("head", "blocks"), "one of head, blocks"),
    "train.local_epochs": (_positive, "a positive integer"),
    "train.batch_size": (lambda v: v >= 2, "an integer >= 2 (InfoNCE needs negatives)"),
    "train.lr": (_positive, "a number > 0"),
    "train.weight_decay": (_nonneg, "a number >= 0"),
    "train.temperature": (_positive, "a number > 0"),
    "fed.method": (lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "fed.rounds": (_nonneg, "an integer >= 0"),
    "fed.participation": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "fed.prox_mu": (_nonneg, "a number >= 0"),
    "fed.moon_mu": (_nonneg, "a number >= 0"),
    "fed.moon_temperature": (_positive, "a number > 0"),
    "rcsr.granularity": (lambda v: v in ("cluster", "global"), "one of cluster, global"),
    "rcsr.anchor_weight": (_nonneg, "a number >= 0"),
    "rcsr.anchor_mode": (lambda v: v in ("instance", "centroid"), "one of instance, centroid"),
    "rcsr.prox_mu": (_nonneg, "a number >= 0"),
    "rcsr.clip_anchor": (_nonneg, "a number >= 0"),
    "rcsr.proto_decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "rcsr.minimax_eta": (_nonneg, "a number >= 0"),
    "rcsr.minimax_tau": (_nonneg, "a number >= 0"),
    "rcsr.router_hidden": (_positive, "a positive integer"),
    "rcsr.router_heads": (_positive, "a positive integer"),
    "rcsr.router_blocks": (_nonneg, "an integer >= 0"),
    "rcsr.router_lr": (_positive, "a number > 0"),
    "rcsr.history_dims": (lambda v: v is None or (type(v) is int and v >= 0), "an integer >= 0, or null (auto)"),
    "eval.protocol": (lambda v: v in ("standard", "diagonal"), "one of standard, diagonal"),
    "eval.every": (_positive, "a positive integer"),
    "eval.local_test_images": (_positive, "a positive integer"),
    "runtime.backend": (lambda v: v in ("ray", "local"), "one of ray, local"),
    "runtime.num_cpus": (lambda v: v is None or v > 0, "a positive integer or null"),
    "runtime.client_cpus": (_positive, "a number > 0"),
    "runtime.client_gpus": (_nonneg, "a number >= 0"),
    "runtime.driver_cpus": (_nonneg, "a number >= 0"),
    "runtime.clients_per_actor": (lambda v: v is None or v > 0, "a positive integer or null (auto)"),
    "runtime.torch_threads": (_positive, "a positive integer"),
    "runtime.server_threads": (_positive, "a positive integer"),
    "runtime.round_timeout_s": (lambda v: v is None or v > 0, "a number of seconds > 0, or null"),
    "runtime.max_restarts": (lambda v: v >= -1, "an integer >= -1 (-1: unlimited)"),
    "runtime.round_retries": (_nonneg, "an integer >= 0"),
    "runtime.checkpoint_every": (_positive, "a positive integer"),
    "runtime.faults": (_valid_faults, "kind@round:client items, comma-separated, kind raise | die | hang"),
}


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    # Resolving annotations is most of a config's build time; sweeps build one per grid point.
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if value is None:
        raise ConfigError(key, value, f"a value of type {tp.__name__} (null is not allowed)")
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        except ValueError:
            raise ConfigError(key, value, "a number") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, value, "a finite number")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(key, value, "an integer")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "a string")
        return value
    return value


def _unknown(key: str) -> str:
    """What to say of an unknown key; a section given a value is named as one."""
    inside = sorted(k for k in _known_keys() if k.startswith(key + "."))
    if inside:
        return f"a section, not a key: set the keys in it, e.g. {inside[0]}=..."
    return "unknown key (see `rcsr-ray config` for the keys)"


def _known_keys(cls=Config, prefix: str = "") -> dict[str, Any]:
    keys = {}
    for name, tp in _field_types(cls).items():
        dotted = prefix + name
        if _is_dataclass_type(tp):
            keys.update(_known_keys(tp, dotted + "."))
        else:
            keys[dotted] = tp
    return keys


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for k, v in tree.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flatten(v, dotted + "."))
        else:
            flat[dotted] = v
    return flat


def _build(cls, flat: dict[str, Any], prefix: str = ""):
    kwargs = {}
    for name, tp in _field_types(cls).items():
        dotted = prefix + name
        if _is_dataclass_type(tp):
            kwargs[name] = _build(tp, flat, dotted + ".")
        elif dotted in flat:
            kwargs[name] = flat[dotted]
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key, value), the value parsed as YAML (so 0.1 is a float, null is None)."""
    if "=" not in text:
        raise ConfigError(text, None, "overrides are written key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                preset: str | None = None) -> Config:
    """Resolve a Config from defaults, a preset, a YAML file and overrides; validate every key."""
    file_flat: dict[str, Any] = {}
    flat: dict[str, Any] = {}  # the overrides
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("--config", str(path), "an existing YAML file")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("--config", str(path), f"valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(tree, dict):
            raise ConfigError("--config", str(path), "a YAML mapping of config keys")
        file_flat = _flatten(tree)
    if isinstance(overrides, dict):
        flat.update(overrides)
    else:
        for item in overrides or []:
            k, v = parse_override(item)
            flat[k] = v
    known = _known_keys()
    for key in [*flat, *file_flat]:
        if key not in known:
            raise ConfigError(key, {**file_flat, **flat}[key], _unknown(key))
    if preset is None and flat.get("preset") is not None:
        preset = flat["preset"]  # preset=S1 among the overrides names it as --preset does
    if preset is not None:
        # Named for this invocation: its keys beat the file's (a saved run's config.yaml sets every
        # key, which would leave the named preset a label only); key=value overrides beat both.
        below, above = file_flat, flat
    else:  # the file's preset (null: none), else the default; below the file's keys
        below, above = {}, {**file_flat, **flat}
        preset = above.get("preset") if "preset" in above else DEFAULT_PRESET
    if preset is not None and preset not in PRESETS:
        raise ConfigError("preset", preset, _CHECKS["preset"][1])
    flat = {**below, **PRESETS.get(preset, {}), **above, "preset": preset}
    for key, value in list(flat.items()):
        flat[key] = _coerce(key, value, known[key])
        check = _CHECKS.get(key)
        if check is not None and not check[0](flat[key]):
            raise ConfigError(key, flat[key], check[1])
    cfg = _build(Config, flat)
    _cross_checks(cfg)
    return cfg


def _cross_checks(cfg: Config) -> None:
    if cfg.data.source == "features" and not cfg.data.path:
        raise ConfigError("data.path", cfg.data.path, "a feature store folder when data.source=features")
    if cfg.model.adapter.placement == "blocks":
        if cfg.data.source != "features":
            raise ConfigError("model.adapter.placement", "blocks", "head unless data.source=features "
                              "(blocks runs the backbone on the store's images; the synthetic benchmark has none)")
        if cfg.rcsr.clip_anchor > 0 and cfg.fed.method == "rcsr":
            raise ConfigError("rcsr.clip_anchor", cfg.rcsr.clip_anchor, "0 with model.adapter.placement=blocks "
                              "(the CLIP anchor compares with cached features, which blocks mode does not use)")
    s = cfg.data.synthetic
    if s.instance_dim > s.dim:
        raise ConfigError("data.synthetic.instance_dim", s.instance_dim, f"at most data.synthetic.dim ({s.dim})")
    if cfg.rcsr.router_hidden % cfg.rcsr.router_heads:
        raise ConfigError("rcsr.router_heads", cfg.rcsr.router_heads,
                          f"a divisor of rcsr.router_hidden ({cfg.rcsr.router_hidden})")
    if s.attributes_per_concept > s.attributes:
        raise ConfigError("data.synthetic.attributes_per_concept", s.attributes_per_concept,
                          f"at most data.synthetic.attributes ({s.attributes})")


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A validated copy of `cfg` with dotted keys replaced (presets are not re-applied)."""
    flat = _flatten(cfg.to_dict())
    flat.update(overrides)
    return load_config(overrides=flat)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
