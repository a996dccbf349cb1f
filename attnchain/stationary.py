r"""Stationary distributions of attention chains: the damped chain and TokenRank.

A family in the manner of networkx's PageRank: :func:`damped` builds the PageRank-damped chain
:math:`A' = \alpha A + (1-\alpha)\,\mathbf 1 p^\top`, :func:`token_rank` computes its stationary
row vector :math:`\pi = \pi A'` iteratively (or by the dense float64 solve, ``method="dense"``),
and :func:`stationary_dense` is that dense reference on its own. :func:`closed_class_count` tells
whether the undamped chain (``alpha = 1``) has a unique answer at all.

How the solvers work (passes, cache groups, the GMRES fallback) is on the book's Numerics page.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Page, Brin, Motwani, Winograd, "The PageRank Citation Ranking", 1999
:cite:`page1999pagerank`; Levin, Peres, Wilmer, "Markov Chains and Mixing Times", 2017
:cite:`levin2017markov` (closed classes and uniqueness).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._solvers import dense, gmres
from ._validate import (as_tensor, broadcast_batch, check_choice, check_fraction, check_int,
                        check_personalization, check_positive, check_rows, check_square,
                        first_bad, late_row_check, prepare)
from ._validate import _nonnegative_rows as nonnegative_rows
from .errors import ConvergenceError, ReducibleChainError
from .operators import ChainOperator, DampedChain, DenseChain, as_operator

__all__ = ["damped", "token_rank", "token_rank_sequence", "stationary_dense",
           "closed_class_count", "TOKEN_RANK_METHODS", "TOKEN_RANK_GROUP_BYTES"]

#: The methods of :func:`token_rank`.
TOKEN_RANK_METHODS = ("krylov", "power", "dense")

#: On CPU, token_rank solves the chains in groups of at most this many bytes, one group after
#: the other (see the Numerics page).
TOKEN_RANK_GROUP_BYTES = 32 * 2 ** 20


def damped(A, alpha: float = 0.99, personalization=None, dtype: Optional[torch.dtype] = None,
           atol: float = 1e-4) -> torch.Tensor:
    r"""The PageRank-damped ("Google") chain :math:`\alpha A + (1-\alpha)\,\mathbf 1 p^\top`.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    alpha : float in [0, 1]
        Damping: with probability :math:`1-\alpha` the walk teleports to a token drawn from ``p``.
    personalization : Tensor, shape (N,) or (..., N), optional
        Non-negative teleport weights ``p`` (normalised to sum 1); uniform if ``None``.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    Tensor, shape (..., N, N)
        The damped chain; row-stochastic, and for ``alpha < 1`` with positive ``p`` irreducible
        and aperiodic, so its stationary distribution is unique [2]_. The batch shape is the
        broadcast of ``A``'s and ``p``'s.

    Raises
    ------
    ValueError
        ``alpha`` outside [0, 1], an invalid ``personalization``, or an invalid ``A`` (see
        :func:`attnchain.check_stochastic`).

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> damped(A, alpha=0.9)
    tensor([[0.0500, 0.9500],
            [0.9500, 0.0500]])

    See Also
    --------
    attnchain.operators.DampedChain : the same chain as an operator, never formed.
    token_rank : its stationary distribution.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Page, Brin, Motwani, Winograd, "The PageRank Citation Ranking", 1999
       :cite:`page1999pagerank`.
    """
    alpha = check_fraction(alpha, "alpha")
    return DampedChain(DenseChain(A, dtype, atol), alpha, personalization).dense()


def closed_class_count(A) -> torch.Tensor:
    r"""Number of closed communicating classes of each chain in a batch.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Non-negative matrices; only the pattern of positive entries matters.

    Returns
    -------
    LongTensor, shape (...,)
        The number of closed classes of each chain, on the CPU.

    Raises
    ------
    ValueError
        ``A`` is not a real square tensor.

    Notes
    -----
    A class (a set of states that all reach each other) is closed when no transition leaves
    it. A finite chain has a unique stationary distribution if and only if it has exactly one
    closed class [1]_; states outside the closed classes are transient and get zero mass.
    Chains with all entries positive (every softmax without masking) have one; others are
    decomposed into strongly connected components (:mod:`scipy.sparse.csgraph`).

    Examples
    --------
    >>> import torch
    >>> closed_class_count(torch.block_diag(torch.eye(2), torch.ones(3, 3) / 3))
    tensor(3)

    See Also
    --------
    token_rank, stationary_dense : raise :class:`~attnchain.errors.ReducibleChainError` for
        ``alpha = 1`` when the count exceeds one.

    References
    ----------
    .. [1] Levin, Peres, Wilmer, "Markov Chains and Mixing Times", 2nd ed., AMS 2017
       :cite:`levin2017markov`.
    """
    A = as_tensor(A, "A")
    N = check_square(A)
    batch = A.shape[:-2]
    if bool((A > 0).all()):
        return torch.ones(batch, dtype=torch.long)
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    pos = (A > 0).reshape(-1, N, N).cpu().numpy()
    counts = []
    for g in pos:
        n_comp, lab = connected_components(csr_matrix(g), directed=True, connection="strong")
        i, j = np.nonzero(g)
        leaving = lab[i] != lab[j]
        open_ = np.zeros(n_comp, dtype=bool)
        open_[lab[i[leaving]]] = True
        counts.append(int((~open_).sum()))
    return torch.tensor(counts, dtype=torch.long).reshape(batch)


def _check_unique(A: torch.Tensor) -> None:
    counts = closed_class_count(A)
    if (counts > 1).any():
        idx = first_bad(counts > 1)
        raise ReducibleChainError(
            f"reducible chain (batch index {idx}) has {int(counts.max())} closed classes, so its "
            "stationary distribution is not unique; use alpha < 1 (damping) to make it unique")


def _resolution(dtype: torch.dtype) -> float:
    """The smallest L1 step change that rounding in ``dtype`` lets the solvers see."""
    return 4 * torch.finfo(dtype).eps


class _LazyChain(ChainOperator):
    """The lazy chain :math:`(I + A)/2` of an operator (same stationary law, aperiodic)."""

    def __init__(self, op: ChainOperator):
        self.op, self.n, self.batch_shape = op, op.n, op.batch_shape
        self.dtype, self.device, self.member_bytes = op.dtype, op.device, op.member_bytes

    def left(self, X):
        return 0.5 * (X + self.op.left(X))

    def right(self, X):
        return 0.5 * (X + self.op.right(X))

    def map_batch(self, fn):
        return _LazyChain(self.op.map_batch(fn))


def _step_tol(D, tol: float) -> torch.Tensor:
    r"""Per chain of the float64 chains ``D`` (or of a matrix-free operator, by the Krylov
    bound below whatever its size), the step change that certifies L1 error ``tol`` at ``alpha = 1``
    (Notes of :func:`token_rank`): ``tol`` times the gap :math:`\min_{\lambda \ne 1}
    |1 - \lambda|` (at most 1). The gap is computed from the eigenvalues up to
    ``AUTO_DENSE_MAX_N`` tokens, and above as its lower bound :math:`2(1 - |\mu_2|)`, with
    :math:`\mu_2` the second eigenvalue of the lazy chain :math:`(I + D)/2`. Raises when even
    float64 cannot resolve that step change."""
    from .spectral import AUTO_DENSE_MAX_N, lambda2  # lazy: spectral imports this module

    if isinstance(D, ChainOperator):  # a matrix-free chain: only the Krylov bound
        lazy, N = _LazyChain(D), D.n
        D = torch.empty(0, dtype=D.dtype, device=D.device).expand(*D.batch_shape, 0, 0)
    else:
        N, lazy = D.shape[-1], None
    if N == 1:
        return torch.full(D.shape[:-2], tol, dtype=D.dtype, device=D.device)
    if lazy is not None:
        l2_tol = 1e-5
        gap = 2.0 * (1.0 - lambda2(lazy, method="krylov", tol=l2_tol) - l2_tol).clamp_min(0)
    elif N <= AUTO_DENSE_MAX_N:
        gap = (1 - dense.eigvals(D)).abs().sort(-1).values[..., 1]  # [..., 0]: λ = 1
    else:
        lazy = DenseChain(0.5 * (D + torch.eye(N, dtype=D.dtype, device=D.device)), check=False)
        l2_tol = 1e-5  # lambda2's residual tolerance, taken as the accuracy of |mu_2|
        gap = 2.0 * (1.0 - lambda2(lazy, tol=l2_tol) - l2_tol).clamp_min(0)
    step = tol * gap.clamp(max=1.0)
    if bool((step < _resolution(torch.float64)).any()):
        idx = first_bad(step < _resolution(torch.float64)) if step.ndim else ()
        raise ConvergenceError(
            f"token_rank(alpha=1): the chain (batch index {idx}) mixes too slowly to certify an "
            f"L1 error below tol = {tol:g}: its spectral gap is {float(gap.min()):.3g}, so the "
            f"step change would have to fall below {float(step.min()):.3g}, under float64's "
            "resolution; use method='dense' or alpha < 1", passes=0, residual=math.nan)
    return step


def _solve_dense(A: torch.Tensor, alpha: float, personalization) -> torch.Tensor:
    """The float64 solve of :func:`stationary_dense` for a checked float64 ``A``."""
    N = A.shape[-1]
    p = check_personalization(personalization, N, A.dtype, A.device)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if alpha < 1.0:
        M = eye - alpha * A
        b = (1.0 - alpha) * p
    else:
        _check_unique(A)
        M = eye - A + 1.0 / N
        b = torch.full((N,), 1.0 / N, dtype=A.dtype, device=A.device)
    batch = broadcast_batch(M.shape[:-2], b.shape[:-1], "A", "personalization")
    M = M.expand(*batch, N, N)
    b = b.expand(*batch, N)
    pi = torch.linalg.solve(M.transpose(-1, -2), b.unsqueeze(-1)).squeeze(-1)
    pi = pi.clamp_min(0)
    return pi / pi.sum(-1, keepdim=True)


def stationary_dense(A, alpha: float = 0.99, personalization=None, atol: float = 1e-4
                     ) -> torch.Tensor:
    r"""Reference stationary distribution of the damped chain by a dense float64 solve.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    alpha : float in [0, 1]
        Damping, as in :func:`damped`.
    personalization : Tensor, shape (N,) or (..., N), optional
        Teleport distribution ``p`` (uniform if ``None``).
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    Tensor, shape (..., N), float64
        :math:`\pi` with :math:`\pi = \pi A'`, :math:`\pi \mathbf 1 = 1`.

    Raises
    ------
    ReducibleChainError
        ``alpha = 1`` and the chain has more than one closed class (no unique answer).
    ValueError
        Invalid ``A``, ``alpha`` or ``personalization``.

    Notes
    -----
    For :math:`\alpha < 1`, :math:`\pi (I - \alpha A) = (1-\alpha) p` [2]_. For
    :math:`\alpha = 1`, :math:`\pi (I - A + \mathbf 1 u^\top) = u^\top` with :math:`u = \mathbf
    1/N`, a system that is non-singular exactly when the stationary distribution is unique.
    The solve is exact up to float64 rounding; it costs :math:`O(N^3)` per matrix, so use
    :func:`token_rank` for speed. ``token_rank(..., method="dense")`` is this solve.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5], [0.25, 0.75]])
    >>> stationary_dense(A, alpha=1.0)
    tensor([0.3333, 0.6667], dtype=torch.float64)

    See Also
    --------
    token_rank : the iterative solver; ``method="dense"`` calls this one.
    damped : the chain whose stationary law this is.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Page, Brin, Motwani, Winograd, "The PageRank Citation Ranking", 1999
       :cite:`page1999pagerank`.
    """
    alpha = check_fraction(alpha, "alpha")
    return _solve_dense(prepare(A, torch.float64, atol), alpha, personalization)


def _start(start, chain: DampedChain) -> torch.Tensor:
    """``token_rank``'s ``start=``, checked and normalised, as (B, N) for the flat chain."""
    N = chain.n
    x = as_tensor(start, "start")
    if not x.is_floating_point():
        raise ValueError(f"start must be a real floating tensor (a distribution), got {x.dtype}")
    x = nonnegative_rows(x.to(device=chain.device, dtype=chain.dtype), N, "start")
    if bool((x.sum(-1) == 0).any()):
        raise ValueError("start sums to 0; it must put mass on some token")
    try:
        x = x.expand(*chain.batch_shape, N)
    except RuntimeError:
        raise ValueError(f"the batch shape {tuple(x.shape[:-1])} of start does not broadcast to "
                         f"the batch shape {tuple(chain.batch_shape)} of the chains") from None
    return (x / x.sum(-1, keepdim=True)).reshape(-1, N)


