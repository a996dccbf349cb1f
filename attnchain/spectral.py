r"""Eigen-analysis of attention chains: :math:`|\lambda_2|`, spectra, λ2 head weighting, metastable states.

For a row-stochastic ``A`` of shape ``(..., N, N)`` the largest eigenvalue is
:math:`\lambda_1 = 1`; the second-largest magnitude :math:`|\lambda_2|` measures how slowly the
chain mixes (:math:`\|v_0 A^n - \pi\| \sim |\lambda_2|^n`). Erel et al. use it to weight
attention heads: structured heads mix slowly (large :math:`|\lambda_2|`), noisy heads fast.

Markov operations (checks, bounce) live in :mod:`attnchain.chain`, TokenRank in
:mod:`attnchain.stationary`. How the Krylov solver works is on the book's Numerics page.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Saad, "Numerical Methods for Large Eigenvalue Problems", 2011
:cite:`saad2011eigen`; Deuflhard, Weber, "Robust Perron cluster analysis in conformation
dynamics", 2005 :cite:`deuflhard2005pcca`; Meila, Shi, "A random walks view of spectral
segmentation", 2001 :cite:`meila2001random`; Shi, Malik, "Normalized cuts and image
segmentation", 2000 :cite:`shi2000ncut`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._solvers import block_krylov, dense
from ._solvers.block_krylov import KRYLOV_BLOCK
from ._validate import (as_tensor, check_choice, check_fraction, check_int, check_positive,
                        check_square, late_row_check, prepare)
from .errors import ConvergenceError
from .operators import ChainOperator, DenseChain, as_operator
from .stationary import _solve_sequence, token_rank

__all__ = ["lambda2", "lambda2_sequence", "eigenvalues", "head_weights", "head_mean",
           "metastable_states", "choose_bounces", "HEAD_WEIGHTINGS", "K_MAX", "LAMBDA2_METHODS",
           "AUTO_DENSE_MAX_N", "KRYLOV_BLOCK", "KRYLOV_GROUP_BYTES"]

#: ``method="auto"`` uses the dense eigensolver up to this many tokens, Krylov above.
AUTO_DENSE_MAX_N = 256

#: The methods of :func:`lambda2`.
LAMBDA2_METHODS = ("auto", "dense", "krylov")

#: On CPU, Krylov runs the chains in groups of at most this many bytes of matrices, one group
#: after the other (in practice one batch): a pass over the batch is then one batched
#: product and one batched set of small operations. Groups sized to the cache (which keep a
#: group in cache from one pass to the next) measured slower, 1.03 to 1.41 times one batch
#: at N = 384 to 1,448 with 12 to 48 heads on a 2-core CPU with a 16 MiB cache: the solver's
#: small per-pass operations cost more, repeated per group, than the cache saves (Numerics page).
KRYLOV_GROUP_BYTES = 2 ** 30

#: The head weightings of :func:`head_mean` (one vocabulary across package, chapters and book).
HEAD_WEIGHTINGS = ("uniform", "lambda2")

#: Default largest number of metastable states considered by :func:`metastable_states` and
#: :func:`choose_bounces`.
K_MAX = 10


def _sort_by_magnitude(ev: torch.Tensor) -> torch.Tensor:
    """Sort complex eigenvalues by decreasing |λ|, ties by decreasing real then imaginary part."""
    ev = ev.gather(-1, torch.sort(ev.imag, dim=-1, descending=True, stable=True).indices)
    ev = ev.gather(-1, torch.sort(ev.real, dim=-1, descending=True, stable=True).indices)
    return ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)


def _largest_gap(values: torch.Tensor, k_max: int) -> torch.Tensor:
    """For values sorted in decreasing order (..., M): the ``k`` in ``1 .. min(k_max, M - 1)``
    that maximises ``values[k - 1] - values[k]`` (1 where there is no gap to look at)."""
    kk = min(k_max, values.shape[-1] - 1)
    if kk < 1:
        return torch.ones(values.shape[:-1], dtype=torch.long, device=values.device)
    gaps = values[..., :kk] - values[..., 1 : kk + 1]
    return gaps.argmax(-1) + 1


def eigenvalues(A, k: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                atol: float = 1e-4) -> torch.Tensor:
    r"""All (or the ``k`` largest) eigenvalues of row-stochastic matrices, dense.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    k : int, optional
        Keep the ``k`` eigenvalues of largest magnitude (``1 <= k <= N``); all if ``None``.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64`` for the computation.
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    Tensor, shape (..., k), complex
        Sorted by decreasing :math:`|\lambda|` (ties: decreasing real part, then imaginary).
        The first is :math:`\lambda_1 = 1` up to rounding.

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`attnchain.check_stochastic`) or ``k``.

    Notes
    -----
    ``torch.linalg.eigvals`` (LAPACK ``geev`` on CPU), exact up to rounding, :math:`O(N^3)`
    per matrix.

    Examples
    --------
    >>> import torch
    >>> eigenvalues(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), dtype=torch.float64)
    tensor([1.0000+0.j, 0.7000+0.j], dtype=torch.complex128)

    See Also
    --------
    lambda2 : only :math:`|\lambda_2|`, also by Krylov iteration.

    References
    ----------
    .. [1] Levin, Peres, Wilmer, "Markov Chains and Mixing Times", 2nd ed., AMS 2017
       :cite:`levin2017markov` (the spectrum of a transition matrix).
    """
    A = prepare(A, dtype, atol)
    N = A.shape[-1]
    if k is not None:
        check_int(k, "k", 1, N)
    ev = _sort_by_magnitude(dense.eigvals(A))
    return ev if k is None else ev[..., :k]


def lambda2(A, method: str = "auto", dtype: Optional[torch.dtype] = None, tol: float = 1e-5,
            krylov_dim: int = 64, max_restarts: int = 50, atol: float = 1e-4,
            return_info: bool = False, start: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Second-largest eigenvalue magnitude :math:`|\lambda_2|` of row-stochastic matrices.

    Parameters
    ----------
    A : Tensor, shape (..., N, N), or ChainOperator
        Row-stochastic attention, or an operator (:mod:`attnchain.operators`), which is trusted
        to be row-stochastic and not checked (``"dense"`` forms its matrix).
    method : {"auto", "dense", "krylov"}
        ``"dense"``: all eigenvalues by ``torch.linalg.eigvals`` (exact up to rounding,
        :math:`O(N^3)`). ``"krylov"``: a Krylov-Schur iteration on the zero-mean vectors
        (Notes), :math:`O(p N^2)` for ``p`` passes over ``A``, certified or an error.
        ``"auto"``: dense for ``N <= AUTO_DENSE_MAX_N`` (256); above, Krylov, and the dense
        eigensolver in float64 for just the matrices Krylov cannot certify (spectra whose
        eigenvalues all crowd one circle, such as shift-like positional heads, where float32
        ``eigvals`` itself is off by 4e-5 at N = 2,048 and 1e-4 at N = 4,096).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``; for an operator ``None`` or its dtype.
    tol : float
        Krylov: the residual bound of the certificate (Notes); the error of
        :math:`|\lambda_2|` is then at most :math:`\kappa\,` ``tol`` to first order, with
        :math:`\kappa` the condition number of the eigenvalue (1 for normal matrices; 1 to 10
        on the heads of :mod:`attnchain.testing.spectra`). In float32, residuals below about
        ``1e-6`` are at the level of rounding.
    krylov_dim : int
        Krylov: largest basis size; above it the basis is cut back to the Schur vectors of its
        ``krylov_dim // 2`` leading Ritz values (a thick restart). The default keeps the
        projected matrices below the size (75) at which LAPACK's eigensolver switches to its
        slower multishift path.
    max_restarts : int
        Krylov: restarts before a matrix counts as not certified. Most matrices that cannot
        be certified are given up earlier, when their residual stops falling (Notes).
    atol : float
        Row-sum tolerance of the input check.
    return_info : bool
        Also return ``{"passes": ..., "products": ..., "dense": ...}``: ``products`` counts
        products of single matrices with a block of vectors (each reads that matrix once),
        ``passes = products / (number of matrices)`` (2 decimals) is the data read in units
        of the whole of ``A``, besides the input check's pass for the minimum (0 for dense);
        ``dense`` is the number of matrices solved by the dense eigensolver (all of them for
        ``"dense"``; for ``"auto"`` above 256 tokens, those Krylov could not certify). The
        Krylov path adds ``vector`` (batch shape + ``(N,)``): per matrix a unit zero-mean
        vector of the invariant subspace of its leading Ritz value (or complex pair), the
        ``start`` for a nearby chain.
    start : Tensor, optional
        Krylov: the first vector of each matrix, shape batch shape + ``(N,)`` or ``(N,)`` for
        all, instead of the fixed random vector; a warm start, for instance ``vector`` of the
        previous denoising step or layer (:func:`lambda2_sequence`). Its mean is removed; a
        zero vector falls back to the random one. The certificate is the same from any start,
        so only the passes change. Ignored by the dense eigensolver.

    Returns
    -------
    Tensor, shape (...,)
        :math:`|\lambda_2|` in :math:`[0, 1]`; it is 1 for reducible or periodic chains, and 0
        for ``N = 1``.
    info : dict
        Only with ``return_info=True`` (above).

    Raises
    ------
    ConvergenceError
        ``method="krylov"`` and some matrix could not be certified; it names the first one
        and carries ``passes`` and the largest final ``residual``.
    ValueError
        Invalid ``A`` (see :func:`attnchain.check_stochastic`), ``method``, ``dtype``,
        ``tol``, ``krylov_dim`` or ``max_restarts``.

    Notes
    -----
    **The operator.** With :math:`P = I - \mathbf 1 \mathbf 1^\top / N` (removing the mean of
    a vector), :math:`AP = A - \mathbf 1 \mathbf 1^\top / N` has the spectrum of ``A`` with
    :math:`\lambda_1 = 1` replaced by 0 (Brauer's theorem, because :math:`A\mathbf 1 =
    \mathbf 1`), and :math:`PAP = P(AP)` has the same nonzero eigenvalues as :math:`(AP)P =
    AP`. On the zero-mean vectors :math:`PAP` acts as :math:`M: x \mapsto P A x`, so
    :math:`|\lambda_2|` is the largest eigenvalue magnitude of :math:`M`: no deflation of
    :math:`\lambda_1` is needed, only the mean removed after every product.

    **The iteration.** Krylov-Schur [3]_ with Rayleigh-Ritz [2]_ (Ch. 6): one new
    orthonormal direction per pass (one matrix-vector product, the cheapest product of a
    BLAS), a decomposition :math:`M K^\top = K^\top T + Q^\top F` kept in coefficients, and
    past ``krylov_dim`` a restart to the Schur vectors of the leading Ritz values, an
    invariant subspace, so the iteration continues as if uninterrupted.

    **The certificate** bounds the magnitude, not one eigenvector. A matrix is done when
    some Ritz value :math:`\theta` with :math:`|\theta| \ge |\theta_{\max}| - \mathrm{tol}`
    (:math:`\theta_{\max}` the Ritz value of largest magnitude) has a unit Ritz vector
    :math:`z` with residual :math:`r = Mz - \theta z`, :math:`\|r\|_2 \le` ``tol``, and the
    basis holds at least ``MIN_DIM`` (12) directions; :math:`|\theta|` is returned. Then
    (i) :math:`\theta` is an exact eigenvalue of :math:`M - r z^{\mathsf H}`, a perturbation
    of norm :math:`\|r\|_2`, so :math:`|\theta|` is within :math:`\kappa\,\mathrm{tol} +
    O(\mathrm{tol}^2)` of the magnitude of an eigenvalue of ``A`` other than
    :math:`\lambda_1` ([2]_, Ch. 3); (ii) no Ritz value of the final Krylov space exceeds
    :math:`|\theta|` by more than ``tol``. Any member of a cluster of nearly equal magnitudes
    (a complex pair, :math:`\lambda_2 \approx -\lambda_3`, a random-matrix bulk edge) can
    certify the cluster's magnitude, however ill-determined the individual eigenvectors.
    (ii) is the Krylov part of the statement, the one every Krylov method (ARPACK's included)
    rests on: an eigenvalue whose eigenvector has no component in the Krylov space of the
    random start is not seen; ``MIN_DIM`` guards against the one case met in practice, a
    near-degenerate pair of which one member converges before the other appears.

    **What cannot be certified.** A matrix whose residual stops halving for
    ``STALL_PASSES`` (60) passes, or would need more than ``PASS_BUDGET`` (400) passes at
    the rate it has fallen so far, is given up (not certified), as is one still iterating
    after ``max_restarts``. This is the case when many eigenvalues crowd the circle of
    :math:`|\lambda_2|`: a polynomial of low degree cannot be large at one point of a circle
    and small on the rest (maximum modulus principle), so no Krylov method separates
    :math:`|\lambda_2|` there in few passes. ``"krylov"`` raises, ``"auto"`` solves just
    those matrices densely. Results do not depend on how the batch is split for the
    computation (every matrix starts from the same vector, drawn from a fixed seed), and
    ``A`` and ``DenseChain(A)`` give identical results. The book's Numerics page has the
    details and the measurements.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)
    >>> lambda2(A)                                 # the eigenvalues are 1 and 0.7
    tensor(0.7000, dtype=torch.float64)
    >>> cyc = torch.roll(torch.eye(300), 1, 1)     # periodic: every |λ| is 1
    >>> lambda2(cyc, return_info=True)[1]["dense"]  # Krylov cannot certify it: dense
    1
    >>> lambda2(cyc)
    tensor(1.)

    See Also
    --------
    eigenvalues : the whole spectrum, dense.
    head_weights : heads weighted by :math:`|\lambda_2|`.
    attnchain.testing.spectra : heads with hard spectra, and the float64 reference.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Saad, "Numerical Methods for Large Eigenvalue Problems", 2nd ed., SIAM 2011
       :cite:`saad2011eigen`.
    .. [3] Stewart, "A Krylov-Schur algorithm for large eigenproblems", SIAM J. Matrix Anal.
       Appl. 23(3), 2001.
    """
    check_choice(method, "method", LAMBDA2_METHODS)
    check_positive(tol, "tol", finite=True)
    check_int(krylov_dim, "krylov_dim", low=2)
    check_int(max_restarts, "max_restarts", low=0)
    if start is not None:
        start = as_tensor(start, "start")
    if isinstance(A, ChainOperator):
        op, late_check = as_operator(A, dtype), False
        N = op.n
    else:
        A = as_tensor(A, "A")
        N = check_square(A)
        # Krylov checks each group of matrices just before iterating on it; every
        # other path, and half-precision input, is checked here
        late_check = (method == "krylov" or (method == "auto" and N > AUTO_DENSE_MAX_N)) \
            and N > 2 and A.dtype in (torch.float32, torch.float64)
        op = DenseChain(A, dtype, atol, check=not late_check)
    batch = op.batch_shape
    no_passes = {"passes": 0, "products": 0, "dense": 0}
    if N == 1:
        out = torch.zeros(batch, dtype=op.dtype, device=op.device)
        return (out, no_passes) if return_info else out
    auto = method == "auto"
    if auto:
        method = "dense" if N <= AUTO_DENSE_MAX_N else "krylov"
    if method == "dense":
        D = op.dense()
        ev = dense.eigvals(D).abs()
        out = torch.topk(ev, 2, dim=-1).values[..., 1].to(D.dtype)
        out = out.clamp(0, 1)
        return (out, dict(no_passes, dense=out.numel())) if return_info else out
    if N == 2:  # the zero-sum subspace is one-dimensional: λ2 = A00 + A11 - 1 = trace - 1
        D = op.dense()
        out = (D[..., 0, 0] + D[..., 1, 1] - 1).abs()
        return (out, no_passes) if return_info else out
    if torch.is_grad_enabled() and op.requires_grad:
        raise ValueError("lambda2(method='krylov') has no gradient: use method='dense' "
                         "(differentiable through torch.linalg.eigvals) or pass A.detach()")
    flat = op.reshape(-1)
    if start is not None:
        if start.shape[-1] != N or start.shape[:-1] not in (batch, ()):
            raise ValueError(f"start must have shape {tuple(batch) + (N,)} or ({N},), got "
                             f"{tuple(start.shape)}")
        start = start.reshape(-1, 1, N) if start.ndim > 1 else start.reshape(1, N)
    r = block_krylov.lambda2(flat, krylov_dim, tol, max_restarts, KRYLOV_GROUP_BYTES,
                             late_row_check(flat.A, atol, op.A) if late_check else None,
                             start=start)
    theta = r.value.to(op.dtype)
    bad = ~r.converged
    n_bad = int(bad.sum())
    if n_bad and not auto:
        first = int(bad.nonzero()[0, 0])
        idx = tuple(torch.unravel_index(torch.tensor(first), tuple(batch))) if batch else ()
        raise ConvergenceError(
            f"lambda2(method='krylov') did not converge for {n_bad} of {bad.numel()} "
            f"matrices (first at batch index {tuple(int(i) for i in idx)}): the Ritz residual "
            f"{r.residual[first].item():.3g} of the largest Ritz magnitudes stayed above "
            f"tol = {tol:g} (it stopped halving for {block_krylov.STALL_PASSES} passes, fell too "
            f"slowly to meet tol within {block_krylov.PASS_BUDGET} passes, or {max_restarts} "
            f"restarts of {krylov_dim}-dimensional Krylov spaces ran out); their spectra have "
            "many eigenvalues of nearly the largest magnitude, which no Krylov method "
            "separates in few passes; use method='dense' (method='auto' solves just these "
            "matrices densely)",
            passes=round(r.products / max(bad.numel(), 1), 2),
            residual=r.residual[bad].max().item())
    if n_bad:  # auto: the dense eigensolver, in float64, for the matrices Krylov could not certify
        D = flat[bad.nonzero()[:, 0]].dense().to(torch.float64)
        theta[bad] = torch.topk(dense.eigvals(D).abs(), 2, dim=-1).values[..., 1].to(theta.dtype)
    out = theta.reshape(batch).clamp(0, 1)
    info = {"passes": round(r.products / max(flat.batch_shape[0], 1), 2),
            "products": r.products, "dense": n_bad, "vector": r.vector.reshape(*batch, N)}
    return (out, info) if return_info else out


