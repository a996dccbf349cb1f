r"""Eigen-analysis of attention chains: :math:`|\lambda_2|`, spectra, λ2 head weighting, metastable states.

For a row-stochastic ``A`` of shape ``(..., N, N)`` the largest eigenvalue is
:math:`\lambda_1 = 1`; the second-largest magnitude :math:`|\lambda_2|` measures how slowly the
chain mixes (:math:`\|v_0 A^n - \pi\| \sim |\lambda_2|^n`). Erel et al. (2025) use it to weight
attention heads: structured heads mix slowly (large :math:`|\lambda_2|`), noisy heads fast.

Markov operations (checks, bounce, TokenRank) live in :mod:`attnchain.chain`.

**References**

- Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
   Chains". NeurIPS 2025, arXiv:2507.17657.
- Saad. "Numerical Methods for Large Eigenvalue Problems", 2nd ed., SIAM 2011 (Arnoldi).
- Deuflhard, Weber. "Robust Perron cluster analysis in conformation dynamics". Linear
   Algebra Appl. 398, 2005 (PCCA+).
- Meila, Shi. "A random walks view of spectral segmentation". AISTATS 2001.
- Shi, Malik. "Normalized cuts and image segmentation". IEEE TPAMI 22(8), 2000.
"""
from __future__ import annotations

from typing import Optional

import torch

from .chain import (ConvergenceError, _as_tensor, _check_rows, _check_square, _prepare,
                    token_rank)

__all__ = ["lambda2", "eigenvalues", "head_weights", "weighted_head_mean", "metastable_states",
           "choose_bounces"]

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


def _arnoldi_lambda2(A3: torch.Tensor, v: torch.Tensor, m_max: int, tol: float,
                     max_restarts: int):
    """Batched Arnoldi for |λ2| on the zero-sum subspace from start vectors v (B, N).

    Returns ``(|λ2| (B,), matvecs)``: ``matvecs`` counts products ``v A_b`` with single
    matrices (a full pass over the batch is ``B`` of them). A matrix whose dominant Ritz pair
    meets the residual rule is frozen: its Ritz value is final and ``A_b`` is not read again.
    """
    B, N = A3.shape[0], A3.shape[-1]
    dt, dev = A3.dtype, A3.device
    m_max = min(m_max, N - 1)
    matvecs = 0
    active = [True] * B  # matrices still iterating (a Python list: the product loop reads it)
    theta_out = torch.zeros(B, dtype=dt, device=dev)
    for _ in range(max_restarts + 1):
        v = v - v.mean(-1, keepdim=True)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        V = A3.new_zeros(B, m_max + 1, N)
        H = A3.new_zeros(B, m_max + 1, m_max)
        V[:, 0] = v
        for j in range(m_max):
            live = [b for b in range(B) if active[b]]
            if len(live) == B:  # one batched pass over A
                w = torch.matmul(V[:, j].unsqueeze(1), A3).squeeze(1)
            else:  # read only the matrices still iterating; frozen ones get w = 0
                w = torch.zeros_like(v)
                for b in live:
                    w[b] = torch.matmul(V[b, j], A3[b])
            matvecs += len(live)
            w = w - w.mean(-1, keepdim=True)  # re-project onto {w : w . 1 = 0}
            Vj = V[:, : j + 1]
            for _ in range(2):  # classical Gram-Schmidt, twice
                h = torch.matmul(Vj, w.unsqueeze(-1)).squeeze(-1)
                w = w - torch.matmul(h.unsqueeze(1), Vj).squeeze(1)
                H[:, : j + 1, j] += h
            hn = w.norm(dim=-1)
            H[:, j + 1, j] = hn
            ok = hn > 1e-12
            V[:, j + 1] = torch.where(ok.unsqueeze(-1), w / hn.clamp_min(1e-30).unsqueeze(-1), 0.0)
            k = j + 1
            if k < min(4, m_max) and bool(ok.all()):
                continue
            Hk = H[:, :k, :k].to(torch.float64)
            ev, vec = torch.linalg.eig(Hk)
            idx = ev.abs().argmax(-1)
            theta = ev.gather(-1, idx[:, None]).squeeze(-1).abs().to(dt)
            y = vec.gather(-1, idx[:, None, None].expand(B, k, 1)).squeeze(-1)  # unit L2 norm
            resid = (hn.to(torch.float64) * y[:, -1].abs()).to(dt)
            resid = torch.where(ok, resid, torch.zeros_like(resid))
            done = (resid <= tol).tolist()
            for b in live:
                if done[b]:
                    active[b] = False
                    theta_out[b] = theta[b]
            if not any(active):
                return theta_out, matvecs
        # explicit restart from the dominant Ritz vector (real and imaginary parts combined)
        z = torch.matmul(y.unsqueeze(1), V[:, :k].to(y.dtype)).squeeze(1)
        v = (z.real + z.imag).to(dt)
    worst = max(resid[b].item() for b in range(B) if active[b])
    raise ConvergenceError(
        f"lambda2(method='krylov') did not converge after {max_restarts} restarts of "
        f"{m_max} Arnoldi steps (Ritz residual {worst:.3g} > tol = {tol:g}); "
        "try method='dense'")


