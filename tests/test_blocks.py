"""Full-backbone mode (model.adapter.placement=blocks) end to end on a tiny shapes dataset and the
tiny random open_clip model: adapters after every block of both towers, trained through the backbone."""
import math
import warnings

import numpy as np
import pytest
import torch

from rcsr_ray.config import ConfigError, load_config
from rcsr_ray.data.federation import build_federation
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.data.readers import read_dataset
from rcsr_ray.data.shapes import make_shapes_dataset
from rcsr_ray.data.store import FeatureStore, StoreError, write_store
from rcsr_ray.fl.client import ClientSettings, ClientWorker, GlobalState
from rcsr_ray.fl.strategy import make_strategy
from rcsr_ray.models.adapters import apply_adapters
from rcsr_ray.models.backbone import load_backbone
from rcsr_ray.models.blocks import BlockAdapters, BlocksFederation
from rcsr_ray.runtime.loop import METRIC_KEYS, GlobalEvaluator, run_simulation

MODEL = "rcsr-tiny"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Shapes images encoded by the tiny model (random weights from seed 3) into a feature store."""
    root = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(root, {"train": 48, "test": 16}, captions_per_image=3, seed=1)
    data = read_dataset("coco", root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, on purpose
        backbone = load_backbone(MODEL, None, seed=3)
    from PIL import Image

    pixels = np.stack([backbone.preprocess(Image.open(data.image_file(i)).convert("RGB")).numpy()
                       for i in range(data.num_images)])
    out = root / "store"
    write_store(out, backbone.encode_images(pixels), backbone.encode_texts(data.captions), data.caption_image,
                data.splits, image_paths=data.paths, caption_texts=data.captions,
                meta={"root": str(data.root), "model": MODEL, "pretrained": None, "seed": 3})
    return str(out)


def _config(store_path, **over):
    keys = {"data.source": "features", "data.path": store_path, "model.adapter.placement": "blocks",
            "model.adapter.bottleneck": 8, "partition.num_clients": 3, "partition.clusters": 4,
            "partition.min_samples": 8, "partition.alpha": None, "partition.missing_rate": 0.0,
            "fed.participation": 1.0, "fed.method": "fedavg", "fed.rounds": 2, "train.batch_size": 8,
            "train.local_epochs": 1, "train.lr": 1e-2, "eval.every": 1, "eval.local_test_images": 8,
            "runtime.backend": "local"}
    keys.update({k.replace("__", "."): v for k, v in over.items()})
    return load_config(overrides=keys)


def _initial(cfg):
    fed = BlocksFederation.wrap(build_federation(cfg), cfg)
    a = cfg.model.adapter
    return fed, fed.store.build_adapters(a.bottleneck, a.init_scale, cfg.seed, "cpu").flat.clone()


def test_initial_adapters_reproduce_the_frozen_backbone(store_path):
    cfg = _config(store_path)
    fed, params = _initial(cfg)
    features = FeatureStore(store_path)
    evaluator = GlobalEvaluator(fed.store, cfg)
    assert isinstance(evaluator.model, BlockAdapters)
    # Both towers, one adapter per block; all of them in the flat vector.
    assert len(evaluator.model.image_adapters) == 2 and len(evaluator.model.text_adapters) == 2
    assert params.numel() == sum(p.numel() for p in evaluator.model.parameters())
    img, txt = apply_adapters(evaluator.model, params, evaluator.images, evaluator.captions)
    test = features.split("test")
    assert torch.allclose(img, torch.from_numpy(np.asarray(features.image_emb[test.image_rows])), atol=1e-5)
    assert torch.allclose(txt, torch.from_numpy(np.asarray(features.caption_emb[test.caption_rows])), atol=1e-5)
    # Moved adapters change the embeddings (the hooks are live), and are gone after the call.
    moved = params + 0.05 * torch.randn(params.shape, generator=torch.Generator().manual_seed(0))
    img2, txt2 = apply_adapters(evaluator.model, moved, evaluator.images, evaluator.captions)
    assert (img2 - img).abs().max() > 1e-3 and (txt2 - txt).abs().max() > 1e-3
    backbone = evaluator.model._frozen[0].model
    assert all(not b._forward_hooks for b in backbone.visual.transformer.resblocks)
    assert all(not b._forward_hooks for b in backbone.transformer.resblocks)


def test_pixels_are_kept_as_bytes_and_normalised_to_the_preprocessed_bits(store_path):
    """Shards hold uint8 pixels, a quarter of the float ones; the adapters turn them into exactly
    what open_clip's preprocessing gives, so training and evaluation see the same numbers."""
    from PIL import Image

    fed, _ = _initial(_config(store_path))
    shard = fed.shard(0)
    assert shard.image_emb.dtype == np.uint8 and shard.image_emb.shape[1:] == (3, 32, 32)
    backbone = fed.store.backbone
    rows = fed.train.image_rows[fed.partition.client_indices[0]]
    paths = fed.store.features.images["path"].to_numpy()[rows]
    floats = torch.stack([backbone.preprocess(Image.open(fed.store.root / str(p)).convert("RGB")) for p in paths])
    assert torch.equal(backbone.from_bytes(torch.from_numpy(shard.image_emb)), floats)
    assert floats.numel() * floats.element_size() == 4 * shard.image_emb.nbytes
    # The adapters take either form alike.
    model = fed.store.build_adapters(8, 0.0, 0, "cpu")
    assert torch.equal(model.image(torch.from_numpy(shard.image_emb[:4])), model.image(floats[:4]))


