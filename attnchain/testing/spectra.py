r"""Attention heads with known hard spectra, for testing and benchmarking :func:`attnchain.lambda2`.

Each generator returns ``H`` row-stochastic heads ``(H, N, N)`` (float32 by default), seeded and
device independent (drawn on the CPU in float64). The kinds span the spectra that make
:math:`|\lambda_2|` easy or hard for Krylov methods:

- ``"planted"``: softmax of :math:`t\,qk^\top/8` with 8 planted token groups (the heads of
  ``benchmarks/markov_core.py``): :math:`|\lambda_2|` stands clear of the rest.
- ``"noisy"``: softmax of :math:`T\,qk^\top/8` with :math:`q, k \sim N(0, I_{64})`: a
  random-matrix bulk, many eigenvalues of nearly the largest magnitude, complex pairs among them.
- ``"shift"``: :math:`0.8\,S + 0.2\,\mathrm{softmax}(qk^\top/8)` with :math:`S` the cyclic shift
  to the previous token (positional heads of text models): eigenvalues near a circle of radius
  0.8, all of nearly the same magnitude.
- ``"cycle"``: tokens in 4 blocks, each attending mostly to the next block (near-periodic): a
  complex pair :math:`|\lambda_2| = |\lambda_3|` near 0.9 and a real :math:`\lambda \approx -0.9`.
- ``"degenerate"``: two planted blocks of equal size and a symmetric leak, so that
  :math:`\lambda_2 \approx \lambda_3` (real, nearly degenerate), from :func:`planted_chain`
  with three blocks.

The reference is ``torch.linalg.eigvals`` in float64 (:func:`reference_lambda2`).
"""
from __future__ import annotations

import torch

from .._solvers import dense

__all__ = ["KINDS", "heads", "reference_lambda2"]

#: The kinds of :func:`heads`.
KINDS = ("planted", "noisy", "shift", "cycle", "degenerate")


def _qk(H: int, N: int, g: torch.Generator, d: int = 64):
    q = torch.randn(H, N, d, generator=g, dtype=torch.float64)
    k = torch.randn(H, N, d, generator=g, dtype=torch.float64)
    return q, k


def heads(kind: str, H: int, N: int, seed: int = 0, temperature: float = 2.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r"""``H`` heads of ``N`` tokens of one kind (module docstring).

    Parameters
    ----------
    kind : {"planted", "noisy", "shift", "cycle", "degenerate"}
    H, N : int
        Heads and tokens (``N >= 8``).
    seed : int
        Seed of a private generator.
    temperature : float
        :math:`T` of ``"noisy"`` (1, 2 and 3 give :math:`|\lambda_2|` near 0.03, 0.13, 0.31 at
        N = 2,048).
    dtype : torch.dtype
        Of the result.

    Returns
    -------
    Tensor, shape (H, N, N)
        Row-stochastic heads.

    Examples
    --------
    >>> A = heads("shift", 2, 64)
    >>> A.shape, bool(torch.allclose(A.sum(-1), torch.ones(2, 64)))
    (torch.Size([2, 64, 64]), True)
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if N < 8:
        raise ValueError(f"N must be >= 8, got {N}")
    g = torch.Generator().manual_seed(seed)
    if kind == "planted":
        lab = torch.randint(0, 8, (N,), generator=g)
        cent = torch.randn(H, 8, 64, generator=g, dtype=torch.float64)
        q, k = _qk(H, N, g)
        q, k = q + 0.5 * cent[:, lab], k + 0.5 * cent[:, lab]
        t = torch.linspace(0.5, 1.5, H, dtype=torch.float64)[:, None, None]
        A = torch.softmax(t * q @ k.mT / 8, -1)
    elif kind == "noisy":
        q, k = _qk(H, N, g)
        A = torch.softmax(temperature * q @ k.mT / 8, -1)
    elif kind == "shift":
        q, k = _qk(H, N, g)
        S = torch.roll(torch.eye(N, dtype=torch.float64), -1, dims=-1)
        A = 0.8 * S + 0.2 * torch.softmax(q @ k.mT / 8, -1)
    elif kind == "cycle":
        block = torch.arange(N) * 4 // N
        nxt = (block[:, None] + 1) % 4 == block[None, :]
        w = torch.rand(H, N, N, generator=g, dtype=torch.float64)
        on = torch.where(nxt, w, 0.0)
        A = 0.9 * on / on.sum(-1, keepdim=True) + 0.1 * w / w.sum(-1, keepdim=True)
    else:  # degenerate
        from ..chain import planted_chain
        sizes = [N // 3, N // 3, N - 2 * (N // 3)]
        A = torch.stack([planted_chain(sizes, leak=0.05, concentration=4.0,
                                       seed=seed * 1000 + h, dtype=torch.float64)[0]
                         for h in range(H)])
    A = A / A.sum(-1, keepdim=True)
    return A.to(dtype)


def reference_lambda2(A: torch.Tensor) -> torch.Tensor:
    """:math:`|\\lambda_2|` of each head by ``torch.linalg.eigvals`` in float64 (the reference)."""
    ev = dense.eigvals(A.to(torch.float64)).abs()
    return torch.topk(ev, 2, dim=-1).values[..., 1]