def _token_rank_dense(A, alpha, personalization, dtype, check, atol, return_info):
    """``token_rank(method="dense")``: the float64 solve for the chain that ``as_operator``
    makes of ``A`` (so ``A`` and ``DenseChain(A)`` agree), returned in that chain's dtype."""
    op = as_operator(A, dtype, atol, check=check)
    out_dtype = op.dtype
    A64 = op.dense().to(torch.float64)
    pi = _solve_dense(A64, alpha, personalization)
    if not return_info:
        return pi.to(out_dtype)
    G = DampedChain(DenseChain(A64, check=False), alpha, personalization)
    y = G.left(pi.unsqueeze(-2)).squeeze(-2)
    err = (y / y.sum(-1, keepdim=True) - pi).abs().sum(-1)
    info = {"passes": 0, "check_passes": 2 if check and not isinstance(A, ChainOperator) else 0,
            "residual": err.to(out_dtype)}
    return pi.to(out_dtype), info


class _Implicit(torch.autograd.Function):
    r"""Gradients of TokenRank by implicit differentiation of the stationary equation.

    With :math:`M = I - \alpha A + c\,\mathbf 1 u^\top` (:math:`c = 0` for :math:`\alpha < 1`,
    :math:`c = 1`, :math:`u = \mathbf 1/N` for :math:`\alpha = 1`), :math:`\pi M = b`, so
    :math:`d\pi = (\alpha\, \pi\, dA + (1-\alpha)\, dp) M^{-1}`; the normalisation
    :math:`\pi / \pi\mathbf 1` projects the incoming gradient :math:`g` to
    :math:`g' = g - (g\cdot\pi)\mathbf 1`. One adjoint solve :math:`M w = g'` then gives
    :math:`\partial L/\partial A = \alpha\, \pi^\top w^\top` and
    :math:`\partial L/\partial p = (1 - \alpha)\, w`."""

    @staticmethod
    def forward(ctx, A, p, pi, alpha, tol, max_iter):
        ctx.save_for_backward(A, p, pi)
        ctx.alpha, ctx.tol, ctx.max_iter = alpha, tol, max_iter
        return pi.clone()

    @staticmethod
    def backward(ctx, g):
        A, p, pi = ctx.saved_tensors
        alpha, N = ctx.alpha, pi.shape[-1]
        batch = pi.shape[:-1]
        g = g - (g * pi).sum(-1, keepdim=True)
        flat = DampedChain(DenseChain(A.detach(), check=False), alpha,
                           p.detach()).reshape(-1)
        rtol = max(ctx.tol, 10 * torch.finfo(pi.dtype).eps)
        w = gmres.adjoint(flat, g.reshape(-1, N), rtol, ctx.max_iter).reshape(*batch, N)
        grad_A = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_A = (alpha * pi.unsqueeze(-1) * w.unsqueeze(-2)).sum_to_size(A.shape)
        if ctx.needs_input_grad[1]:
            grad_p = ((1.0 - alpha) * w).sum_to_size(p.shape)
        return grad_A, grad_p, None, None, None, None