def test_client_update_trains_every_block_of_both_towers(store_path):
    cfg = _config(store_path)
    fed, params = _initial(cfg)
    worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
    client = int(np.flatnonzero(fed.partition.modality == PAIRED)[0])
    settings = ClientSettings(3, 8, 1e-2, 0.0, 0.07)
    u = worker.update(client, GlobalState(params), settings, 0, 1)
    assert u.steps > 0 and math.isfinite(u.loss) and u.delta.shape == params.shape
    # Every adapter's up-projection (zero at the start) moved: gradients reach all blocks.
    offset = 0
    for adapter in [*worker.model.image_adapters, *worker.model.text_adapters]:
        for name, p in adapter.named_parameters():
            if name == "up.weight":
                assert u.delta[offset:offset + p.numel()].abs().max() > 0, name
            offset += p.numel()
    again = ClientWorker(fed, cfg.model.adapter.bottleneck).update(client, GlobalState(params), settings, 0, 1)
    assert torch.equal(u.delta, again.delta)  # deterministic


def test_text_only_client_decodes_no_images_and_trains_as_with_them(store_path):
    """A text-only client's shard skips decoding its images; its update (anchored to prototypes)
    and its prototypes are exactly what they were with the pixels in the shard."""
    import dataclasses

    from rcsr_ray.data.partition import TEXT_ONLY

    cfg = _config(store_path, **{"partition.missing_rate": 0.34, "partition.image_only_share": 0.0})
    fed, params = _initial(cfg)
    client = int(np.flatnonzero(fed.partition.modality == TEXT_ONLY)[0])
    shard = fed.shard(client)
    rows = fed.train.image_rows[fed.partition.client_indices[client]]
    assert shard.image_emb.shape == (len(rows), 0) and shard.num_images == len(rows) >= 2
    with_pixels = dataclasses.replace(shard, image_emb=np.asarray(fed.store.image_emb[rows]))
    assert with_pixels.image_emb.shape == (len(rows), 3, 32, 32)

    clusters, dim = fed.partition.num_clusters, fed.store.dim
    g = torch.Generator().manual_seed(0)
    protos = {"image": torch.randn(clusters, dim, generator=g), "text": torch.randn(clusters, dim, generator=g),
              "seen": torch.ones(clusters, 2, dtype=torch.bool)}
    settings = ClientSettings(2, 8, 1e-2, 0.0, 0.07, anchor_weight=1.0, report_prototypes=True, num_clusters=clusters)
    updates = []
    for held in (shard, with_pixels):
        worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
        worker.shards[client], worker.state[client] = held, {}
        updates.append(worker.update(client, GlobalState(params, protos), settings, 0, 1))
    without, before = updates
    assert without.steps > 0 and without.delta.abs().max() > 0
    assert torch.equal(without.delta, before.delta) and without.loss == before.loss
    assert without.prototypes.keys() == before.prototypes.keys() and "image_sum" not in without.prototypes
    assert all(torch.equal(without.prototypes[k], before.prototypes[k]) for k in without.prototypes)


