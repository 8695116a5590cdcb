"""Adam and AdamW as torch.optim computes them, without torch.optim.

torch.optim imports torch._dynamo on an optimizer's first construction and step: about 2 s of CPU
in every process (here; 5-9 s for each of ten client actors starting at once), paid by each client
actor at its first update, by the driver at the router's first step, and again by every Tune
trial's processes. These classes call the same kernels with the same arguments, so the same bits
(tests compare them step by step with torch.optim), and keep torch.optim's state_dict layout, so
checkpoints written with torch.optim's optimizers load.
"""
from __future__ import annotations

import torch

BETAS = (0.9, 0.999)
EPS = 1e-8


class _AdamState:
    """Parameters, hyperparameters and per-parameter moments (created on a parameter's first step)."""

    fused = False  # torch.optim hosts `step` on the parameter's device when fused, else on the CPU

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = list(params)
        if len({(p.device, p.dtype) for p in self.params}) > 1:
            # torch.optim groups by both, which sets its order of operations; one group keeps it plain
            raise ValueError(f"{type(self).__name__}: parameters on several devices or of several dtypes")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def _step_dtype(self) -> torch.dtype:
        """torch.optim's `_get_scalar_dtype`: float32 when fused, else follows the default dtype."""
        return torch.float64 if not self.fused and torch.get_default_dtype() == torch.float64 else torch.float32

    def _moments(self, i: int, p: torch.Tensor) -> dict[str, torch.Tensor]:
        if i not in self.state:
            step = torch.zeros((), dtype=self._step_dtype(), device=p.device if self.fused else "cpu")
            self.state[i] = {"step": step, "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[i]

    def _with_grads(self) -> list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]]:
        return [(p, p.grad, self._moments(i, p)) for i, p in enumerate(self.params) if p.grad is not None]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def state_dict(self) -> dict:
        """torch.optim's layout; the moments are the live tensors, as there."""
        group = {"lr": self.lr, "betas": BETAS, "eps": EPS, "weight_decay": self.weight_decay, "amsgrad": False,
                 "maximize": False, "foreach": None if self.fused else True, "capturable": False,
                 "differentiable": False, "fused": self.fused or None, "decoupled_weight_decay": self.fused,
                 "params": list(range(len(self.params)))}
        return {"state": dict(self.state), "param_groups": [group]}

    def load_state_dict(self, state: dict) -> None:
        """The moments of `state` (ours or torch.optim's), moved as torch.optim moves them: to each
        parameter's device and dtype, without a copy where they already match. The hyperparameters
        stay this optimizer's own."""
        saved_params = [i for group in state["param_groups"] for i in group["params"]]
        if len(saved_params) != len(self.params):
            raise ValueError(f"{type(self).__name__}: the state holds {len(saved_params)} parameters, "
                             f"this optimizer {len(self.params)}")
        self.state = {}
        for i, saved in state["state"].items():
            p = self.params[int(i)]
            moments = {k: v.to(dtype=p.dtype, device=p.device) for k, v in saved.items() if k != "step"}
            step = saved["step"]
            if not isinstance(step, torch.Tensor):  # torch.optim's older checkpoints kept a number
                step = torch.tensor(float(step), dtype=self._step_dtype())
            moments["step"] = step.to(dtype=torch.float32, device=p.device) if self.fused else step
            self.state[int(i)] = moments


class FusedAdamW(_AdamState):
    """torch.optim.AdamW(params, lr, weight_decay=..., fused=True): one kernel a step for all parameters."""

    fused = True

    @torch.no_grad()
    def step(self) -> None:
        live = self._with_grads()
        if not live:
            return
        params, grads, moments = zip(*live)
        steps = [m["step"] for m in moments]
        torch._foreach_add_(steps, 1)
        torch._fused_adamw_(list(params), list(grads), [m["exp_avg"] for m in moments],
                            [m["exp_avg_sq"] for m in moments], [], steps, amsgrad=False, lr=self.lr,
                            beta1=BETAS[0], beta2=BETAS[1], weight_decay=self.weight_decay, eps=EPS,
                            maximize=False, grad_scale=None, found_inf=None)


class ForeachAdam(_AdamState):
    """torch.optim.Adam(params, lr, foreach=True) without weight decay."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr, 0.0)

    @torch.no_grad()
    def step(self) -> None:
        live = self._with_grads()
        if not live:
            return
        params, grads, moments = (list(x) for x in zip(*live))
        steps, avgs, sqs = ([m[k] for m in moments] for k in ("step", "exp_avg", "exp_avg_sq"))
        beta1, beta2 = BETAS
        torch._foreach_add_(steps, torch.tensor(1.0), alpha=1.0)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        counts = [s.item() for s in steps]
        step_size = [(self.lr / (1 - beta1 ** n)) * -1 for n in counts]
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, [(1 - beta2 ** n) ** 0.5 for n in counts])
        torch._foreach_add_(denom, EPS)
        torch._foreach_addcdiv_(params, avgs, denom, step_size)