#: On CPU, Krylov runs the matrices in groups of at most this many bytes, one group after
#: the other, so that the ~20 products with a group find it in cache (:func:`lambda2`, Notes).
KRYLOV_GROUP_BYTES = 32 * 2 ** 20


def _krylov_lambda2(A3: torch.Tensor, m_max: int, tol: float, max_restarts: int, atol: float,
                    check: bool, seed: int = 0):
    """:func:`_arnoldi_lambda2` over cache-sized groups of A3 (B, N, N), each checked first
    when ``check``; returns (|λ2| (B,), products with single matrices)."""
    B, N = A3.shape[0], A3.shape[-1]
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(B, N, generator=gen, dtype=torch.float64).to(device=A3.device,
                                                                  dtype=A3.dtype)
    size = A3[0].numel() * A3.element_size()
    g = B if A3.device.type != "cpu" else max(1, KRYLOV_GROUP_BYTES // size)
    thetas, matvecs = [], 0
    for s in range(0, B, g):
        Ag = A3[s:s + g]
        if check:
            try:
                _check_rows(Ag, atol)
            except ValueError:
                _check_rows(A3, atol)  # raise with indices into the whole batch
                raise
        th, mv = _arnoldi_lambda2(Ag, v0[s:s + g], m_max, tol, max_restarts)
        thetas.append(th)
        matvecs += mv
    return torch.cat(thetas), matvecs


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
        :math:`O(N^3)`). ``"krylov"``: batched Arnoldi on the zero-sum subspace (below),
        :math:`O(m N^2)` for ``m`` steps. ``"auto"``: dense for ``N <= AUTO_DENSE_MAX_N``
        (256), Krylov above, falling back to dense if Krylov does not converge (spectra with
        many eigenvalues of nearly the same magnitude, unusual for attention).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    tol : float
        Krylov: a matrix is done when its dominant Ritz pair has residual
        :math:`\|w A - \theta w\|_2 = h_{m+1,m} |e_m^\top y| \le` ``tol`` (unit Ritz vector
        ``w``); its eigenvalue error is then at most :math:`\kappa(\lambda_2)\,` ``tol`` to first
        order (Notes).
    krylov_dim : int
        Krylov: Arnoldi steps per cycle (explicit restarts after that).
    max_restarts : int
        Krylov: restarts before :class:`~attnchain.chain.ConvergenceError` is raised.
    atol : float
        Row-sum tolerance of the input check.
    return_info : bool
        Also return ``{"passes": ..., "matvecs": ...}``: ``matvecs`` counts products ``v A_b``
        with single matrices, ``passes = matvecs / (number of matrices)`` (2 decimals) is the
        data read in units of the whole of ``A`` (0 for dense).

    Returns
    -------
    Tensor, shape (...,)
        :math:`|\lambda_2|` in :math:`[0, 1]`; it is 1 for reducible or periodic chains, and 0
        for ``N = 1``.

    Notes
    -----
    The zero-sum row vectors :math:`S = \{v : v \mathbf 1 = 0\}` are invariant under
    :math:`v \mapsto v A` (because :math:`A \mathbf 1 = \mathbf 1`), and every left eigenvector
    of an eigenvalue :math:`\lambda \ne 1` lies in :math:`S` (from :math:`w A \mathbf 1 = \lambda
    w \mathbf 1`). The restriction of the map to :math:`S` therefore has the spectrum of ``A``
    with one copy of :math:`\lambda_1 = 1` removed, and :math:`|\lambda_2|` is its dominant
    eigenvalue magnitude: Arnoldi [2]_ started in :math:`S` (and re-projected every step against
    rounding) finds it as the dominant Ritz value without deflation. All matrices of a group
    (below) run together with ``bmm``; complex-conjugate pairs are handled by the real Arnoldi
    process.

    **Stopping rule.** For the dominant Ritz pair :math:`(\theta, w)` (:math:`\|w\|_2 = 1`) of
    the Hessenberg matrix after ``m`` steps, the residual :math:`r = w A - \theta w` has norm
    :math:`h_{m+1,m}|e_m^\top y|` (no extra product needed), and :math:`\theta` is an exact
    eigenvalue of :math:`A - w^{\mathsf H} r` (on :math:`S`), a perturbation of norm
    :math:`\|r\|_2`. Hence :math:`|\theta - \lambda_2| \le \kappa(\lambda_2)\|r\|_2 +
    O(\|r\|_2^2)`, with :math:`\kappa = \|x\|\|w_2\| / |w_2 x|` the condition number of the
    eigenvalue (left and right eigenvectors :math:`w_2, x`; Saad [2]_, Ch. 3 and 6). The default
    ``tol = 1e-5`` thus gives :math:`|\lambda_2|` to ``1e-4`` for :math:`\kappa \le 10`; on the
    planted-group attention of ``benchmarks/markov_core.py`` the measured error is
    :math:`\le 2 \cdot 10^{-6}`. Each matrix stops on its own: once its pair meets the rule its Ritz value is final
    and that matrix is not read again (fast-mixing heads stop after ~10 products, slow ones
    after ~20).

    **Memory traffic.** The cost is the products with ``A`` (each reads all of ``A``; the
    Arnoldi bookkeeping is :math:`O(m^2 N)`). On CPU the batch is processed in groups of at
    most ``KRYLOV_GROUP_BYTES`` (32 MiB), one group to convergence before the next, so that the
    repeated products find the group in cache instead of streaming the whole batch from memory
    every step; the input check (row sums, minimum) also runs group by group, just before the
    group's first product. Results do not depend on the grouping (start vectors are drawn for
    the whole batch from a fixed seed). On other devices the whole batch is one group.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025.
    .. [2] Saad, "Numerical Methods for Large Eigenvalue Problems", SIAM 2011.
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
        return (out, {"passes": 0}) if return_info else out
    auto = method == "auto"
    if auto:
        method = "dense" if N <= AUTO_DENSE_MAX_N else "krylov"
    if method == "dense":
        ev = torch.linalg.eigvals(A).abs()
        out = torch.topk(ev, 2, dim=-1).values[..., 1].to(A.dtype)
        out = out.clamp(0, 1)
        return (out, {"passes": 0}) if return_info else out
    if N == 2:  # the zero-sum subspace is one-dimensional: λ2 = A00 + A11 - 1 = trace - 1
        out = (A[..., 0, 0] + A[..., 1, 1] - 1).abs()
        return (out, {"passes": 0}) if return_info else out
    A3 = A.reshape(-1, N, N)
    try:
        theta, matvecs = _krylov_lambda2(A3, krylov_dim, tol, max_restarts, atol, late_check)
    except ConvergenceError:
        if not auto:
            raise
        return lambda2(A, method="dense", return_info=return_info)
    out = theta.reshape(batch).clamp(0, 1)
    info = {"passes": round(matvecs / A3.shape[0], 2), "matvecs": matvecs}
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
    l2 = lambda2(A, method=method)
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