@pytest.mark.parametrize("method, over", [("fedavg", {}),
                                          ("rcsr", {"partition.missing_rate": 0.34})])
def test_blocks_run_end_to_end(store_path, method, over):
    cfg = _config(store_path, **{"fed.method": method, **over})
    res = run_simulation(cfg, progress=False)
    _, initial = _initial(cfg)
    assert res.params.shape == initial.shape and not torch.equal(res.params, initial)
    assert [r["round"] for r in res.metrics] == [0, 1, 2]
    for row in res.metrics:
        assert all(math.isfinite(row[k]) for k in METRIC_KEYS), row
    assert res.metrics[-1]["trained_clients"] > 0
    assert len(res.clients) == cfg.partition.num_clients and res.clients["i2t_r1"].notna().all()
    # Round 0 (the adapters at their zero state) is the frozen backbone: head mode's zero-shot.
    head = run_simulation(_config(store_path, **{"fed.method": "zeroshot", "model.adapter.placement": "head"}),
                          progress=False)
    assert {k: res.metrics[0][k] for k in METRIC_KEYS} == {k: head.metrics[0][k] for k in METRIC_KEYS}


def test_blocks_config_errors(store_path, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.adapter\.placement='blocks'.*data\.source=features"):
        load_config(overrides={"model.adapter.placement": "blocks"})
    with pytest.raises(ConfigError, match=r"model\.adapter\.placement='tail'.*one of head, blocks"):
        _config(store_path, **{"model.adapter.placement": "tail"})
    with pytest.raises(ConfigError, match=r"rcsr\.clip_anchor=0\.1"):
        _config(store_path, **{"fed.method": "rcsr", "rcsr.clip_anchor": 0.1})
    # A backbone of another width than the store's embeddings is caught before anything is loaded.
    cfg = _config(store_path, **{"model.name": "RN50"})
    with pytest.raises(ConfigError, match=r"model\.name='RN50'.*32-d, RN50's are 1024-d"):
        run_simulation(cfg, progress=False)
    # A store with no recorded model and none configured.
    bare = FeatureStore(store_path)
    write_store(tmp_path / "bare", bare.image_emb, bare.caption_emb, bare.caption_image,
                bare.images["split"].to_numpy(), image_paths=bare.images["path"].tolist(),
                caption_texts=bare.captions["text"].tolist())
    with pytest.raises(ConfigError, match=r"model\.name=None.*records none"):
        run_simulation(_config(str(tmp_path / "bare")), progress=False)
    # Images that went missing since the encode: a StoreError naming the file.
    write_store(tmp_path / "moved", bare.image_emb, bare.caption_emb, bare.caption_image,
                bare.images["split"].to_numpy(), image_paths=bare.images["path"].tolist(),
                caption_texts=bare.captions["text"].tolist(),
                meta={"root": str(tmp_path / "nowhere"), "model": MODEL, "seed": 3})
    with pytest.raises(StoreError, match=r"nowhere.*cannot be read"):
        run_simulation(_config(str(tmp_path / "moved")), progress=False)


def test_blocks_on_ray_actors_equal_local(store_path, ray_session):
    # A client actor loads the backbone itself (from the store's meta.json) and reads its clients' images.
    cfg = _config(store_path, **{"fed.rounds": 1})
    local = run_simulation(cfg, progress=False)
    remote = run_simulation(_config(store_path, **{"fed.rounds": 1, "runtime.backend": "ray",
                                                   "runtime.clients_per_actor": 3}), progress=False)
    assert torch.equal(local.params, remote.params)
    assert local.metrics[-1]["mean_r1"] == remote.metrics[-1]["mean_r1"]


def _rcsr_on(store_path, devices: tuple[str, str]):
    """Two rounds of RCSR with personal adapters on half-unimodal clients, every client trained by a
    worker on each device from the same global state; both devices' updates and local evaluations."""
    cfg = _config(store_path, **{"fed.method": "rcsr", "partition.missing_rate": 0.34, "rcsr.personal": True})
    fed, params = _initial(cfg)
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    workers = [ClientWorker(fed, cfg.model.adapter.bottleneck, device=d) for d in devices]
    updates = ([], [])
    for r in (1, 2):
        state, settings = strategy.broadcast(r, params), strategy.client_settings(r)
        for out, w in zip(updates, workers):
            out.extend(w.update(c, state, settings, cfg.seed, r) for c in range(fed.num_clients))
        params, _ = strategy.aggregate(r, params, updates[0][-fed.num_clients:])
    paired = int(np.flatnonzero(fed.partition.modality == PAIRED)[0])
    return updates, [w.evaluate_local(paired, params) for w in workers]


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / (a.norm() + 1e-12))


