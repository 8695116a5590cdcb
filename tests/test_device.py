"""Client training on a torch device: CPU results are unchanged; a GPU gives the CPU's results (allclose)."""
import numpy as np
import pytest
import torch

from rcsr_ray.data.federation import build_federation
from rcsr_ray.data.partition import PAIRED
from rcsr_ray.fl.client import ClientSettings, ClientWorker
from rcsr_ray.fl.strategy import make_strategy


pytestmark = pytest.mark.usefixtures("one_thread")

S4 = {"partition.alpha": 0.1, "partition.missing_rate": 0.5, "fed.method": "rcsr", "rcsr.personal": True}


def _rounds(small_config, device, rounds=2):
    """Two rounds of RCSR (prototypes, geometry, personal adapters) and one of MOON, on one worker;
    every client's updates and its private state afterwards."""
    cfg = small_config(**S4)
    fed = build_federation(cfg)
    strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
    worker = ClientWorker(fed, cfg.model.adapter.bottleneck, device=device) if device else \
        ClientWorker(fed, cfg.model.adapter.bottleneck)
    params = worker.model.flat.detach().cpu().clone()
    updates = []
    for r in range(1, rounds + 1):
        state = strategy.broadcast(r, params)
        batch = [worker.update(c, state, strategy.client_settings(r), cfg.seed, r) for c in range(fed.num_clients)]
        params, _ = strategy.aggregate(r, params, batch)
        updates += batch
    moon = ClientSettings.from_config(cfg, moon_mu=1.0, prox_mu=0.01)
    paired = int(np.flatnonzero(fed.partition.modality == PAIRED)[0])
    updates.append(worker.update(paired, strategy.broadcast(rounds + 1, params), moon, cfg.seed, rounds + 1))
    local = worker.evaluate_local(paired, params)
    return updates, worker.state, params, local


def _tensors(updates, state):
    """Every tensor a worker hands out or keeps, by a readable name."""
    out = {}
    for i, u in enumerate(updates):
        for key in ("delta", "geometry"):
            if getattr(u, key) is not None:
                out[f"update{i}.{key}"] = getattr(u, key)
        for key, v in (u.prototypes or {}).items():
            out[f"update{i}.prototypes.{key}"] = v
    for c, own in state.items():
        for key, v in own.items():
            if isinstance(v, torch.Tensor):
                out[f"client{c}.{key}"] = v
            elif key == "personal_opt":
                for p, st in v["state"].items():
                    out.update({f"client{c}.opt{p}.{k}": t for k, t in st.items()})
    return out


def test_cpu_device_is_the_default(small_config):
    base_updates, base_state, base_params, base_local = _rounds(small_config, None)
    updates, state, params, local = _rounds(small_config, "cpu")
    assert torch.equal(base_params, params) and base_local == local
    a, b = _tensors(base_updates, base_state), _tensors(updates, state)
    assert a.keys() == b.keys() and any(k.endswith("personal") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(float(t.abs().sum()) > 0 for k, t in a.items() if k.endswith("delta"))


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float rounding, by norm: Adam can flip the sign of a step on a near-zero gradient."""
    a, b = a.double(), b.double()
    return float((a - b).norm()) <= 1e-3 * float(a.norm()) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(small_config):
    cpu_updates, cpu_state, cpu_params, cpu_local = _rounds(small_config, "cpu")
    updates, state, params, local = _rounds(small_config, "cuda")
    a, b = _tensors(cpu_updates, cpu_state), _tensors(updates, state)
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].device.type == "cpu", k  # the server and checkpoints never see the device
        assert _close(a[k], b[k]), (k, float((a[k].double() - b[k].double()).norm()), float(a[k].double().norm()))
    assert _close(cpu_params, params)
    for k in cpu_local:  # retrieval R@1 in percent on ~100 images: at most a near-tie flips
        assert abs(cpu_local[k] - local[k]) <= 2.0, (k, cpu_local[k], local[k])
