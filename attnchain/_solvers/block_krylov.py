r"""|λ2| by Krylov-Schur iteration (thick restarts) with Rayleigh-Ritz on the zero-mean vectors.

On the zero-mean vectors :math:`x \mapsto P A x` (:math:`P` removes the mean) has the spectrum of
``A`` with :math:`\lambda_1 = 1` replaced by 0, so its dominant eigenvalue magnitude is
:math:`|\lambda_2|`. Products are taken through ``op.right`` in the row layout: the rows ``X``
of a block give the rows :math:`(A x)^\top` of ``op.right(X.mT).mT``.

The solver certifies the *magnitude* :math:`|\lambda_2|`, not one eigenvector: a chain is done
when some Ritz value whose magnitude is within ``tol`` of the largest Ritz magnitude has a Ritz
residual of at most ``tol`` (:func:`certify`). It reports, per chain, whether that happened;
chains whose residual stops improving (:data:`STALL_PASSES`) or that run out of restarts are
reported as not converged, never with a value that was not certified. The callers decide what
to do with them. The book's Numerics page explains the method and its limits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from scipy.linalg import schur

from ..operators import ChainOperator
from . import cache_groups, dense

#: Block size of the Krylov iteration: the basis grows by this many directions per pass.
KRYLOV_BLOCK = 1

#: A chain whose best Ritz residual (among the Ritz values of nearly the largest magnitude) has
#: not halved in this many passes has stalled: it is reported as not converged. Chains that
#: converge halve it every 5 to 30 passes (noisy heads); heads whose eigenvalues all crowd one
#: circle do not in hundreds of passes.
STALL_PASSES = 60

#: A chain whose residual, at the rate it has fallen so far (from its first check to its best
#: value), would need more than this many passes in all to meet ``tol`` is given up after
#: :data:`MIN_PASSES_BEFORE_GIVING_UP` passes: about where the dense eigensolver costs less
#: than the passes (N = 512 to 4,096 on CPU).
PASS_BUDGET = 400

#: See :data:`PASS_BUDGET`.
MIN_PASSES_BEFORE_GIVING_UP = 40

#: No value is accepted before the basis holds this many directions (unless it spans the
#: whole space). A guard for clusters: with one new direction per pass, the Krylov space of a
#: random start shows a cluster of c nearly equal eigenvalues as c Ritz values only a few
#: passes after the first one has converged (a near-degenerate head of the family certified
#: :math:`\lambda_3` at dimension 6, two passes before :math:`\lambda_2` appeared, 8e-5
#: above it). The first Ritz check is made at this dimension.
MIN_DIM = 12

#: Largest number of passes between two Ritz checks; between checks the solver predicts, from
#: the last two residuals, when the residual will meet ``tol`` (see :func:`next_check`).
MAX_CHECK_GAP = 6


class Lambda2Result(NamedTuple):
    """Per chain of a flat batch (B,): the certified :math:`|\\lambda_2|` (``value``; for a chain
    that did not converge, the largest Ritz magnitude, which is not certified), whether it was
    certified (``converged``), the Ritz residual of the certified value or of the best candidate
    (``residual``), the passes over that chain (``passes``, products of the chain with a
    block, the row-sum product included) and a unit zero-mean vector (B, N) in the invariant
    subspace of its leading Ritz value or pair when it stopped (``vector``: the warm start
    for a nearby chain, :func:`leading_vector`). ``products`` is the sum of the passes."""

    value: torch.Tensor
    converged: torch.Tensor
    residual: torch.Tensor
    passes: torch.Tensor
    vector: torch.Tensor
    products: int


def zero_mean_rows(b: int, N: int, seed: int, like: torch.Tensor):
    """(1, b, N) random rows with zero mean from ``seed``, drawn on CPU (device independent)."""
    x = torch.randn(1, b, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x - x.mean(-1, keepdim=True)).to(device=like.device, dtype=like.dtype)


def project(W: torch.Tensor, K: torch.Tensor):
    """Rows of ``W`` (B, b, N) minus their mean and their part in the span of the orthonormal
    rows of ``K`` (B, m, N) (classical Gram-Schmidt, twice), and the coefficients ``H`` (B, b,
    m) of that part, in float64: ``W = H K + R`` up to the mean."""
    W = W - W.mean(-1, keepdim=True)
    if not K.shape[-2]:
        return W, torch.zeros(*W.shape[:-1], 0, dtype=torch.float64, device=W.device)
    h = W @ K.mT
    W = torch.baddbmm(W, h, K, alpha=-1)
    h2 = W @ K.mT  # the second pass: the first one cancels most of W near convergence
    W = torch.baddbmm(W, h2, K, alpha=-1)
    return W, h.to(torch.float64) + h2.to(torch.float64)


def orthogonalize(W: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` minus their mean and their part in the span of the orthonormal rows of
    ``K`` (classical Gram-Schmidt, twice)."""
    return project(W, K)[0]