def lambda2_sequence(A, warm_start: bool = True, **kwargs):
    r""":math:`|\lambda_2|` of a sequence of chains (the steps of a denoising trajectory, the
    layers of a model), each Krylov solve started from the leading Ritz vector of the one
    before.

    Parameters
    ----------
    A : Tensor, shape (S, ..., N, N), or ChainOperator with batch shape (S, ...)
        The chains; the first batch dimension is the sequence.
    warm_start : bool
        Start step ``t`` from ``vector`` of step ``t - 1`` (:func:`lambda2`'s ``start=``);
        ``False`` starts every step from the fixed random vector: the baseline for the savings.
    **kwargs
        Passed to :func:`lambda2` (``method``, ``tol``, ...; not ``start`` or ``return_info``).

    Returns
    -------
    lam : Tensor, shape (S, ...)
        :math:`|\lambda_2|` of every step, each certified as by :func:`lambda2`.
    passes : list of float
        Passes over each step's chains (in units of that step's batch; 0 where the dense
        eigensolver ran).

    Notes
    -----
    A Krylov space started inside the leading invariant subspace of a nearby chain has most of
    what it looks for in its first direction; the certificate does not depend on the start, so
    warm and cold values agree within ``tol`` (times the eigenvalue's condition number).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> A = torch.softmax(3 * torch.randn(1, 400, 400, generator=g), -1)
    >>> A = A + 0.002 * torch.arange(4.0)[:, None, None] * torch.softmax(
    ...     torch.randn(1, 400, 400, generator=g), -1)               # a slow drift
    >>> A = A / A.sum(-1, keepdim=True)
    >>> lam, warm = lambda2_sequence(A, method="krylov")
    >>> lam_cold, cold = lambda2_sequence(A, method="krylov", warm_start=False)
    >>> bool((lam - lam_cold).abs().max() < 1e-4), sum(warm[1:]) < sum(cold[1:])
    (True, True)

    See Also
    --------
    lambda2 : one step; ``start=`` is the warm start.
    attnchain.token_rank_sequence : the same for TokenRank.
    """
    def next_start(lam, info):
        return info.get("vector")

    return _solve_sequence(lambda2, A, warm_start, next_start, kwargs, "lambda2_sequence")


