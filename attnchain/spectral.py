r"""Eigen-analysis of attention chains: :math:`|\lambda_2|`, spectra, λ2 head weighting, metastable states.

For a row-stochastic ``A`` of shape ``(..., N, N)`` the largest eigenvalue is
:math:`\lambda_1 = 1`; the second-largest magnitude :math:`|\lambda_2|` measures how slowly the
chain mixes (:math:`\|v_0 A^n - \pi\| \sim |\lambda_2|^n`). Erel et al. (2025) use it to weight
attention heads: structured heads mix slowly (large :math:`|\lambda_2|`), noisy heads fast.

Markov operations (checks, bounce, TokenRank) live in :mod:`attnchain.chain`.

**References**

- Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
   Chains". NeurIPS 2025, arXiv:2507.17657.
- Saad. "Numerical Methods for Large Eigenvalue Problems", 2nd ed., SIAM 2011 (Arnoldi,
   block Krylov methods, Rayleigh-Ritz).
- Stewart. "A Krylov-Schur algorithm for large eigenproblems". SIAM J. Matrix Anal. Appl.
   23(3), 2001.
- Deuflhard, Weber. "Robust Perron cluster analysis in conformation dynamics". Linear
   Algebra Appl. 398, 2005 (PCCA+).
- Meila, Shi. "A random walks view of spectral segmentation". AISTATS 2001.
- Shi, Malik. "Normalized cuts and image segmentation". IEEE TPAMI 22(8), 2000.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from scipy.linalg import schur

from .chain import (ConvergenceError, _as_tensor, _cache_group, _check_rows, _check_square,
                    _prepare, token_rank)

__all__ = ["lambda2", "eigenvalues", "head_weights", "head_mean", "weighted_head_mean",
           "metastable_states", "choose_bounces", "HEAD_WEIGHTINGS"]

#: ``method="auto"`` uses the dense eigensolver up to this many tokens, Krylov above.
AUTO_DENSE_MAX_N = 256


def _sort_by_magnitude(ev: torch.Tensor) -> torch.Tensor:
    """Sort complex eigenvalues by decreasing |λ|, ties by decreasing real then imaginary part."""
    ev = ev.gather(-1, torch.sort(ev.imag, dim=-1, descending=True, stable=True).indices)
    ev = ev.gather(-1, torch.sort(ev.real, dim=-1, descending=True, stable=True).indices)
    return ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)


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

    Notes
    -----
    Uses ``torch.linalg.eigvals`` (LAPACK ``geev`` on CPU), :math:`O(N^3)` per matrix.
    """
    A = _prepare(A, dtype, atol)
    N = A.shape[-1]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N):
        raise ValueError(f"k must be an int in [1, N = {N}], got {k!r}")
    ev = _sort_by_magnitude(torch.linalg.eigvals(A))
    return ev if k is None else ev[..., :k]


#: Block size of the Krylov iteration. A product of ``A`` with up to three vectors costs
#: about one matrix-vector product on CPU (it is limited by reading ``A``; see
#: ``benchmarks/markov_core.py``), so each pass over ``A`` adds three directions, not one.
KRYLOV_BLOCK = 3