def new_directions(R: torch.Tensor, K: torch.Tensor, room: int, scale: torch.Tensor):
    """Orthonormal zero-mean rows ``Q`` (B, q, N), ``q = min(b, room)``, orthogonal to ``K``
    (B, m, N), spanning the rows of ``R`` (B, b, N) (already orthogonal to ``K``), and the
    coefficients ``F = R Q^T`` (B, b, q) in float64. A row with nothing new (below rounding
    relative to ``scale``, the norms of the rows before projection) is replaced by a random
    direction: Rayleigh-Ritz needs an orthonormal basis, not the Krylov recurrence, so any new
    direction is valid. The random rows depend only on the position in the basis, so results
    do not depend on how matrices are batched."""
    V, sc = R[:, :room], scale[:, :room]
    if not V.shape[-2]:
        return V, torch.zeros(*R.shape[:-1], 0, dtype=torch.float64, device=R.device)
    norm = V.norm(dim=-1)
    lost = norm <= 64 * torch.finfo(V.dtype).eps * sc
    if bool(lost.any()):
        fresh = zero_mean_rows(V.shape[1], V.shape[2], 7919 * (K.shape[-2] + 1), V)
        V = torch.where(lost.unsqueeze(-1), orthogonalize(fresh, K), V)
        norm = V.norm(dim=-1)
    elif V.shape[-2] == 1 and R.shape[-2] == 1:  # one row: Q = R / |R|, F = |R|
        return V / norm.unsqueeze(-1), norm.to(torch.float64).unsqueeze(-1)
    if V.shape[-2] == 1:
        Q = V / norm.unsqueeze(-1)
    else:
        Q, Rq = torch.linalg.qr(V.mT)
        Q = Q.mT
        if bool((Rq.diagonal(dim1=-2, dim2=-1).abs() < 1e-2 * norm).any()):
            # rows nearly dependent on each other: their QR directions lean on rounding
            # errors, which may have parts along K; project once more
            Q = torch.linalg.qr(orthogonalize(Q, K).mT).Q.mT
    return Q, (R @ Q.mT).to(torch.float64)


def extend_basis(W: torch.Tensor, K: torch.Tensor, room: int):
    """The next block for the products ``W`` (B, b, N) and the basis ``K`` (B, m, N): the
    orthonormal rows of :func:`new_directions` for the first ``room`` rows of ``W`` made
    orthogonal to ``K``, and all rows of ``W`` made orthogonal to ``K``."""
    R = orthogonalize(W, K)
    return new_directions(R, K, room, W.norm(dim=-1))[0], R


#: Largest number of Ritz values per chain (by magnitude, one of each conjugate pair) whose
#: residuals :func:`ritz_check` computes.
CANDIDATES = 2


