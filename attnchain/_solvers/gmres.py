"""The stationary distribution of a damped chain: restarted GMRES, verified by one damped step.

Solves :math:`\\pi (I - \\alpha A) = (1 - \\alpha) p` (:math:`\\alpha < 1`), or
:math:`\\pi (I - A + \\mathbf 1 u^\\top) = u^\\top` (:math:`\\alpha = 1`), in the row-vector space,
batched over the chains of a flat :class:`~attnchain.operators.DampedChain`; falls back to power
iteration when GMRES stagnates.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..errors import ConvergenceError
from ..operators import DampedChain
from . import cache_groups
from .power import CountedChain, normalise, power_from, tol_text


def gmres_cycle(op, x0, r, m: int, target: torch.Tensor, budget: int):
    """One restarted-GMRES cycle for the batched row-vector system ``op(x) = b``.

    ``r = b - op(x0)`` is the initial residual. Returns the improved iterate and the number of
    operator applications used. Stops early when every batch member's least-squares residual
    estimate (L2) is below ``target`` (B,).
    """
    B, N = x0.shape
    used = 0
    beta = r.norm(dim=-1)
    V = x0.new_zeros(B, m + 1, N)
    H = x0.new_zeros(B, m + 1, m)
    V[:, 0] = r / beta.clamp_min(torch.finfo(r.dtype).tiny).unsqueeze(-1)
    e1 = x0.new_zeros(B, m + 1)
    e1[:, 0] = beta
    y = x0.new_zeros(B, 0)
    k = 0
    for j in range(m):
        if used >= budget:
            break
        w = op(V[:, j])
        used += 1
        Vj = V[:, : j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice (CGS2)
            h = torch.matmul(Vj, w.unsqueeze(-1)).squeeze(-1)  # (B, j+1)
            w = w - torch.matmul(h.unsqueeze(1), Vj).squeeze(1)
            H[:, : j + 1, j] += h
        hn = w.norm(dim=-1)
        H[:, j + 1, j] = hn
        ok = hn > 1e-30
        V[:, j + 1] = torch.where(ok.unsqueeze(-1), w / hn.clamp_min(1e-30).unsqueeze(-1), 0.0)
        k = j + 1
        Hk = H[:, : k + 1, :k]
        y = torch.matmul(torch.linalg.pinv(Hk), e1[:, : k + 1].unsqueeze(-1)).squeeze(-1)
        res = (e1[:, : k + 1] - torch.matmul(Hk, y.unsqueeze(-1)).squeeze(-1)).norm(dim=-1)
        if bool((res <= target).all()):
            break
    if k == 0:
        return x0, used
    return x0 + torch.matmul(y.unsqueeze(1), V[:, :k]).squeeze(1), used


def stationary_group(damped: DampedChain, tol, max_iter: int, method: str, x0=None):
    """The stationary distributions of a flat damped chain (B chains); (pi, L1 change, passes).
    ``tol``: one tolerance, or one per chain (B,). ``x0`` (B, N): the first iterate (a warm
    start, normalised), else the teleport distribution ``p``."""
    chain = CountedChain(damped)
    alpha, P2 = damped.alpha, damped.p
    B, N = P2.shape
    start = P2.clone() if x0 is None else x0.clone()
    if method == "power":
        x, err = power_from(chain, start, tol, max_iter, "power")
        return x, err, chain.passes
    # op(v) = v (I - alpha A + c 1 u^T): alpha < 1 -> c = 0, b = (1 - alpha) p;
    # alpha = 1 -> c = 1, u = 1/N, b = u (non-singular iff pi is unique)
    if alpha < 1.0:
        b, cu = (1.0 - alpha) * P2, 0.0
    else:
        b, cu = torch.full_like(P2, 1.0 / N), 1.0 / N

    def op(v):
        return v - alpha * chain.product(v) + cu * v.sum(-1, keepdim=True)

    m = min(30, N)
    x = normalise(start)
    # the L1 norm is at most sqrt(N) times the L2 norm
    target = torch.as_tensor(0.5 * tol / math.sqrt(N), dtype=P2.dtype, device=P2.device
                             ).expand(B)
    prev = None
    while True:
        xA = chain.product(x)  # one pass gives both the L1 check and GMRES's residual
        y = chain.damp(x, xA)
        y = y / y.sum(-1, keepdim=True)
        err = (y - x).abs().sum(-1)
        if bool((err < tol).all()):
            x = y
            break
        if chain.passes >= max_iter:
            raise ConvergenceError(
                f"token_rank did not converge in {max_iter} passes: L1 change "
                f"{err.max().item():.3g} >= tol = {tol_text(tol)}", passes=chain.passes,
                residual=err.max().item())
        if prev is not None and bool(((err >= tol) & (err > 0.5 * prev)).any()):
            # GMRES stagnates (possible for strongly non-normal chains): fall back to the
            # damped/lazy power iteration from the current iterate, which always converges.
            x, err = power_from(chain, x, tol, max_iter, "krylov")
            break
        prev = err
        r0 = b - (x - alpha * xA + cu * x.sum(-1, keepdim=True))
        x, _ = gmres_cycle(op, x, r0, m, target, max_iter - chain.passes)
        x = normalise(x)
    return x, err, chain.passes


def stationary(damped: DampedChain, tol, max_iter: int, method: str, group_bytes: int,
               check: Optional[Callable] = None, x0: Optional[torch.Tensor] = None):
    """:func:`stationary_group` over cache-sized groups of a flat damped chain, each checked by
    ``check(s)`` (when given) just before its first product, from the first iterates ``x0``
    (B, N) when given; returns (pi (B, N), L1 change (B,), passes in units of the whole
    batch)."""
    B = damped.batch_shape[0]
    if B == 0:
        empty = damped.p.new_zeros(0, damped.n)
        return empty, empty[:, 0], 0.0
    xs, errs, passes = [], [], 0.0
    for s in cache_groups(damped, group_bytes):
        if check is not None:
            check(s)
        x, err, n = stationary_group(damped[s], tol[s] if torch.is_tensor(tol) else tol,
                                     max_iter, method, None if x0 is None else x0[s])
        xs.append(x)
        errs.append(err)
        passes += n * x.shape[0] / B
    return torch.cat(xs), torch.cat(errs), passes


def adjoint(damped: DampedChain, g: torch.Tensor, rtol: float, max_iter: int) -> torch.Tensor:
    """The column vectors ``w`` (B, N) with :math:`M w = g`,
    :math:`M = I - \\alpha A + c\\,\\mathbf 1 u^\\top`, for the chains of a flat damped chain:
    the transpose of the stationary system, which gradients of :math:`\\pi` need. Restarted
    GMRES on products ``A w`` (``op.right``) until ``||g - M w|| <= rtol ||g||`` for every
    chain."""
    alpha, op = damped.alpha, damped.op
    B, N = g.shape
    cu = 0.0 if alpha < 1.0 else 1.0 / N

    def M(v):
        return v - alpha * op.right(v.unsqueeze(-1)).squeeze(-1) + cu * v.sum(-1, keepdim=True)

    target = rtol * g.norm(dim=-1)
    w, r, passes = torch.zeros_like(g), g, 0
    while bool((r.norm(dim=-1) > target).any()):
        if passes >= max_iter:
            worst = (r.norm(dim=-1) / g.norm(dim=-1).clamp_min(1e-300)).max().item()
            raise ConvergenceError(
                f"token_rank's gradient did not converge in {max_iter} passes: relative "
                f"residual {worst:.3g} > {rtol:g}", passes=passes, residual=worst)
        w, used = gmres_cycle(M, w, r, min(30, N), 0.5 * target, max_iter - passes)
        passes += used + 1
        r = g - M(w)
    return w
