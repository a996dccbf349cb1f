"""Power iteration for the stationary distribution of a damped chain."""
from __future__ import annotations

import torch

from ..errors import ConvergenceError
from ..operators import DampedChain


class CountedChain:
    """Products of a flat :class:`DampedChain` with row vectors ``x`` of shape (B, N), counting
    the passes (products with the undamped chain, each reads it once)."""

    def __init__(self, chain: DampedChain):
        self.chain, self.alpha, self.passes = chain, chain.alpha, 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x A (undamped): one pass."""
        self.passes += 1
        return self.chain.op.left(x.unsqueeze(1)).squeeze(1)

    def damp(self, x: torch.Tensor, xA: torch.Tensor) -> torch.Tensor:
        """x A' given x A."""
        return self.chain.damp(x.unsqueeze(1), xA.unsqueeze(1)).squeeze(1)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """x A': one pass."""
        return self.damp(x, self.product(x))


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Clip at 0 and scale to sum 1 (rows)."""
    x = x.clamp_min(0)
    return x / x.sum(-1, keepdim=True)


def tol_text(tol) -> str:
    """A tolerance (or the smallest of a tensor of them) for an error message."""
    return f"{float(torch.as_tensor(tol).min()):g}"


def power_from(chain: CountedChain, x, tol, max_iter: int, method: str):
    """Power iteration (lazy when alpha = 1) from x until the L1 rule holds; (y, L1 change)."""
    lazy = chain.alpha == 1.0
    err = None
    while chain.passes < max_iter:
        y = chain.step(x)
        y = y / y.sum(-1, keepdim=True)
        err = (y - x).abs().sum(-1)
        if bool((err < tol).all()):
            return y, err
        x = normalise(0.5 * (x + y)) if lazy else normalise(y)
    worst = float("nan") if err is None else err.max().item()
    raise ConvergenceError(
        f"token_rank(method={method!r}) did not converge in {max_iter} passes: L1 change "
        f"{worst:.3g} >= tol = {tol_text(tol)}", passes=chain.passes, residual=worst)