def ritz_check(T: torch.Tensor, F: torch.Tensor, tol: float,
               ev: Optional[torch.Tensor] = None):
    r"""The magnitude rule on the Ritz values of ``P A`` on the span of orthonormal rows
    :math:`K` (B, m, N), given the Krylov-Schur coefficients ``T`` (B, m, m) and ``F`` (B, q,
    m) of :func:`lambda2_group` (float64): :math:`P A k_j = \sum_i T_{ij} k_i + \sum_l F_{lj}
    q_l` with :math:`Q` orthonormal and orthogonal to :math:`K`.

    **Residuals without length-N work.** For any unit coefficient vector :math:`y` and number
    :math:`\theta`, the vector :math:`z = K^\top y` has :math:`P A z - \theta z = K^\top (T y
    - \theta y) + Q^\top F y`, two orthogonal parts, so :math:`\|P A z - \theta z\|_2^2 =
    \|T y - \theta y\|_2^2 + \|F y\|_2^2` exactly. The vectors :math:`y` come from one step of
    inverse iteration with the Ritz value as the shift (cheaper than the eigenvectors of
    ``T``); the first term accounts for their inexactness.

    **The rule.** The candidates are the Ritz values :math:`\theta` with :math:`|\theta| \ge
    |\theta_{\max}| - \mathrm{tol}` (up to :data:`CANDIDATES`, one of each conjugate pair);
    a chain is done when a candidate's residual is at most ``tol``.

    Returns the Ritz values (B, m), complex (``ev`` itself when given), ``done`` (B,), the
    magnitude (B,) (the largest among the done candidates; the largest Ritz magnitude where
    none is done) and the smallest candidate residual (B,) (inf where none could be computed).
    """
    if ev is None:
        ev = dense.eigvals(T)
    m = T.shape[-1]
    mags = ev.abs()
    top = mags.amax(-1, keepdim=True)
    near = (mags >= top - tol) & (ev.imag >= 0)
    idx = torch.where(near, mags, -1.0).topk(min(CANDIDATES, m), dim=-1).indices
    valid, th = near.gather(-1, idx), ev.gather(-1, idx)  # (B, nc)
    Tc = T.to(ev.dtype).unsqueeze(1)
    eye = torch.eye(m, dtype=ev.dtype, device=T.device)
    shift = (th * (1 + 2.0 ** -44) + 2.0 ** -60)[..., None, None] * eye
    rhs = torch.ones(*th.shape, m, 1, dtype=ev.dtype, device=T.device)
    y, info = torch.linalg.solve_ex(Tc - shift, rhs)
    y = y / torch.linalg.vector_norm(y, dim=(-2, -1), keepdim=True)
    inside = torch.linalg.vector_norm(Tc @ y - th[..., None, None] * y, dim=(-2, -1))
    out = torch.linalg.vector_norm(F.to(ev.dtype).unsqueeze(1) @ y, dim=(-2, -1))
    res = torch.sqrt(inside ** 2 + out ** 2)
    res = torch.where(valid & (info == 0) & res.isfinite(), res, torch.inf)
    ok = res <= tol
    done = ok.any(-1)
    value = torch.where(done, torch.where(ok, th.abs(), -1.0).amax(-1), top[:, 0])
    return ev, done, value, res.amin(-1)


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