def token_rank(A, alpha: float = 0.99, personalization=None, tol: float = 1e-6,
               max_iter: int = 1000, method: str = "krylov", dtype: Optional[torch.dtype] = None,
               check: bool = True, atol: float = 1e-4, return_info: bool = False,
               start=None):
    r"""TokenRank: the stationary distribution of the damped attention chain.

    Parameters
    ----------
    A : Tensor, shape (..., N, N), or ChainOperator
        Row-stochastic attention, or an operator (:mod:`attnchain.operators`), which is trusted
        to be row-stochastic and not checked.
    alpha : float in [0, 1]
        Damping (0.99 in [1]_). ``alpha = 1`` solves the undamped chain and raises
        :class:`~attnchain.errors.ReducibleChainError` when its stationary distribution is
        not unique.
    personalization : Tensor, shape (N,) or (..., N), optional
        Teleport distribution ``p`` (normalised; uniform if ``None``), as in PageRank [2]_.
    tol : float
        Convergence tolerance on the L1 change of one damped step (Notes).
    max_iter : int
        Budget of passes over ``A`` (products with the chains being solved).
    method : {"krylov", "power", "dense"}
        ``"krylov"``: restarted GMRES [3]_ on the linear system of the Notes, verified by one
        damped step; typically far fewer passes than power iteration. ``"power"``: power
        iteration from ``p`` (on the lazy chain :math:`(I + A)/2` when ``alpha = 1``), the
        classic PageRank method [2]_. ``"dense"``: the float64 solve of
        :func:`stationary_dense` (:math:`O(N^3)`, the reference), returned in ``dtype``.
    dtype : torch.dtype, optional
        ``torch.float32`` (default; float64 input stays float64) or ``torch.float64``. For an
        operator: ``None`` or the operator's dtype.
    check : bool
        Validate a tensor ``A`` with :func:`attnchain.check_stochastic`. Leave on unless ``A`` is
        known to be valid.
    atol : float
        Row-sum tolerance of the input check.
    return_info : bool
        Also return a dict with ``"passes"`` (products with ``A`` in units of the whole batch,
        checks excluded, 2 decimals; 0 for ``"dense"``), ``"check_passes"`` (passes of the input
        check) and ``"residual"`` (final L1 change per chain, shape ``(...,)``).
    start : Tensor, shape (N,) or (..., N), optional
        A warm start for ``"krylov"`` and ``"power"``: the first iterate instead of ``p``
        (non-negative with a positive sum, normalised; its batch shape broadcasts to the
        chains'). The TokenRank of a neighbouring chain (the previous denoising step, the
        previous layer) is a good one; the convergence rule, and so the guarantee, is the same
        from any start. Ignored by ``"dense"``.

    Returns
    -------
    pi : Tensor, shape (..., N)
        Non-negative, sums to one; batch shape = broadcast of ``A``'s and ``p``'s batch shapes.
    info : dict
        Only with ``return_info=True`` (above).

    Raises
    ------
    ConvergenceError
        (a :class:`RuntimeError`) when the L1 rule is not met within ``max_iter`` passes, or at
        ``alpha = 1`` when the chain mixes too slowly to certify ``tol`` even in float64
        (Notes); it carries ``passes`` and the last ``residual``.
    ReducibleChainError
        (a :class:`ValueError`) ``alpha = 1`` and the chain has several closed classes.
    ValueError
        Invalid ``A``, ``alpha``, ``personalization``, ``tol``, ``max_iter``, ``method`` or
        ``dtype`` or ``start``; or an operator other than a ``DenseChain`` whose tensors require
        grad.

    Notes
    -----
    The damped chain :math:`A' = \alpha A + (1-\alpha)\mathbf 1 p^\top` (:func:`damped`) has a
    unique stationary row vector :math:`\pi = \pi A'` for :math:`\alpha < 1` [2]_. Equivalently
    :math:`\pi (I - \alpha A) = (1 - \alpha) p`, and for :math:`\alpha = 1`,
    :math:`\pi (I - A + \mathbf 1 u^\top) = u^\top` with :math:`u = \mathbf 1 / N`
    (non-singular iff :math:`\pi` is unique). Periodic chains need no special care: GMRES is
    not affected by their eigenvalue :math:`-1`, and ``"power"`` with ``alpha = 1`` iterates
    the lazy chain :math:`(I + A)/2`, which has the same stationary law and is aperiodic.

    **Convergence rule** (``"krylov"`` and ``"power"``, exact): with :math:`x` the current
    iterate, clipped at 0 and normalised to sum 1, the result is :math:`y = x A'` as soon as

    .. math:: \lVert x A' - x \rVert_1 < \mathrm{tol}

    holds for every chain in the batch, where :math:`x A'` is renormalised to sum 1 (a no-op
    for exactly stochastic ``A``; it keeps row sums that are 1 only up to rounding from setting
    a floor on the change). One damped step then changes the answer by less than ``tol`` in L1
    (networkx's ``pagerank`` tests the same quantity against ``N * tol``). Since one step
    contracts differences of distributions by :math:`\alpha` in L1, the distance to
    :math:`\pi` is at most :math:`\alpha\,\mathrm{tol}/(1-\alpha)` for :math:`\alpha < 1`, and
    in practice far less. The result does not depend on how the batch is split for the
    computation, and ``A`` and ``DenseChain(A)`` give identical results.

    **Certified at** ``alpha = 1``. Without damping there is no contraction to lean on: a chain
    that mixes slowly (two groups of tokens coupled by :math:`10^{-6}`) barely changes in one
    step while still far from :math:`\pi`. With :math:`r = xA - x`, :math:`x - \pi = -r Z`,
    :math:`Z = (I - A + \mathbf 1 \pi)^{-1}`, so the error is about :math:`\lVert r\rVert_1 /
    \gamma` with :math:`\gamma = \min_{\lambda \ne 1} |1 - \lambda|` (exactly so for normal
    chains). At ``alpha = 1`` the rule is therefore :math:`\lVert xA - x\rVert_1 <
    \mathrm{tol}\,\min(1, \gamma)` per chain, :math:`\gamma` from the eigenvalues (up to
    :data:`~attnchain.spectral.AUTO_DENSE_MAX_N` tokens) or from its lower bound
    :math:`2(1 - |\mu_2|)`, :math:`\mu_2` the second eigenvalue of the lazy chain
    :math:`(I + A)/2` (above). Where float32 rounding cannot resolve that step change the chain is
    solved in float64 (and returned in float32); where float64 cannot either,
    :class:`~attnchain.errors.ConvergenceError`. A matrix-free chain whose entries are all
    positive (:attr:`~attnchain.operators.AttentionChain.positive`) has one closed class, and
    above :data:`~attnchain.spectral.AUTO_DENSE_MAX_N` tokens its gap comes from the Krylov
    bound on the operator itself, so its matrix is never formed; it is not switched to float64
    (build it in float64 where float32 cannot resolve the step).

    **Gradients.** For a tensor ``A`` (or a :class:`~attnchain.operators.DenseChain`) and
    ``personalization`` that require grad, the backward pass differentiates the stationary
    equation :math:`\pi M = b` implicitly, :math:`M = I - \alpha A` (:math:`\alpha < 1`) or
    :math:`I - A + \mathbf 1 u^\top`: one adjoint GMRES solve :math:`M w = g - (g\cdot\pi)
    \mathbf 1` for the incoming gradient :math:`g`, then :math:`\partial L/\partial A = \alpha
    \pi^\top w^\top` and :math:`\partial L/\partial p = (1-\alpha) w`. This is the gradient
    that autograd gives through :func:`stationary_dense`; along row-stochastic perturbations (for
    instance through a softmax) it is the derivative of the iteration's result itself.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    >>> token_rank(A, alpha=1.0)
    tensor([0.3333, 0.6667])
    >>> token_rank(A, alpha=1.0, method="dense", dtype=torch.float64)
    tensor([0.3333, 0.6667], dtype=torch.float64)

    See Also
    --------
    stationary_dense : the float64 reference (``method="dense"``).
    damped : the damped chain.
    attnchain.operators.DampedChain : the damped chain as an operator.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Page, Brin, Motwani, Winograd, "The PageRank Citation Ranking", 1999
       :cite:`page1999pagerank`.
    .. [3] Saad, Schultz, "GMRES: A generalized minimal residual algorithm for solving
       nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 7(3), 1986.
    """
    alpha = check_fraction(alpha, "alpha")
    check_choice(method, "method", TOKEN_RANK_METHODS)
    check_positive(tol, "tol")
    check_int(max_iter, "max_iter")
    if method == "dense":
        return _token_rank_dense(A, alpha, personalization, dtype, check, atol, return_info)
    if isinstance(A, ChainOperator):
        op, late_check, check = as_operator(A, dtype), False, False
    else:
        A = as_tensor(A, "A")
        check_square(A)
        # the check runs group by group, just before each group's first product;
        # half-precision input is checked up front, before its rows are renormalised
        late_check = check and A.dtype in (torch.float32, torch.float64)
        op = DenseChain(A, dtype, atol, check=check and not late_check)
    chain = DampedChain(op, alpha, personalization)
    out_dtype, step = op.dtype, tol
    if alpha == 1.0:
        if late_check:  # the closed-class check needs a valid chain
            check_rows(op.A, atol)
            late_check = False
        from .spectral import AUTO_DENSE_MAX_N  # lazy: spectral imports this module

        if not isinstance(op, DenseChain) and op.n > AUTO_DENSE_MAX_N \
                and getattr(op, "positive", False):
            # matrix-free with every entry positive: one closed class, and the gap from the
            # operator itself (never the N x N matrix)
            step = _step_tol(op, tol)
        else:
            D = op.dense().to(torch.float64)  # a no-op for float64 chains
            _check_unique(D)
            step = _step_tol(D.detach(), tol)
        if bool((step < _resolution(op.dtype)).any()):  # certify in float64 instead
            if not isinstance(op, DenseChain):
                raise ConvergenceError(
                    f"token_rank(alpha=1): {op.dtype} cannot resolve the step change that "
                    f"certifies tol = {tol:g} for this slowly mixing chain (it must fall below "
                    f"{float(step.min()):.3g}); use a float64 operator or alpha < 1",
                    passes=0, residual=math.nan)
            # rows renormalised: stochastic to float64 precision
            op = DenseChain(D / D.sum(-1, keepdim=True), check=False)
            chain = DampedChain(op, alpha, personalization)
        step = step.to(op.dtype).expand(chain.batch_shape).reshape(-1)
    batch, N = chain.batch_shape, chain.n
    flat = chain.reshape(-1)
    x0 = None if start is None else _start(start, chain)
    with torch.no_grad():
        x, err, passes = gmres.stationary(flat, step, max_iter, method, TOKEN_RANK_GROUP_BYTES,
                                          late_row_check(flat.op.A, atol, op.A)
                                          if late_check else None, x0=x0)
    pi = x.reshape(*batch, N)
    if torch.is_grad_enabled() and (op.requires_grad or chain.p.requires_grad):
        if not isinstance(op, DenseChain):
            raise ValueError(f"token_rank differentiates through a tensor A or a DenseChain, "
                             f"not through a {type(op).__name__} whose tensors require grad")
        pi = _Implicit.apply(op.A, chain.p, pi, alpha, tol, max_iter)
    pi, err = pi.to(out_dtype), err.to(out_dtype)
    if return_info:
        info = {"passes": round(passes, 2), "check_passes": 2 if check else 0,
                "residual": err.reshape(batch)}
        return pi, info
    return pi


