"""Our Adam and AdamW against torch.optim's, bit for bit, and what they save us: torch._dynamo's import."""
import copy
import pickle
import subprocess
import sys

import pytest
import torch

from rcsr_ray.models.optim import ForeachAdam, FusedAdamW


def _params(seed: int, shapes=((5, 3), (3,), (4, 5))) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def _grads(params, step: int, skip: int | None = None) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        p.grad = None if i == skip else (torch.randn(p.shape, generator=g) * (1 + step)).to(p.device)


def _steps(pairs, steps, skip=None):
    for t in range(steps):
        for params, opt in pairs:
            _grads(params, t, skip if t % 2 else None)  # a parameter without a gradient every other step
            opt.step()


def test_fused_adamw_steps_as_torch_optim_and_swaps_state_with_it():
    ours_p, torch_p = _params(0), _params(0)
    ours, ref = FusedAdamW(ours_p, 3e-2, 0.1), torch.optim.AdamW(torch_p, lr=3e-2, weight_decay=0.1, fused=True)
    _steps([(ours_p, ours), (torch_p, ref)], 4, skip=1)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, torch_p))
    assert not torch.equal(ours_p[0], _params(0)[0])
    # Halfway states cross over both ways (checkpoints written with torch.optim load) and go on alike.
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state["state"].keys() == ref_state["state"].keys() == {0, 1, 2}
    for i in ref_state["state"]:
        for k, v in ref_state["state"][i].items():
            assert torch.equal(ours_state["state"][i][k], v) and ours_state["state"][i][k].dtype == v.dtype, (i, k)
    a_p, b_p = [p.detach().clone().requires_grad_() for p in ours_p], [p.detach().clone().requires_grad_() for p in ours_p]
    a, b = FusedAdamW(a_p, 3e-2, 0.1), torch.optim.AdamW(b_p, lr=3e-2, weight_decay=0.1, fused=True)
    a.load_state_dict(copy.deepcopy(ref_state))  # deep copies: both load without copying, as torch.optim does
    b.load_state_dict(copy.deepcopy(ours_state))
    _steps([(a_p, a), (b_p, b), (ours_p, ours)], 3)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a_p, b_p, ours_p))


def test_foreach_adam_steps_as_torch_optim_and_swaps_state_with_it():
    ours_p, foreach_p, single_p = _params(1), _params(1), _params(1)
    ours = ForeachAdam(ours_p, 1e-2)
    foreach = torch.optim.Adam(foreach_p, lr=1e-2, foreach=True)
    single = torch.optim.Adam(single_p, lr=1e-2, foreach=False)
    _steps([(ours_p, ours), (foreach_p, foreach), (single_p, single)], 5, skip=2)
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(ours_p, foreach_p, single_p))
    assert ours.state[0]["step"].item() == 5 and ours.state[2]["step"].item() == 3
    ref_p = [p.detach().clone().requires_grad_() for p in ours_p]
    ref = torch.optim.Adam(ref_p, lr=1e-2, foreach=True)
    ref.load_state_dict(copy.deepcopy(ours.state_dict()))
    _steps([(ours_p, ours), (ref_p, ref)], 2)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))
    # torch.optim's state loads into ours too (a checkpoint written before models/optim.py).
    ref_state = copy.deepcopy(ref.state_dict())
    again_p = [p.detach().clone().requires_grad_() for p in ref_p]
    again = ForeachAdam(again_p, 1e-2)
    again.load_state_dict(ref_state)
    _steps([(again_p, again), (ref_p, ref)], 2)
    assert all(torch.equal(a, b) for a, b in zip(again_p, ref_p))
    ours.zero_grad()
    assert all(p.grad is None for p in ours_p)
    with pytest.raises(ValueError, match="several devices or of several dtypes"):
        ForeachAdam([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], 1e-3)


def test_state_of_another_parameter_list_is_refused_and_numeric_steps_load():
    state = FusedAdamW(_params(0), 1e-3, 0.0).state_dict()
    with pytest.raises(ValueError, match="holds 3 parameters, this optimizer 2"):
        FusedAdamW(_params(0, shapes=((2,), (3,))), 1e-3, 0.0).load_state_dict(state)
    params = _params(0)
    old = {"state": {0: {"step": 4, "exp_avg": torch.zeros(5, 3), "exp_avg_sq": torch.zeros(5, 3)}},
           "param_groups": [{"params": [0, 1, 2]}]}
    for opt in (ForeachAdam(params, 1e-3), FusedAdamW(params, 1e-3, 0.0)):
        opt.load_state_dict(old)
        assert opt.state[0]["step"].dtype == torch.float32 and opt.state[0]["step"].item() == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_adamw_on_cuda_steps_as_torch_optim_and_loads_cpu_state():
    """Where client workers run on a GPU: the step lives on the device, and saved state comes from the CPU."""
    ours_p = [p.detach().cuda().requires_grad_() for p in _params(2)]
    torch_p = [p.detach().cuda().requires_grad_() for p in _params(2)]
    ours, ref = FusedAdamW(ours_p, 3e-2, 0.1), torch.optim.AdamW(torch_p, lr=3e-2, weight_decay=0.1, fused=True)
    _steps([(ours_p, ours), (torch_p, ref)], 3)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, torch_p))
    assert ours.state[0]["step"].device.type == "cuda"
    on_cpu = {"state": {i: {k: v.cpu() for k, v in st.items()} for i, st in ref.state_dict()["state"].items()},
              "param_groups": ref.state_dict()["param_groups"]}
    a_p = [p.detach().clone().requires_grad_() for p in torch_p]
    a = FusedAdamW(a_p, 3e-2, 0.1)
    a.load_state_dict(on_cpu)
    assert all(t.device.type == "cuda" for st in a.state.values() for t in st.values())
    _steps([(a_p, a), (torch_p, ref)], 2)
    assert all(torch.equal(x, y) for x, y in zip(a_p, torch_p))


def test_training_and_the_server_step_do_not_import_torch_dynamo(small_config, tmp_path):
    """torch.optim imports torch._dynamo (2 s of CPU a process here); a client update with personal
    adapters and an RCSR server round must not."""
    cfg = small_config(**{"fed.method": "rcsr", "rcsr.personal": True, "partition.missing_rate": 0.5})
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(cfg))
    script = f"""
import pickle, sys
from rcsr_ray.data.federation import build_federation
from rcsr_ray.fl.client import ClientWorker
from rcsr_ray.fl.strategy import make_strategy
cfg = pickle.loads(open({str(tmp_path / "cfg.pkl")!r}, "rb").read())
fed = build_federation(cfg)
strategy = make_strategy(cfg, fed.num_clients, fed.partition.num_clusters, fed.store.dim)
worker = ClientWorker(fed, cfg.model.adapter.bottleneck)
params = worker.model.flat.detach().clone()
for r in (1, 2):
    state, settings = strategy.broadcast(r, params), strategy.client_settings(r)
    updates = [worker.update(c, state, settings, cfg.seed, r) for c in range(fed.num_clients)]
    params, _ = strategy.aggregate(r, params, updates)
assert any("personal" in own for own in worker.state.values()), "no personal adapters trained"
assert strategy.router.optimizer.state, "the router took no step"
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "no dynamo"