def test_blocks_rcsr_workers_repeat_on_one_device(store_path):
    """The comparison below, CPU against CPU: two workers give the same bits (so a gap on the GPU is the device's)."""
    (a, b), (local_a, local_b) = _rcsr_on(store_path, ("cpu", "cpu"))
    assert sum(u.delta is not None for u in a) >= 4 and any(u.prototypes for u in a)
    for x, y in zip(a, b):
        assert (x.delta is None and y.delta is None) or torch.equal(x.delta, y.delta)
        assert (x.prototypes or {}).keys() == (y.prototypes or {}).keys()
        assert all(torch.equal(v, y.prototypes[k]) for k, v in (x.prototypes or {}).items())
    assert local_a == local_b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocks_on_cuda_match_the_cpu(store_path):
    """What the README gives client actors GPUs for. The backbone, its adapter hooks and the byte
    pixels on the device embed as on the CPU; trained there, updates, prototypes and local R@1 agree
    up to float rounding. With cuDNN's default TF32 convolutions, which `load_backbone` turns off on
    a GPU, they were up to 2% apart on an H200."""
    fed, params = _initial(_config(store_path))
    moved = params + 0.05 * torch.randn(params.shape, generator=torch.Generator().manual_seed(0))
    shard = fed.shard(0)
    embedded = []
    for device in ("cpu", "cuda"):
        model = fed.store.build_adapters(8, 0.0, 0, device)
        model.load_flat(moved.to(device))
        with torch.no_grad():
            embedded.append([model.image(torch.from_numpy(shard.image_emb).to(device)).cpu(),
                             model.text(torch.from_numpy(shard.caption_emb).to(device)).cpu()])
    for a, b in zip(*embedded):
        assert _gap(a, b) <= 1e-5, _gap(a, b)
    (cpu, gpu), (local_cpu, local_gpu) = _rcsr_on(store_path, ("cpu", "cuda"))
    gaps = []
    for a, b in zip(cpu, gpu):
        assert (a.delta is None) == (b.delta is None) and (a.prototypes or {}).keys() == (b.prototypes or {}).keys()
        if a.delta is not None:
            assert b.delta.device.type == "cpu"
            gaps.append(_gap(a.delta, b.delta))
        for k, v in (a.prototypes or {}).items():
            assert b.prototypes[k].device.type == "cpu"
            gaps.append(_gap(v, b.prototypes[k]))
    assert gaps and max(gaps) <= 1e-3, sorted(gaps)[-5:]
    for k in local_cpu:  # R@1 in percent over 8 local test images: at most a near-tie flips
        assert abs(local_cpu[k] - local_gpu[k]) <= 12.5, (k, local_cpu[k], local_gpu[k])
    print(f"blocks on cuda: embeddings within {max(_gap(a, b) for a, b in zip(*embedded)):.1e}; "
          f"{len(gaps)} trained tensors within {max(gaps):.1e} (median {sorted(gaps)[len(gaps) // 2]:.1e})")