def token_rank_sequence(A, warm_start: bool = True, **kwargs):
    r"""TokenRank of a sequence of chains (the steps of a denoising trajectory, the layers of a
    model), each solved from the answer of the one before.

    Parameters
    ----------
    A : Tensor, shape (S, ..., N, N), or ChainOperator with batch shape (S, ...)
        The chains; the first batch dimension is the sequence (the step dimension of
        ``capture(..., keep="qk")`` under ``step_reduce="stack"``).
    warm_start : bool
        Start step ``t`` from the TokenRank of step ``t - 1`` (:func:`token_rank`'s ``start=``);
        ``False`` solves every step cold, from ``p``: the baseline for the savings.
    **kwargs
        Passed to :func:`token_rank` (``alpha``, ``personalization``, ``tol``, ``method``, ...;
        not ``start`` or ``return_info``).

    Returns
    -------
    pi : Tensor, shape (S, ..., N)
        The TokenRank of every step, each meeting :func:`token_rank`'s convergence rule.
    passes : list of float
        Passes over each step's chains (in units of that step's batch).

    Raises
    ------
    ValueError
        ``A`` has no sequence dimension, or ``start``/``return_info`` among ``kwargs``; and
        whatever :func:`token_rank` raises.

    Notes
    -----
    Attention changes little from one denoising step to the next, so the previous answer is
    close to the new one and the solver starts near its goal; the answer satisfies the same L1
    rule whatever the start, so warm and cold results agree to within the tolerance.

    Examples
    --------
    >>> import torch
    >>> A = torch.softmax(torch.randn(4, 30, 30, generator=torch.Generator().manual_seed(0)), -1)
    >>> A = A[:1] + 0.01 * (A - A[:1])                  # four nearby chains
    >>> A = A / A.sum(-1, keepdim=True)
    >>> pi, passes = token_rank_sequence(A)
    >>> pi_cold, passes_cold = token_rank_sequence(A, warm_start=False)
    >>> bool((pi - pi_cold).abs().sum(-1).max() < 1e-5), sum(passes) < sum(passes_cold)
    (True, True)

    See Also
    --------
    token_rank : one step; ``start=`` is the warm start.
    attnchain.capture.Recorder.operators : the steps of a diffusion model as operators.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    return _solve_sequence(token_rank, A, warm_start, lambda pi, info: pi, kwargs,
                          "token_rank_sequence")


def _solve_sequence(solve, A, warm_start: bool, next_start, kwargs: dict, name: str):
    """Run ``solve(A[t], start=..., return_info=True, **kwargs)`` along the first batch
    dimension of ``A`` (a tensor (S, ..., N, N) or an operator with batch shape (S, ...)),
    step ``t`` starting from ``next_start(out, info)`` of step ``t - 1`` when ``warm_start``.
    Returns the stacked outputs and the passes of each step."""
    for bad in ("start", "return_info"):
        if bad in kwargs:
            raise ValueError(f"{name} sets {bad}= itself")
    if not isinstance(A, ChainOperator):
        A = as_tensor(A, "A")
        if A.ndim < 3:
            raise ValueError(f"A must have a sequence dimension, shape (S, ..., N, N); got "
                             f"{tuple(A.shape)}")
    elif len(A.batch_shape) < 1:
        raise ValueError("the operator must have a sequence dimension (batch shape (S, ...))")
    outs, passes, prev = [], [], None
    for t in range(A.shape[0] if not isinstance(A, ChainOperator) else A.batch_shape[0]):
        out, info = solve(A[t], start=prev if warm_start else None, return_info=True, **kwargs)
        outs.append(out)
        passes.append(info["passes"])
        prev = next_start(out, info)
    return torch.stack(outs), passes