def _head_axis(A: torch.Tensor, head_dim: int) -> int:
    """Axis of the head dimension among A's batch dims, as a non-negative index."""
    nb = A.ndim - 2
    if nb < 1:
        raise ValueError(f"A of shape {tuple(A.shape)} has no head dimension: expected "
                         "(..., H, N, N)")
    d = head_dim + A.ndim if head_dim < 0 else head_dim
    if not 0 <= d < nb:
        raise ValueError(f"head_dim={head_dim} must point at a batch dimension of A (one of "
                         f"the first {nb} dims of shape {tuple(A.shape)}), not at N x N")
    if A.shape[d] == 0:
        raise ValueError(f"A of shape {tuple(A.shape)} has no heads (head_dim={head_dim} has "
                         "size 0): there is nothing to weight or average")
    return d


def _head_weights(A: torch.Tensor, d: int, method: str, lam2=None) -> torch.Tensor:
    """λ2 weights of the heads of a checked ``A`` along batch axis ``d``, from ``lam2`` when
    given: normalised to sum 1, uniform where every head has |λ2| = 0."""
    if lam2 is None:
        l2 = lambda2(A, method=method)
    else:
        l2 = torch.as_tensor(lam2).to(device=A.device, dtype=A.dtype)
    s = l2.sum(d, keepdim=True)
    uniform = torch.full_like(l2, 1.0 / l2.shape[d])
    return torch.where(s > 0, l2 / torch.where(s > 0, s, torch.ones_like(s)), uniform)


