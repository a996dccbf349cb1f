"""What the project's training scripts share (``train_scene_vit``, ``train_scene_unet``,
``train_scene_flux``): the scene seeds of the training chunks, the learning-rate schedule,
checkpoints written atomically, CPU time and the library versions recorded in each JSON."""
from __future__ import annotations

import math
import os
import platform
from importlib import import_module
from pathlib import Path

import torch

from attnchain.data import scenes as S
from attnchain.testing.memory import cpu_seconds  # noqa: F401  (re-exported for the scripts)


def chunk_seed(base: int, val_seed: int, seed: int, chunk: int) -> int:
    """Scene seed ``base + 10000 seed + chunk`` of training chunk ``chunk`` of run ``seed``;
    a ``ValueError`` where it would be a held-out seed (the benchmark's or ``val_seed``)."""
    if not 0 <= chunk < 10_000:
        raise ValueError(f"chunk index must be in [0, 10000), got {chunk}")
    out = base + 10_000 * int(seed) + int(chunk)
    if out in (S.BENCHMARK_SEED, val_seed):
        raise ValueError(f"seed {seed} makes chunk {chunk} collide with a held-out seed")
    return out


def check_schedule(cfg) -> None:
    """The checks every training configuration shares: ``cfg.steps`` and ``cfg.batch_size``
    positive, and chunks of scenes made of whole batches (``cfg.chunk_size`` a multiple of
    ``cfg.batch_size``)."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    if cfg.chunk_size % cfg.batch_size:
        raise ValueError(f"chunk_size {cfg.chunk_size} must be a multiple of batch_size "
                         f"{cfg.batch_size}")


def warmup_cosine_lr(cfg, step: int) -> float:
    r"""Learning rate at ``step``: linear warm-up to ``cfg.lr`` over ``cfg.warmup_steps``, then
    cosine decay to ``cfg.min_lr`` at ``cfg.steps``,
    :math:`\eta_{\min} + \tfrac12(\eta - \eta_{\min})(1 + \cos \pi t)`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: an interrupted save never leaves a
    truncated checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def versions(*packages: str) -> dict:
    """Python's version and those of torch, numpy and ``packages``, for a training JSON."""
    return {"python": platform.python_version(),
            **{p: import_module(p).__version__ for p in ("torch", *packages, "numpy")}}