def leading_vector(T: torch.Tensor, ev: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Unit rows (B, N) in the span of the rows of ``K`` (B, m, N): the sum of the leading
    real Schur vectors of ``T`` (B, m, m), whose eigenvalues are ``ev`` (B, m), mapped by
    ``K``; a vector of the invariant subspace of the leading Ritz value (both vectors of a
    complex pair), with a component along each of its directions."""
    ev = ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)
    y = leading_schur_rows(T, ev, 1).sum(-2, keepdim=True).to(K.dtype)
    v = (y @ K)[:, 0]
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def products(op: ChainOperator, X: torch.Tensor) -> torch.Tensor:
    """Rows :math:`(A x)^\\top` for the rows ``x`` of ``X`` (B, b, N): one pass over ``op``."""
    return op.right(X.mT).mT


def next_check(step: int, prev_step: torch.Tensor, prev_res: torch.Tensor,
               res: torch.Tensor, tol: float) -> torch.Tensor:
    """Per chain, the pass at which to check it next: ``step + 1`` unless its smallest
    candidate residual ``res`` and that of its previous check (``prev_step``, ``prev_res``)
    predict, at their geometric rate, that it meets ``tol`` later; then after 60% of the
    predicted passes, at most :data:`MAX_CHECK_GAP`. A check costs the eigenvalues of the
    projected matrix, at ``krylov_dim = 80`` a sizeable part of a pass at N = 1,024."""
    span = (step - prev_step).clamp(min=1).to(res.dtype)
    rate = torch.log(res / prev_res) / span  # < 0 where the residual falls
    need = torch.where(rate < 0, torch.log(tol / res) / rate, torch.full_like(res, 4.0))
    need = torch.where(res.isfinite() & prev_res.isfinite() & (prev_step < step), need,
                       torch.ones_like(need))
    gap = (0.6 * need.nan_to_num(1.0)).floor().clamp(1, MAX_CHECK_GAP)
    return step + gap.long()


def lambda2_group(op: ChainOperator, K: torch.Tensor, W: torch.Tensor, spare: torch.Tensor,
                  max_dim: int, tol: float, max_restarts: int) -> Lambda2Result:
    r""":math:`|\lambda_2|` of each chain of the flat operator ``op`` (B chains), as a
    :class:`Lambda2Result` (``passes`` without the first product, which the caller counts).

    Starts from orthonormal zero-mean rows ``K`` (B, k, N) and their products ``W`` (B, k, N)
    (rows :math:`(P A k)^\top`); ``spare`` (1 or B, s, N) are random rows that complete the
    first block to ``k + s`` rows. The state is a Krylov-Schur decomposition (Stewart 2001)
    in the row layout: orthonormal zero-mean rows :math:`K` (B, m, N), the next block
    :math:`Q` (B, q, N) orthonormal and orthogonal to :math:`K`, and float64 coefficients
    ``T`` (B, m, m), ``F`` (B, q, m) with

    .. math:: P A k_j = \sum_i T_{ij} k_i + \sum_l F_{lj} q_l,

    so the products themselves are never stored. A pass multiplies :math:`Q`, projects the
    products on :math:`[K; Q]` (the coefficients are the new columns of ``T``), and makes the
    next block from what is left. Each chain is checked by :func:`ritz_check` on its own
    schedule (:func:`next_check`, and at every restart). A chain that is done is frozen: its
    value is final and it is not read again; so is one that stalls (:data:`STALL_PASSES`), as
    not converged; at ``max_restarts`` every chain still live is not converged.
    """
    B, N = op.batch_shape[0], op.n
    dev, dt = K.device, K.dtype
    full = N - 1  # zero-mean vectors: N - 1 dimensions
    k0 = K.shape[-2]
    b = k0 + spare.shape[-2]
    # where a little more than one basis holds the whole space, grow it to the whole space:
    # no restart, and the exact spectrum once it is spanned
    max_dim = full if full <= max_dim + 2 * b else max(2 * b, max_dim)
    keep = max_dim // 2
    f64 = dict(dtype=torch.float64, device=dev)
    value, resid = torch.zeros(B, **f64), torch.full((B,), torch.inf, **f64)
    converged = torch.zeros(B, dtype=torch.bool, device=dev)
    passes = torch.zeros(B, dtype=torch.long, device=dev)  # set when a chain stops
    vector = torch.zeros(B, N, dtype=dt, device=dev)  # set when a chain stops
    # per chain: best residual so far (halving steps only) and when; the previous check;
    # the next check
    mark_res, mark_step = torch.full((B,), torch.inf, **f64), torch.zeros_like(passes)
    first_res, best_res = torch.full((B,), torch.inf, **f64), torch.full((B,), torch.inf, **f64)
    prev_res, prev_step = torch.full((B,), torch.inf, **f64), torch.full_like(passes, -1)
    first = max(0, -(-(min(MIN_DIM, full) - k0) // b))  # the pass at which m >= MIN_DIM
    check_at = torch.full_like(passes, first)
    live = torch.arange(B, device=dev)  # the state holds the rows of these chains only
    # the first block: what the products of K leave outside K, and the spare rows
    R, H = project(W, K)
    S = orthogonalize(spare.expand(B, -1, N), K)
    Q, Fall = new_directions(torch.cat([R, S], -2), K, full - k0,
                             torch.cat([W.norm(dim=-1), spare.norm(dim=-1).expand(B, -1)], -1))
    T, F = H.mT, Fall[:, :k0].mT
    basis = torch.empty(B, max_dim + b + 1, N, dtype=dt, device=dev)  # K, then room for Q
    basis[:, :k0] = K
    m = k0
    n_products = restarts = step = 0
    next_due = first
    while True:
        q = Q.shape[-2]
        exhausted = m >= full or not q
        restart = m + q > max_dim
        if exhausted:  # the basis spans every zero-mean direction: T has the spectrum
            ev = dense.eigvals(T)
            value[live] = ev.abs().amax(-1)
            vector[live] = leading_vector(T, ev, basis[:, :m])
            resid[live], converged[live], passes[live] = 0.0, True, step
            break
        if restart or step >= next_due:
            due = (check_at[live] <= step) | restart
            d = due.nonzero()[:, 0]
            ev, done, val, cres = ritz_check(T[d], F[d], tol)
            done &= m >= min(MIN_DIM, full)
            ids = live[d]
            first_res[ids] = torch.where(first_res[ids].isfinite(), first_res[ids], cres)
            best_res[ids] = torch.minimum(best_res[ids], cres)
            better = cres < 0.5 * mark_res[ids]
            mark_res[ids] = torch.where(better, cres, mark_res[ids])
            mark_step[ids] = torch.where(better, step, mark_step[ids])
            # at the rate so far (first check to best), the passes it would need in all
            rate = torch.log(first_res[ids] / best_res[ids]) / max(step - first, 1)
            need = step + torch.log(best_res[ids] / tol) / rate
            stalled = ~done & ((step - mark_step[ids] > STALL_PASSES) |
                               ((step >= MIN_PASSES_BEFORE_GIVING_UP) &
                                ~(need <= PASS_BUDGET)))
            out_of_restarts = ~done & restart & (restarts == max_restarts)
            stop = done | stalled | out_of_restarts
            value[ids[stop]], resid[ids[stop]], passes[ids[stop]] = val[stop], cres[stop], step
            if bool(stop.any()):
                ds = d[stop]
                vector[ids[stop]] = leading_vector(T[ds], ev[stop], basis[ds, :m])
            converged[ids[done]] = True
            check_at[ids] = next_check(step, prev_step[ids], prev_res[ids], cres, tol)
            prev_step[ids], prev_res[ids] = step, cres
            if bool(stop.any()):
                go = torch.ones(len(live), dtype=torch.bool, device=dev)
                go[d[stop]] = False
                live = live[go]
                if not len(live):
                    break
                basis, Q, T, F = basis[go], Q[go], T[go], F[go]
                ev = ev[~stop]  # restart checks every chain, so d covers all of them
            next_due = int(check_at[live].min())
        if restart:  # thick restart: keep the invariant subspace of the leading Ritz values
            restarts += 1
            ev = ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)
            C = leading_schur_rows(T, ev, keep)  # K -> C K, T -> C T C^T, F -> F C^T
            k = C.shape[-2]
            basis[:, :k] = C.to(dt) @ basis[:, :m]
            T, F, m = C @ T @ C.mT, F @ C.mT, k
        if len(live) == B:  # one batched pass
            W = products(op, Q)
        else:  # read only the chains still iterating
            W = torch.stack([products(op[i], x) for x, i in zip(Q, live.tolist())])
        n_products += len(live)
        step += 1
        basis[:, m:m + q] = Q
        Kn = basis[:, :m + q]
        R, H = project(W, Kn)  # P A q_l = sum H_li k_i + R_l: the new columns of T
        Q, Fq = new_directions(R, Kn, full - m - q, W.norm(dim=-1))
        T = torch.cat([torch.cat([T, H[..., :m].mT], -1), torch.cat([F, H[..., m:].mT], -1)],
                      -2)
        F = torch.cat([F.new_zeros(len(live), Q.shape[-2], m), Fq.mT], -1)
        m += q
    return Lambda2Result(value, converged, resid, passes, vector, n_products)


def start_rows(b: int, N: int, seed: int, like: torch.Tensor,
               start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The first rows of the basis (1 or B, k, N): ``max(1, b - 1)`` random zero-mean rows
    from ``seed``, or, when given, the rows of ``start`` ((k, N) or (B, k, N), for instance
    Ritz vectors of a related chain: a warm start), made zero-mean and orthonormal (a row with
    nothing new is replaced by a random direction)."""
    empty = like.new_zeros(1, 0, N)
    if start is None:
        X = zero_mean_rows(max(1, b - 1), N, seed, like)
    else:
        X = start.to(device=like.device, dtype=like.dtype)
        X = X.reshape(1, *X.shape) if X.ndim == 2 else X
        X = X[:, : N - 1]
    R = orthogonalize(X, empty.expand(len(X), 0, N))
    return new_directions(R, empty.expand(len(X), 0, N), X.shape[-2], X.norm(dim=-1))[0]


def lambda2(op: ChainOperator, max_dim: int, tol: float, max_restarts: int, group_bytes: int,
            check: Optional[Callable] = None, seed: int = 0,
            start: Optional[torch.Tensor] = None) -> Lambda2Result:
    """:func:`lambda2_group` over groups of at most ``group_bytes`` of the flat operator ``op``.

    The first product of a group multiplies all-ones besides the start rows
    (:func:`start_rows`; ``start`` is an optional initial block (k, N) or (B, k, N)): it yields
    the row sums, handed to ``check(s, rows)`` (when given), so that the input check costs only
    one more pass (the minimum) instead of two. The first block is made from the products of
    the start rows and, where they are fewer than ``KRYLOV_BLOCK``, random rows; the block
    size is ``max(k, KRYLOV_BLOCK)``."""
    N = op.n
    B = op.batch_shape[0]
    like = torch.empty(0, dtype=op.dtype, device=op.device)
    if B == 0:
        z = torch.zeros(0, dtype=torch.float64, device=op.device)
        return Lambda2Result(z, z.bool(), z, z.long(), like.new_zeros(0, N), 0)
    b = min(KRYLOV_BLOCK, N - 1)
    first = start_rows(b, N, seed, like, start)
    spare = zero_mean_rows(max(b - first.shape[-2], 0), N, seed + 1, like)
    ones = torch.ones_like(first[:1, :1])
    parts = []
    for s in cache_groups(op, group_bytes):
        og = op[s]
        G = og.batch_shape[0]
        K = (first if first.shape[0] == 1 else first[s]).expand(G, -1, N)
        W = products(og, torch.cat([K, ones.expand(G, 1, N)], -2))
        if check is not None:
            check(s, rows=W[:, -1])
        r = lambda2_group(og, K, W[:, :-1], spare, max_dim, tol, max_restarts)
        parts.append(r._replace(passes=r.passes + 1, products=r.products + G))
    return Lambda2Result(*(torch.cat([getattr(p, f) for p in parts])
                           for f in ("value", "converged", "residual", "passes", "vector")),
                         sum(p.products for p in parts))