def head_weights(A, head_dim: int = -3, method: str = "auto",
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""λ2 weights of attention heads: :math:`w_h = |\lambda_2^{(h)}| / \sum_g |\lambda_2^{(g)}|`.

    Parameters
    ----------
    A : Tensor, shape (..., H, ..., N, N)
        Row-stochastic attention with a head dimension at ``head_dim``.
    head_dim : int
        Dimension of ``A`` holding the heads (default ``-3``: ``(..., H, N, N)``).
    method : {"auto", "dense", "krylov"}
        How :func:`lambda2` is computed.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    Tensor, shape ``A.shape[:-2]``
        Non-negative, summing to one along the head dimension. If every head has
        :math:`|\lambda_2| = 0` (all rank-one), the weights are uniform.

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`attnchain.check_stochastic`), or ``head_dim`` not a batch
        dimension of ``A``.

    Notes
    -----
    Erel et al. [1]_ weight heads by :math:`|\lambda_2|`: a head whose chain mixes slowly
    keeps structure (metastable token groups); one that mixes fast is close to uniform noise.

    Examples
    --------
    >>> import torch
    >>> heads = torch.stack([torch.eye(2), torch.tensor([[0.5, 0.5], [0.25, 0.75]])])
    >>> head_weights(heads)                     # |λ2| = 1 and 0.25
    tensor([0.8000, 0.2000])

    See Also
    --------
    head_mean : the weighted average of the heads.
    lambda2

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    A = prepare(A, dtype)
    return _head_weights(A, _head_axis(A, head_dim), method)


