"""Checkpoints in the run folder: everything a run needs to continue bit-identically.

Global adapters, strategy state (router, minimax weights, prototypes, ...), metrics so far,
counters and every client's private state (personal adapters and their optimizer state, MOON's
previous model, local-only adapters). Client randomness derives from (seed, round, client id), so
no RNG state is needed beyond what the strategy holds. Written atomically; a checkpoint of another
config, or of an older layout of that state, is ignored.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from rcsr_ray.config import Config
from rcsr_ray.runtime.folder import results_config

log = logging.getLogger(__name__)
NAME = "checkpoint.pt"
# Bumped whenever what a checkpoint holds changes shape (2: one flat AdamW state per personal
# adapter set; RCSR's previous updates kept by the server), so an older file is not resumed wrongly.
FORMAT = 2


def _identity(tree: dict, layout: int) -> dict:
    """What must match for a checkpoint to be resumed: its layout and the config's results keys (a
    stored identity is read through `results_config` again: keys freed since are free for it too)."""
    return {**results_config(tree), "format": layout}


def save(out_dir, cfg: Config, round_idx: int, params, rows, counts, strategy_state, client_state,
         seconds: float) -> Path:
    """`seconds`: the run's wall time so far, which a resumed run goes on counting from."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{NAME}.tmp"
    torch.save({"config": _identity(cfg.to_dict(), FORMAT), "round": round_idx, "params": params, "rows": rows,
                "counts": counts, "strategy": strategy_state, "clients": client_state, "seconds": seconds}, tmp)
    os.replace(tmp, out / NAME)
    return out / NAME


def load(out_dir, cfg: Config) -> dict | None:
    path = Path(out_dir) / NAME
    if not path.is_file():
        return None
    ckpt = torch.load(path, weights_only=False)  # our own file: it holds optimizer and router objects
    stored = ckpt["config"]
    if _identity(stored, stored.get("format")) != _identity(cfg.to_dict(), FORMAT):
        log.warning("%s was written by another config or version; starting afresh", path)
        return None
    return ckpt
