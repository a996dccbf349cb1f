"""|λ2| by thick-restarted block Krylov iteration with Rayleigh-Ritz on the zero-mean vectors.

On the zero-mean vectors :math:`x \\mapsto P A x` (:math:`P` removes the mean) has the spectrum of
``A`` with :math:`\\lambda_1 = 1` replaced by 0, so its dominant eigenvalue magnitude is
:math:`|\\lambda_2|`. Products are taken through ``op.right`` in the row layout: the rows ``X``
of a block give the rows :math:`(A x)^\\top` of ``op.right(X.mT).mT``.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from scipy.linalg import schur

from ..errors import ConvergenceError
from ..operators import ChainOperator
from . import cache_groups, dense

#: Block size of the Krylov iteration: the basis grows by this many directions per pass.
KRYLOV_BLOCK = 3


def zero_mean_rows(b: int, N: int, seed: int, like: torch.Tensor):
    """(1, b, N) random rows with zero mean from ``seed``, drawn on CPU (device independent)."""
    x = torch.randn(1, b, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x - x.mean(-1, keepdim=True)).to(device=like.device, dtype=like.dtype)


def orthogonalize(W: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` minus their mean and their part in the span of the orthonormal rows of
    ``K`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        W = W - W.mean(-1, keepdim=True)
        if K.shape[-2]:
            W = W - (W @ K.mT) @ K
    return W


def extend_basis(W: torch.Tensor, K: torch.Tensor, room: int):
    """Orthonormal zero-mean rows, orthogonal to ``K`` (B, m, N), spanning the new part of the
    first ``room`` rows of ``W`` (B, b, N); returns them with all rows of ``W`` made
    orthogonal to ``K``. A row with nothing new (zero up to rounding) is replaced by a random
    direction: Rayleigh-Ritz needs an orthonormal basis, not the Krylov recurrence, so any
    new direction is valid. The random rows depend only on the position in the basis, so
    results do not depend on how matrices are batched."""
    scale = W.norm(dim=-1)
    W = orthogonalize(W, K)
    V, scale = W[:, :room], scale[:, :room]
    if not V.shape[-2]:
        return V, W
    norm = V.norm(dim=-1)
    lost = norm <= 64 * torch.finfo(V.dtype).eps * scale
    if bool(lost.any()):
        fresh = zero_mean_rows(V.shape[1], V.shape[2], 7919 * (K.shape[-2] + 1), V)
        V = torch.where(lost.unsqueeze(-1), orthogonalize(fresh, K), V)
        norm = V.norm(dim=-1)
    Q, R = torch.linalg.qr(V.mT)
    if bool((R.diagonal(dim1=-2, dim2=-1).abs() < 1e-2 * norm).any()):
        # rows nearly dependent on each other: their QR directions lean on rounding errors,
        # which may have parts along K; project once more
        Q = torch.linalg.qr(orthogonalize(Q.mT, K).mT).Q
    return Q.mT, W


def ritz(T: torch.Tensor, C: torch.Tensor):
    r"""Dominant Ritz pair of ``P A`` on the span of orthonormal rows :math:`K` (B, m, N),
    given ``T = K (P A K)^T`` (B, m, m) in float64 and the coefficients ``C`` (B, p, b) of
    the newest ``p`` products :math:`P A k_i` (of the last ``p`` rows of :math:`K`) along the
    next block :math:`Q` (B, b, N), after their parts in the span of :math:`K` are removed.

    Every other product lies in the span of :math:`K` (the basis is built from the products),
    so for a Ritz pair :math:`T y = \theta y`, :math:`z = K^T y`, the residual is
    :math:`P A z - \theta z = Q^T C^T y_{\text{new}}` and its norm
    :math:`\|C^T y_{\text{new}}\|_2`: no operation on length-N vectors is needed.

    Returns all Ritz values (B, m), the dominant one (B,) and its residual norm for a unit
    :math:`z` (B,) (inf where its coefficients could not be computed). The coefficients
    :math:`y` come from one step of inverse iteration with :math:`\theta` as the shift,
    which costs less than a full eigendecomposition of ``T``.
    """
    ev = dense.eigvals(T)
    theta = ev.gather(-1, ev.abs().argmax(-1, keepdim=True))  # (B, 1)
    m = T.shape[-1]
    eye = torch.eye(m, dtype=ev.dtype, device=T.device)
    y, info = torch.linalg.solve_ex(T.to(ev.dtype) - (theta[..., None] * (1 + 2.0 ** -44)
                                                      + 2.0 ** -60) * eye,
                                    torch.ones(T.shape[0], m, 1, dtype=ev.dtype,
                                               device=T.device))
    y = y / torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    resid = torch.linalg.vector_norm(C.mT.to(ev.dtype) @ y[:, m - C.shape[-2]:], dim=(-2, -1))
    return ev, theta[:, 0], torch.where((info == 0) & resid.isfinite(), resid, torch.inf)


def leading_schur_rows(T: torch.Tensor, ev: torch.Tensor, keep: int) -> torch.Tensor:
    """Orthonormal rows (B, k, m) spanning, for each ``T`` (B, m, m) with eigenvalues ``ev``
    (B, m) sorted by decreasing magnitude, its invariant subspace of the ``keep`` eigenvalues
    of largest magnitude (``keep + 1`` where the last would split a complex-conjugate pair;
    matrices with fewer get zero rows): the leading real Schur vectors, reordered by LAPACK
    (:func:`scipy.linalg.schur`). Keeping an invariant subspace lets the Krylov iteration go
    on after a restart as if uninterrupted (Krylov-Schur restart, Stewart 2001)."""
    Tn = T.detach().cpu().numpy()
    rows = np.zeros((len(Tn), keep + 1, Tn.shape[-1]))
    for i, (t, mag) in enumerate(zip(Tn, ev.abs().cpu().numpy())):
        below = mag[mag < mag[keep - 1] * (1 - 1e-9)]
        thr = (mag[keep - 1] + below[0]) / 2 if below.size else mag[keep - 1] * (1 - 1e-9)
        _, Z, sdim = schur(t, output="real", sort=lambda re, im: np.hypot(re, im) > thr)
        rows[i, : min(sdim, keep + 1)] = Z[:, : keep + 1].T[:sdim]
    return torch.from_numpy(rows).to(T.device)


def products(op: ChainOperator, X: torch.Tensor) -> torch.Tensor:
    """Rows :math:`(A x)^\\top` for the rows ``x`` of ``X`` (B, b, N): one pass over ``op``."""
    return op.right(X.mT).mT


def lambda2_group(op: ChainOperator, K: torch.Tensor, AK: torch.Tensor, W: torch.Tensor,
                  max_dim: int, tol: float, max_restarts: int):
    """|λ2| of each chain of the flat operator ``op`` (B chains).

    Starts from orthonormal zero-mean rows ``K`` (B, m, N), their products ``AK`` (rows
    :math:`(P A k)^T`) and the rows ``W`` (B, b, N) the next block is made from: the
    products ``AK`` first, then any extra start rows. Returns ``(|λ2| (B,), products)``:
    ``products`` counts products of single chains with a block of vectors (each reads the
    chain once). A chain whose dominant Ritz pair meets the residual rule is frozen: its
    Ritz value is final and it is not read again.
    """
    B, N = op.batch_shape[0], op.n
    max_dim = max(2 * W.shape[-2], min(max_dim, N - 1))  # zero-mean vectors: N - 1 dimensions
    keep = max_dim // 2
    live = list(range(B))  # K, AK and W hold the rows of these chains only
    theta_out = K.new_zeros(B)
    new = AK.shape[-2]  # the newest products: the first rows of W, of the last rows of K
    n_products = restarts = 0
    while True:
        m = K.shape[-2]
        nxt, Wp = extend_basis(W, K, N - 1 - m)  # the next block, orthogonal to K
        T = (K @ AK.mT).to(torch.float64)
        ev, theta, resid = ritz(T, Wp[:, :new] @ nxt.mT)
        if m >= N - 1:  # the basis spans every zero-mean direction: T has the exact spectrum
            theta_out[live] = ev.abs().amax(-1).to(theta_out.dtype)
            return theta_out, n_products
        done = resid <= tol
        if bool(done.any()):
            for j in done.nonzero()[:, 0].tolist():
                theta_out[live[j]] = theta[j].abs()
            go = ~done
            live = [i for i, g in zip(live, go.tolist()) if g]
            if not live:
                return theta_out, n_products
            K, AK, nxt, T, ev, resid = K[go], AK[go], nxt[go], T[go], ev[go], resid[go]
        if m + nxt.shape[-2] > max_dim:  # thick restart: keep the leading Ritz vectors
            if restarts == max_restarts:
                raise ConvergenceError(
                    f"lambda2(method='krylov') did not converge after {max_restarts} restarts "
                    f"of {max_dim}-dimensional block Krylov spaces (Ritz residual "
                    f"{resid.max().item():.3g} > tol = {tol:g}); try method='dense'",
                    passes=round(1 + n_products / B, 2), residual=resid.max().item())
            restarts += 1
            ev = ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)
            C = leading_schur_rows(T, ev, keep).to(K.dtype)  # K -> C K, P A K -> C (P A K)
            K, AK = C @ K, C @ AK
        if len(live) == B:  # one batched pass
            W = products(op, nxt)
        else:  # read only the chains still iterating
            W = torch.stack([products(op[i], x) for x, i in zip(nxt, live)])
        n_products += len(live)
        W = W - W.mean(-1, keepdim=True)
        K, AK, new = torch.cat([K, nxt], -2), torch.cat([AK, W], -2), W.shape[-2]


def lambda2(op: ChainOperator, max_dim: int, tol: float, max_restarts: int, group_bytes: int,
            check: Optional[Callable] = None, seed: int = 0):
    """:func:`lambda2_group` over cache-sized groups of the flat operator ``op``; returns
    (|λ2| (B,), products of single chains with a block of vectors).

    The first product of a group multiplies all-ones besides its first ``KRYLOV_BLOCK - 1``
    start vectors: it yields the row sums, handed to ``check(s, rows)`` (when given), so that
    the input check costs only one more pass (the minimum) instead of two."""
    N = op.n
    if op.batch_shape[0] == 0:
        return torch.zeros(0, dtype=op.dtype, device=op.device), 0
    b = min(KRYLOV_BLOCK, N - 1)
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    start = extend_basis(zero_mean_rows(b, N, seed, like), like.reshape(1, 0, N), b)[0]
    ones = torch.ones_like(start[:, :1])
    thetas, n_products = [], 0
    for s in cache_groups(op, group_bytes):
        og = op[s]
        G = og.batch_shape[0]
        K = start[:, : max(1, b - 1)].expand(G, -1, N)
        W = products(og, torch.cat([K, ones.expand(G, 1, N)], -2))
        if check is not None:
            check(s, rows=W[:, -1])
        AK = W[:, :-1] - W[:, :-1].mean(-1, keepdim=True)
        spare = start[:, K.shape[-2]:].expand(G, -1, N)  # completes the next block
        th, n = lambda2_group(og, K, AK, torch.cat([AK, spare], -2), max_dim, tol,
                              max_restarts)
        thetas.append(th)
        n_products += n + G
    return torch.cat(thetas), n_products