def head_mean(A, weighting: str = "uniform", head_dim: int = -3, method: str = "auto",
              dtype: Optional[torch.dtype] = None, lam2=None) -> torch.Tensor:
    r"""Average of attention heads: uniform, or weighted by :math:`|\lambda_2|`.

    Parameters
    ----------
    A : Tensor, shape (..., H, ..., N, N)
        Row-stochastic attention with a head dimension at ``head_dim``.
    weighting : {"uniform", "lambda2"}
        ``"uniform"``: :math:`\frac1H \sum_h A^{(h)}`. ``"lambda2"``: :math:`\sum_h w_h A^{(h)}`
        with the weights of :func:`head_weights` [1]_.
    head_dim : int
        Dimension of ``A`` holding the heads (default ``-3``: ``(..., H, N, N)``).
    method : {"auto", "dense", "krylov"}
        How :func:`lambda2` is computed (``"lambda2"`` only).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    lam2 : Tensor, shape ``A.shape[:-2]``, optional
        Precomputed :func:`lambda2` of every head, so that it is not computed twice.

    Returns
    -------
    Tensor, shape of ``A`` without ``head_dim``
        A convex combination of row-stochastic matrices, hence row-stochastic.

    Raises
    ------
    ValueError
        Unknown ``weighting``, invalid ``A`` or ``head_dim`` (see :func:`head_weights`).

    Examples
    --------
    >>> import torch
    >>> A = torch.stack([torch.eye(2), torch.full((2, 2), 0.5)])
    >>> head_mean(A)
    tensor([[0.7500, 0.2500],
            [0.2500, 0.7500]])
    >>> head_mean(A, "lambda2").round(decimals=4)   # |λ2| is 1 for the identity, 0 for the flat head
    tensor([[1., 0.],
            [0., 1.]])

    See Also
    --------
    head_weights, lambda2

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    check_choice(weighting, "weighting", HEAD_WEIGHTINGS)
    A = prepare(A, dtype)
    d = _head_axis(A, head_dim)
    if weighting == "uniform":
        return A.mean(d)
    w = _head_weights(A, d, method, lam2)
    return (A * w[..., None, None]).sum(d)


def _inner_simplex(X: torch.Tensor) -> torch.Tensor:
    """Indices of k rows of X (N, k) spanning the (near-)simplex of PCCA+ (greedy)."""
    k = X.shape[1]
    Y = X.clone()
    idx = [int(Y.norm(dim=1).argmax())]
    Y = Y - Y[idx[0]]
    for _ in range(1, k):
        i = int(Y.norm(dim=1).argmax())
        idx.append(i)
        q = Y[i] / Y[i].norm().clamp_min(1e-300)
        Y = Y - (Y @ q)[:, None] * q[None, :]
    return torch.tensor(idx, device=X.device)


def metastable_states(A, k: Optional[int] = None, k_max: int = K_MAX, alpha: float = 0.99,
                      atol: float = 1e-4, return_k: bool = False) -> torch.Tensor:
    r"""Metastable token groups: where the attention chain lingers before it mixes.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    k : int, optional
        Number of groups (``1 <= k <= N``). If ``None``, chosen per matrix from the largest
        spectral gap :math:`\mu_k - \mu_{k+1}` for ``k`` in ``1 .. min(k_max, N - 1)``.
    k_max : int
        Largest ``k`` considered when ``k`` is ``None`` (default :data:`K_MAX`).
    alpha : float
        Damping used only for the stationary weights :math:`\pi` of the reversibilisation
        (keeps :math:`\pi > 0` even for reducible chains).
    atol : float
        Row-sum tolerance of the input check.
    return_k : bool
        Also return the number of groups used per matrix, LongTensor ``(...,)``.

    Returns
    -------
    labels : LongTensor, shape (..., N)
        Group of each token, ``0 .. k-1``, numbered in order of each group's first token.
    k : LongTensor, shape (...,)
        Only with ``return_k=True``.

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`attnchain.check_stochastic`), ``k`` or ``k_max``.

    Notes
    -----
    1. :math:`\pi` = :func:`~attnchain.stationary.token_rank` of ``A`` (float64),
       :math:`D = \mathrm{diag}(\pi)`.
    2. Additive reversibilisation :math:`W = (D A + A^\top D)/2`, symmetric, and the normalised
       :math:`L = D^{-1/2} W D^{-1/2}` with eigenvalues :math:`1 = \mu_1 \ge \mu_2 \ge \dots`.
       :math:`D^{-1} W` is a reversible chain with the same stationary law; eigenvalues near 1
       mean sets the chain rarely leaves ([3]_; normalised cuts, [4]_).
    3. :math:`X = D^{-1/2} U_{:, :k}` (right eigenvectors, first column constant). For a nearly
       decomposable chain the rows of ``X`` cluster at the ``k`` vertices of a simplex; PCCA+'s
       inner-simplex algorithm [2]_ picks ``k`` vertex rows greedily, memberships are
       :math:`\chi = X X_{\mathrm{vert}}^{-1}` and each token takes the group of its largest
       membership.

    Dense :math:`O(N^3)` (``torch.linalg.eigh`` in float64) per matrix.

    Examples
    --------
    >>> import torch
    >>> from attnchain import planted_chain
    >>> A, planted = planted_chain([4, 6, 5], leak=0.05, seed=0)
    >>> labels, k = metastable_states(A, return_k=True)
    >>> int(k), labels.tolist() == planted.tolist()
    (3, True)

    See Also
    --------
    attnchain.planted_chain : chains with known states.
    choose_bounces : a bounce count from the same kind of gap.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Deuflhard, Weber, "Robust Perron cluster analysis in conformation dynamics", Linear
       Algebra Appl. 398, 2005 :cite:`deuflhard2005pcca`.
    .. [3] Meila, Shi, "A random walks view of spectral segmentation", AISTATS 2001
       :cite:`meila2001random`.
    .. [4] Shi, Malik, "Normalized cuts and image segmentation", IEEE TPAMI 22(8), 2000
       :cite:`shi2000ncut`.
    """
    A = prepare(A, torch.float64, atol)
    N = A.shape[-1]
    batch = A.shape[:-2]
    if k is not None:
        check_int(k, "k", 1, N)
    check_int(k_max, "k_max")
    A = A / A.sum(-1, keepdim=True)  # exact row sums in float64 for float32 input
    pi = token_rank(A, alpha=alpha, tol=1e-10, dtype=torch.float64, check=False)
    s = pi.sqrt()
    W = 0.5 * (pi.unsqueeze(-1) * A + (pi.unsqueeze(-1) * A).transpose(-1, -2))
    L = W / s.unsqueeze(-1) / s.unsqueeze(-2)
    mu, U = torch.linalg.eigh(L)
    mu, U = mu.flip(-1), U.flip(-1)
    X = U / s.unsqueeze(-1)
    if k is None:
        ks = _largest_gap(mu, k_max)
    else:
        ks = torch.full(batch, k, dtype=torch.long, device=A.device)
    Xf, kf = X.reshape(-1, N, N), ks.reshape(-1)
    labels = torch.empty(Xf.shape[0], N, dtype=torch.long, device=A.device)
    for b in range(Xf.shape[0]):
        kb = int(kf[b])
        Xb = Xf[b, :, :kb]
        if kb == 1:
            labels[b] = 0
            continue
        vert = _inner_simplex(Xb)
        chi = Xb @ torch.linalg.pinv(Xb[vert])
        lab = chi.argmax(1)
        # renumber groups by their first token
        order = {}
        for v in lab.tolist():
            order.setdefault(v, len(order))
        remap = torch.tensor([order.get(i, i) for i in range(kb)], device=A.device)
        labels[b] = remap[lab]
    labels = labels.reshape(*batch, N)
    return (labels, ks) if return_k else labels


def choose_bounces(A, eps: float = 0.1, max_bounces: int = 10, k_max: int = K_MAX,
                   dtype: Optional[torch.dtype] = None, atol: float = 1e-4) -> torch.Tensor:
    r"""A spectral rule for the number of bounces ``n`` of multi-bounce attention, per matrix.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    eps : float in (0, 1)
        How far the fast (within-state) modes must have decayed.
    max_bounces : int >= 1
        Upper clamp; the result lies in ``[1, max_bounces]``.
    k_max : int >= 1
        Largest number of metastable states considered (default :data:`K_MAX`).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64`` for the eigenvalues (see
        :func:`eigenvalues`).
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    n : LongTensor, shape (...,)
        The number of bounces per matrix, on the device of ``A``.

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`attnchain.check_stochastic`), ``eps`` outside (0, 1),
        ``max_bounces < 1`` or ``k_max < 1``.

    Notes
    -----
    Let :math:`1 = |\lambda_1| \ge |\lambda_2| \ge \dots` be the eigenvalue magnitudes and
    :math:`k = \arg\max_{1 \le j \le \min(k_{\max}, N - 1)} (|\lambda_j| - |\lambda_{j+1}|)`
    the position of the largest drop (the number of slow modes). Then

    .. math::  n^* = \mathrm{clip}\left(\left\lceil \frac{\log \varepsilon}
               {\log |\lambda_{k+1}|} \right\rceil, 1, n_{\max}\right),

    and :math:`n^* = 1` (row selection) when :math:`k = 1` or :math:`N = 1`: without metastable
    structure, bouncing only mixes toward the stationary distribution.

    After :math:`n` steps the modes with :math:`|\lambda| \le |\lambda_{k+1}|` are damped by at
    least :math:`|\lambda_{k+1}|^n \le \varepsilon` (for diagonalisable ``A``), so mass started at
    a token has spread over its metastable state, while the ``k`` slow modes, which separate the
    states, have barely decayed: the separation of time scales of nearly decomposable chains
    [2]_. The rule is this book's, not the paper's; the paper finds ``n = 2`` best for
    segmentation [1]_, and Chapter 3 tests the rule on planted chains and scenes.
    Dense :math:`O(N^3)` per matrix (:func:`eigenvalues`).

    Examples
    --------
    >>> from attnchain import planted_chain
    >>> A, _ = planted_chain([10, 10, 10], leak=0.05, concentration=0.3, seed=4)
    >>> choose_bounces(A)
    tensor(4)
    >>> choose_bounces(A, eps=0.01)             # the fast modes must decay further
    tensor(7)

    See Also
    --------
    attnchain.bounce : the bounces themselves.
    metastable_states : the states the slow modes separate.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Simon, Ando, "Aggregation of variables in dynamic systems", Econometrica 29(2), 1961.
    """
    eps = check_fraction(eps, "eps", closed=False, where="choose_bounces: ")
    check_int(max_bounces, "max_bounces", where="choose_bounces: ")
    check_int(k_max, "k_max", where="choose_bounces: ")
    A = prepare(A, dtype, atol)
    n_tok = A.shape[-1]
    if n_tok == 1:
        return torch.ones(A.shape[:-2], dtype=torch.long, device=A.device)
    kk = min(k_max + 1, n_tok)
    mags = eigenvalues(A, k=kk, atol=atol).abs().to(torch.float64)  # (..., kk), decreasing
    k = _largest_gap(mags, k_max)  # number of slow modes
    lam = mags.gather(-1, k.unsqueeze(-1)).squeeze(-1).clamp(1e-12, 1 - 1e-12)
    n = torch.ceil(math.log(eps) / torch.log(lam)).clamp(1, max_bounces)
    n = torch.where(k == 1, torch.ones_like(n), n)
    return n.long()
