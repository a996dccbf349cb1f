r"""Queries and keys with known structure, for testing and benchmarking matrix-free chains.

:func:`planted_qk` gives ``H`` heads of queries and keys whose attention
:math:`\operatorname{softmax}(QK^\top/\sqrt d)` has planted token groups (the attention of
``benchmarks/markov_core.py`` and ``benchmarks/operators.py``); :func:`rope` rotates them by
position as rotary embeddings do (RoFormer, :cite:`su2024roformer`).
"""
from __future__ import annotations

import torch

__all__ = ["planted_qk", "rope"]


def planted_qk(H: int, N: int, d: int = 64, groups: int = 8, strength: float = 0.5,
               seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32):
    r"""Queries and keys ``(H, N, d)`` of heads with planted token groups.

    Every token belongs to one of ``groups`` groups (drawn uniformly); with group centroids
    :math:`c_g \sim N(0, I_d)` per head and noise :math:`z \sim N(0, I_d)`,
    :math:`q_i = t_h(\text{strength}\; c_{g(i)} + z_i)` and
    :math:`k_i = \text{strength}\; c_{g(i)} + z'_i`, with a per-head temperature :math:`t_h`
    from 0.5 to 1.5, so that heads range from fast mixing to strongly structured at the
    logit scale :math:`d^{-1/2}`. Drawn on the CPU from ``seed`` (device independent), then
    moved to ``device`` in ``dtype``.

    Examples
    --------
    >>> q, k = planted_qk(2, 10, d=4)
    >>> tuple(q.shape), tuple(k.shape)
    ((2, 10, 4), (2, 10, 4))
    """
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, groups, (N,), generator=g)
    cent = torch.randn(H, groups, d, generator=g)
    q = strength * cent[:, lab] + torch.randn(H, N, d, generator=g)
    k = strength * cent[:, lab] + torch.randn(H, N, d, generator=g)
    q *= torch.linspace(0.5, 1.5, H)[:, None, None]
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def rope(x: torch.Tensor, base: float = 100.0) -> torch.Tensor:
    r"""Rotary position embedding (rotate-half form) of ``x`` ``(..., N, d)``, ``d`` even:
    features :math:`(x_a, x_{a + d/2})` of token :math:`n` are rotated by the angle
    :math:`n\,\text{base}^{-2a/d}`, so that :math:`q_m \cdot k_n` depends on :math:`m - n`.

    Examples
    --------
    >>> import torch
    >>> x = torch.ones(1, 3, 4)
    >>> torch.allclose(rope(x).norm(dim=-1), x.norm(dim=-1))
    True
    """
    half = x.shape[-1] // 2
    pos = torch.arange(x.shape[-2], dtype=torch.float64)[:, None]
    ang = pos * base ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = ang.cos().to(x), ang.sin().to(x)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)