def _zero_mean_rows(b: int, N: int, seed: int, like: torch.Tensor):
    """(1, b, N) random rows with zero mean from ``seed``, drawn on CPU (device independent)."""
    x = torch.randn(1, b, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (x - x.mean(-1, keepdim=True)).to(device=like.device, dtype=like.dtype)


def _orthogonalize(W: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """Rows of ``W`` minus their mean and their part in the span of the orthonormal rows of
    ``K`` (classical Gram-Schmidt, twice)."""
    for _ in range(2):
        W = W - W.mean(-1, keepdim=True)
        if K.shape[-2]:
            W = W - (W @ K.mT) @ K
    return W


def _extend_basis(W: torch.Tensor, K: torch.Tensor, room: int):
    """Orthonormal zero-mean rows, orthogonal to ``K`` (B, m, N), spanning the new part of the
    first ``room`` rows of ``W`` (B, b, N); returns them with all rows of ``W`` made
    orthogonal to ``K``. A row with nothing new (zero up to rounding) is replaced by a random
    direction: Rayleigh-Ritz needs an orthonormal basis, not the Krylov recurrence, so any
    new direction is valid. The random rows depend only on the position in the basis, so
    results do not depend on how matrices are batched."""
    scale = W.norm(dim=-1)
    W = _orthogonalize(W, K)
    V, scale = W[:, :room], scale[:, :room]
    if not V.shape[-2]:
        return V, W
    norm = V.norm(dim=-1)
    lost = norm <= 64 * torch.finfo(V.dtype).eps * scale
    if bool(lost.any()):
        fresh = _zero_mean_rows(V.shape[1], V.shape[2], 7919 * (K.shape[-2] + 1), V)
        V = torch.where(lost.unsqueeze(-1), _orthogonalize(fresh, K), V)
        norm = V.norm(dim=-1)
    Q, R = torch.linalg.qr(V.mT)
    if bool((R.diagonal(dim1=-2, dim2=-1).abs() < 1e-2 * norm).any()):
        # rows nearly dependent on each other: their QR directions lean on rounding errors,
        # which may have parts along K; project once more
        Q = torch.linalg.qr(_orthogonalize(Q.mT, K).mT).Q
    return Q.mT, W


def _ritz(T: torch.Tensor, C: torch.Tensor):
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
    ev = torch.linalg.eigvals(T)
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


def _leading_schur_rows(T: torch.Tensor, ev: torch.Tensor, keep: int) -> torch.Tensor:
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


def _block_krylov_lambda2(A3: torch.Tensor, K: torch.Tensor, AK: torch.Tensor,
                          W: torch.Tensor, max_dim: int, tol: float, max_restarts: int):
    """|λ2| of each matrix of A3 (B, N, N) by thick-restarted block Krylov iteration with
    Rayleigh-Ritz on zero-mean vectors (:func:`lambda2`, Notes).

    Starts from orthonormal zero-mean rows ``K`` (B, m, N), their products ``AK`` (rows
    :math:`(P A k)^T`) and the rows ``W`` (B, b, N) the next block is made from: the
    products ``AK`` first, then any extra start rows. Returns ``(|λ2| (B,), products)``:
    ``products`` counts products of single matrices with a block of vectors (each reads the
    matrix once). A matrix whose dominant Ritz pair meets the residual rule is frozen: its
    Ritz value is final and it is not read again.
    """
    B, N = A3.shape[0], A3.shape[-1]
    max_dim = max(2 * W.shape[-2], min(max_dim, N - 1))  # zero-mean vectors: N - 1 dimensions
    keep = max_dim // 2
    live = list(range(B))  # K, AK and W hold the rows of these matrices only
    theta_out = A3.new_zeros(B)
    new = AK.shape[-2]  # the newest products: the first rows of W, of the last rows of K
    products = restarts = 0
    while True:
        m = K.shape[-2]
        nxt, Wp = _extend_basis(W, K, N - 1 - m)  # the next block, orthogonal to K
        T = (K @ AK.mT).to(torch.float64)
        ev, theta, resid = _ritz(T, Wp[:, :new] @ nxt.mT)
        done = resid <= tol
        if bool(done.any()):
            for j in done.nonzero()[:, 0].tolist():
                theta_out[live[j]] = theta[j].abs()
            go = ~done
            live = [i for i, g in zip(live, go.tolist()) if g]
            if not live:
                return theta_out, products
            K, AK, nxt, T, ev, resid = K[go], AK[go], nxt[go], T[go], ev[go], resid[go]
        if m + nxt.shape[-2] > max_dim:  # thick restart: keep the leading Ritz vectors
            if restarts == max_restarts:
                raise ConvergenceError(
                    f"lambda2(method='krylov') did not converge after {max_restarts} restarts "
                    f"of {max_dim}-dimensional block Krylov spaces (Ritz residual "
                    f"{resid.max().item():.3g} > tol = {tol:g}); try method='dense'")
            restarts += 1
            ev = ev.gather(-1, torch.sort(ev.abs(), dim=-1, descending=True, stable=True).indices)
            C = _leading_schur_rows(T, ev, keep).to(K.dtype)  # K -> C K, P A K -> C (P A K)
            K, AK = C @ K, C @ AK
        if len(live) == B:  # one batched pass; (A x)^T = x^T A^T for the rows x of `nxt`
            W = nxt @ A3.mT
        else:  # read only the matrices still iterating
            W = torch.stack([x @ A3[i].mT for x, i in zip(nxt, live)])
        products += len(live)
        W = W - W.mean(-1, keepdim=True)
        K, AK, new = torch.cat([K, nxt], -2), torch.cat([AK, W], -2), W.shape[-2]


#: On CPU, Krylov runs the matrices in groups of at most this many bytes, one group after
#: the other, so that the ~10 passes over a group find it in cache (:func:`lambda2`, Notes).
KRYLOV_GROUP_BYTES = 32 * 2 ** 20


def _krylov_lambda2(A3: torch.Tensor, max_dim: int, tol: float, max_restarts: int, atol: float,
                    check: bool, seed: int = 0):
    """:func:`_block_krylov_lambda2` over cache-sized groups of A3 (B, N, N); returns
    (|λ2| (B,), products of single matrices with a block of vectors).

    The first product of a group multiplies all-ones besides its first ``KRYLOV_BLOCK - 1``
    start vectors: it yields the row sums, so that the input check (when ``check``) costs
    only one more pass (the minimum) instead of two."""
    B, N = A3.shape[0], A3.shape[-1]
    b = min(KRYLOV_BLOCK, N - 1)
    start = _extend_basis(_zero_mean_rows(b, N, seed, A3), A3[:1, :0], b)[0]  # same for all
    ones = torch.ones_like(start[:, :1])
    g = _cache_group(A3, KRYLOV_GROUP_BYTES)
    thetas, products = [], 0
    for s in range(0, B, g):
        Ag = A3[s:s + g]
        K = start[:, : max(1, b - 1)].expand(len(Ag), -1, N)
        X = torch.cat([K, ones.expand(len(Ag), 1, N)], -2)
        W = X @ Ag.mT
        if check:
            try:
                _check_rows(Ag, atol, rows=W[:, -1])
            except ValueError:
                _check_rows(A3, atol)  # raise with indices into the whole batch
                raise
        AK = W[:, :-1] - W[:, :-1].mean(-1, keepdim=True)
        spare = start[:, K.shape[-2]:].expand(len(Ag), -1, N)  # completes the next block
        th, n = _block_krylov_lambda2(Ag, K, AK, torch.cat([AK, spare], -2), max_dim, tol,
                                      max_restarts)
        thetas.append(th)
        products += n + len(Ag)
    return torch.cat(thetas), products


def lambda2(A, method: str = "auto", dtype: Optional[torch.dtype] = None, tol: float = 1e-5,
            krylov_dim: int = 40, max_restarts: int = 20, atol: float = 1e-4,
            return_info: bool = False) -> torch.Tensor:
    r"""Second-largest eigenvalue magnitude :math:`|\lambda_2|` of row-stochastic matrices.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    method : {"auto", "dense", "krylov"}
        ``"dense"``: all eigenvalues by ``torch.linalg.eigvals`` (exact up to rounding,
        :math:`O(N^3)`). ``"krylov"``: batched block Krylov iteration on the zero-mean
        vectors (Notes), :math:`O(p N^2)` for ``p`` passes over ``A``. ``"auto"``: dense for
        ``N <= AUTO_DENSE_MAX_N`` (256), Krylov above, falling back to dense if Krylov does not
        converge (spectra with many eigenvalues of nearly the same magnitude, unusual for
        attention).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    tol : float
        Krylov: a matrix is done when its dominant Ritz pair :math:`(\theta, z)` has residual
        :math:`\|P A z - \theta z\|_2 \le` ``tol`` (unit ``z``); the eigenvalue error is then
        at most :math:`\kappa(\lambda_2)\,` ``tol`` to first order (Notes).
    krylov_dim : int
        Krylov: largest basis size; above it the basis is cut back to the Schur vectors of its
        ``krylov_dim // 2`` leading Ritz values (a thick restart).
    max_restarts : int
        Krylov: restarts before :class:`~attnchain.chain.ConvergenceError` is raised.
    atol : float
        Row-sum tolerance of the input check.
    return_info : bool
        Also return ``{"passes": ..., "products": ...}``: ``products`` counts products of
        single matrices with a block of vectors (each reads that matrix once), ``passes =
        products / (number of matrices)`` (2 decimals) is the data read in units of the whole
        of ``A``, besides the input check's pass for the minimum (0 for dense).

    Returns
    -------
    Tensor, shape (...,)
        :math:`|\lambda_2|` in :math:`[0, 1]`; it is 1 for reducible or periodic chains, and 0
        for ``N = 1``.

    Notes
    -----
    **The operator.** With :math:`P = I - \mathbf 1 \mathbf 1^\top / N` (removing the mean of
    a vector), :math:`AP = A - \mathbf 1 \mathbf 1^\top / N` has the spectrum of ``A`` with
    :math:`\lambda_1 = 1` replaced by 0 (Brauer's theorem, because :math:`A\mathbf 1 =
    \mathbf 1`), and :math:`PAP = P(AP)` has the same nonzero eigenvalues as :math:`(AP)P =
    AP`. On the zero-mean vectors :math:`PAP` acts as :math:`x \mapsto P A x`, so
    :math:`|\lambda_2|` is the largest eigenvalue magnitude of that map: no deflation of
    :math:`\lambda_1` is needed, only the mean removed after every product.

    **The iteration.** Block Krylov with Rayleigh-Ritz (Saad [2]_, Ch. 6): the basis grows by
    ``KRYLOV_BLOCK`` (3) orthonormal zero-mean vectors per pass, made from the newest
    products; the projected matrix :math:`T = K (P A K)^\top` of the orthonormal basis rows
    :math:`K` gives the Ritz values, and the dominant one is the estimate. Three vectors per
    pass, not one, because on CPU a product with up to three vectors costs what a
    matrix-vector product costs (both read ``A`` once), and more directions per pass mean
    fewer passes (about 10 instead of 16 on the attention of ``benchmarks/markov_core.py``).
    Past ``krylov_dim`` the basis is cut back to the Schur vectors of its leading Ritz values,
    an invariant subspace of :math:`T`, so the iteration continues as if it had not been
    interrupted (Krylov-Schur, Stewart [3]_). Complex-conjugate pairs are handled in real
    arithmetic.

    **Stopping rule.** For the dominant Ritz pair :math:`(\theta, z)`, :math:`\|z\|_2 = 1`,
    the residual :math:`r = P A z - \theta z` needs no extra product: every product but the
    newest block lies in the span of the basis, so :math:`r` is the newest products' part
    outside it, which is what the next block is made from, and :math:`\|r\|_2` follows from
    their coefficients along that block (a :math:`b \times b` computation). :math:`\theta` is
    an exact eigenvalue of :math:`PAP - r z^{\mathsf H}`, a perturbation of norm
    :math:`\|r\|_2`. Hence :math:`|\theta - \lambda_2| \le
    \kappa(\lambda_2)\|r\|_2 + O(\|r\|_2^2)`, with :math:`\kappa` the condition number of
    the eigenvalue (Saad [2]_, Ch. 3). The default ``tol = 1e-5`` thus gives
    :math:`|\lambda_2|` to ``1e-4`` for :math:`\kappa \le 10`; on the planted-group attention
    of ``benchmarks/markov_core.py`` the measured error is :math:`\le 2 \cdot 10^{-6}`. Each
    matrix stops on its own: once its pair meets the rule its Ritz value is final and that
    matrix is not read again.

    **Memory traffic.** The cost is the passes over ``A``; the bookkeeping is
    :math:`O(m^2 N)` for a basis of size ``m``. On CPU the batch is processed in groups of at
    most ``KRYLOV_GROUP_BYTES`` (32 MiB), one group to convergence before the next, so that the
    repeated products find the group in cache instead of streaming the whole batch from memory
    every step. The first product of a group also multiplies the all-ones vector, which gives
    the row sums for the input check; the check's other pass (the minimum) follows at once,
    before anything is computed from the products.
    Results do not depend on the grouping: every matrix starts from the same vectors, drawn
    from a fixed seed. On other devices the whole batch is one group.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025.
    .. [2] Saad, "Numerical Methods for Large Eigenvalue Problems", SIAM 2011.
    .. [3] Stewart, "A Krylov-Schur algorithm for large eigenproblems", SIAM J. Matrix Anal.
       Appl. 23(3), 2001.
    """
    if method not in ("auto", "dense", "krylov"):
        raise ValueError(f"method must be 'auto', 'dense' or 'krylov', got {method!r}")
    A = _as_tensor(A, "A")
    N = _check_square(A)
    # Krylov checks each cache-sized group of matrices just before iterating on it (Notes);
    # every other path, and half-precision input, is checked here
    late_check = (method == "krylov" or (method == "auto" and N > AUTO_DENSE_MAX_N)) and N > 2 \
        and A.dtype in (torch.float32, torch.float64)
    A = _prepare(A, dtype, atol, check=not late_check)
    batch = A.shape[:-2]
    if N == 1:
        out = A.new_zeros(batch)
        return (out, {"passes": 0, "products": 0}) if return_info else out
    auto = method == "auto"
    if auto:
        method = "dense" if N <= AUTO_DENSE_MAX_N else "krylov"
    if method == "dense":
        ev = torch.linalg.eigvals(A).abs()
        out = torch.topk(ev, 2, dim=-1).values[..., 1].to(A.dtype)
        out = out.clamp(0, 1)
        return (out, {"passes": 0, "products": 0}) if return_info else out
    if N == 2:  # the zero-sum subspace is one-dimensional: λ2 = A00 + A11 - 1 = trace - 1
        out = (A[..., 0, 0] + A[..., 1, 1] - 1).abs()
        return (out, {"passes": 0, "products": 0}) if return_info else out
    A3 = A.reshape(-1, N, N)
    try:
        theta, products = _krylov_lambda2(A3, krylov_dim, tol, max_restarts, atol, late_check)
    except ConvergenceError:
        if not auto:
            raise
        return lambda2(A, method="dense", return_info=return_info)
    out = theta.reshape(batch).clamp(0, 1)
    info = {"passes": round(products / A3.shape[0], 2), "products": products}
    return (out, info) if return_info else out


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
    return d


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

    Notes
    -----
    Erel et al. (2025) weight heads by :math:`|\lambda_2|`: a head whose chain mixes slowly
    keeps structure (metastable token groups); one that mixes fast is close to uniform noise.
    """
    A = _prepare(A, dtype)
    d = _head_axis(A, head_dim)
    return _normalised_weights(lambda2(A, method=method), d)


#: The head weightings of :func:`head_mean` (one vocabulary across package, chapters and book).
HEAD_WEIGHTINGS = ("uniform", "lambda2")


def head_mean(A, weighting: str = "uniform", head_dim: int = -3, method: str = "auto",
              dtype: Optional[torch.dtype] = None, lam2=None) -> torch.Tensor:
    r"""Average of attention heads: uniform, or weighted by :math:`|\lambda_2|`.

    Parameters
    ----------
    A : Tensor, shape (..., H, ..., N, N)
        Row-stochastic attention with a head dimension at ``head_dim``.
    weighting : {"uniform", "lambda2"}
        ``"uniform"``: :math:`\frac1H \sum_h A^{(h)}`. ``"lambda2"``: :math:`\sum_h w_h A^{(h)}`
        with the weights of :func:`head_weights`.
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
    """
    if weighting not in HEAD_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {HEAD_WEIGHTINGS}, got {weighting!r}")
    A = _prepare(A, dtype)
    d = _head_axis(A, head_dim)
    if weighting == "uniform":
        return A.mean(d)
    if lam2 is None:
        w = head_weights(A, head_dim=head_dim, method=method)
    else:
        w = _normalised_weights(torch.as_tensor(lam2).to(device=A.device, dtype=A.dtype), d)
    return (A * w[..., None, None]).sum(d)


def _normalised_weights(l2: torch.Tensor, d: int) -> torch.Tensor:
    s = l2.sum(d, keepdim=True)
    uniform = torch.full_like(l2, 1.0 / l2.shape[d])
    return torch.where(s > 0, l2 / torch.where(s > 0, s, torch.ones_like(s)), uniform)


def weighted_head_mean(A, head_dim: int = -3, method: str = "auto",
                       dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""λ2-weighted average of attention heads, :math:`\sum_h w_h A^{(h)}`.

    Parameters
    ----------
    A : Tensor, shape (..., H, ..., N, N)
        Row-stochastic attention with a head dimension at ``head_dim``.
    head_dim : int
        Dimension of ``A`` holding the heads (default ``-3``).
    method : {"auto", "dense", "krylov"}
        How :func:`lambda2` is computed.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    Tensor, shape of ``A`` without ``head_dim``
        A convex combination of row-stochastic matrices, hence row-stochastic; weights from
        :func:`head_weights`.
    """
    A = _prepare(A, dtype)
    d = _head_axis(A, head_dim)
    w = head_weights(A, head_dim=head_dim, method=method)
    return (A * w[..., None, None]).sum(d)


def _inner_simplex(X: torch.Tensor) -> torch.Tensor:
    """Indices of k rows of X (N, k) spanning the (near-)simplex of PCCA+ (Deuflhard & Weber, 2005) (greedy)."""
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


def metastable_states(A, k: Optional[int] = None, k_max: int = 10, alpha: float = 0.99,
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
        Largest ``k`` considered when ``k`` is ``None``.
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

    Notes
    -----
    1. :math:`\pi` = :func:`~attnchain.chain.token_rank` of ``A`` (float64),
       :math:`D = \mathrm{diag}(\pi)`.
    2. Additive reversibilisation :math:`W = (D A + A^\top D)/2`, symmetric, and the normalised
       :math:`L = D^{-1/2} W D^{-1/2}` with eigenvalues :math:`1 = \mu_1 \ge \mu_2 \ge \dots`.
       :math:`D^{-1} W` is a reversible chain with the same stationary law; eigenvalues near 1
       mean sets the chain rarely leaves (Meila & Shi (2001); normalised cuts, Shi & Malik (2000)).
    3. :math:`X = D^{-1/2} U_{:, :k}` (right eigenvectors, first column constant). For a nearly
       decomposable chain the rows of ``X`` cluster at the ``k`` vertices of a simplex; PCCA+'s
       inner-simplex algorithm (Deuflhard & Weber, 2005) picks ``k`` vertex rows greedily,
       memberships are :math:`\chi = X X_{\mathrm{vert}}^{-1}` and each token takes the group of
       its largest membership.

    Dense :math:`O(N^3)` (``torch.linalg.eigh`` in float64) per matrix.
    """
    A = _prepare(A, torch.float64, atol)
    N = A.shape[-1]
    batch = A.shape[:-2]
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N):
        raise ValueError(f"k must be an int in [1, N = {N}], got {k!r}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"k_max must be a positive int, got {k_max!r}")
    A = A / A.sum(-1, keepdim=True)  # exact row sums in float64 for float32 input
    pi = token_rank(A, alpha=alpha, tol=1e-10, dtype=torch.float64, check=False)
    s = pi.sqrt()
    W = 0.5 * (pi.unsqueeze(-1) * A + (pi.unsqueeze(-1) * A).transpose(-1, -2))
    L = W / s.unsqueeze(-1) / s.unsqueeze(-2)
    mu, U = torch.linalg.eigh(L)
    mu, U = mu.flip(-1), U.flip(-1)
    X = U / s.unsqueeze(-1)
    if k is None:
        kk = min(k_max, N - 1)
        if kk < 1:
            ks = torch.ones(batch, dtype=torch.long, device=A.device)
        else:
            gaps = mu[..., :kk] - mu[..., 1 : kk + 1]
            ks = gaps.argmax(-1) + 1
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


def choose_bounces(A, eps: float = 0.1, max_n: int = 10, k_max: int = 16,
                   dtype: Optional[torch.dtype] = None, atol: float = 1e-4) -> torch.Tensor:
    r"""A spectral rule for the number of bounces ``n`` of multi-bounce attention, per matrix.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    eps : float in (0, 1)
        How far the fast (within-state) modes must have decayed.
    max_n : int >= 1
        Upper clamp; the result lies in ``[1, max_n]``.
    k_max : int >= 1
        Largest number of metastable states considered.
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
        Invalid ``A`` (see :func:`attnchain.chain.check_stochastic`), ``eps`` outside (0, 1),
        ``max_n < 1`` or ``k_max < 1``.

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
    (Simon & Ando). The rule is this book's, not the paper's; the paper finds ``n = 2`` best for
    segmentation (Erel et al.), and Chapter 3 tests the rule on planted chains and scenes.
    Dense :math:`O(N^3)` per matrix (:func:`eigenvalues`).

    References
    ----------
    Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
    Chains". NeurIPS 2025, arXiv:2507.17657.

    Simon, Ando. "Aggregation of variables in dynamic systems". Econometrica 29(2), 1961.
    """
    import math

    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
        raise ValueError(f"choose_bounces: eps must lie in (0, 1), got {eps!r}")
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"choose_bounces: max_n must be an int >= 1, got {max_n!r}")
    if isinstance(k_max, bool) or not isinstance(k_max, int) or k_max < 1:
        raise ValueError(f"choose_bounces: k_max must be an int >= 1, got {k_max!r}")
    A = _prepare(A, dtype, atol)
    n_tok = A.shape[-1]
    if n_tok == 1:
        return torch.ones(A.shape[:-2], dtype=torch.long, device=A.device)
    kk = min(k_max + 1, n_tok)
    mags = eigenvalues(A, k=kk, atol=atol).abs().to(torch.float64)  # (..., kk), decreasing
    gaps = mags[..., :-1] - mags[..., 1:]
    k = gaps.argmax(-1) + 1  # number of slow modes
    lam = mags.gather(-1, k.unsqueeze(-1)).squeeze(-1).clamp(1e-12, 1 - 1e-12)
    n = torch.ceil(math.log(eps) / torch.log(lam)).clamp(1, max_n)
    n = torch.where(k == 1, torch.ones_like(n), n)
    return n.long()
