r"""Dense Markov-chain operations on attention matrices.

An attention matrix ``A`` of shape ``(..., N, N)`` (rows = queries, columns = keys, every row a
probability distribution) is the transition matrix of a discrete-time Markov chain over the
``N`` tokens (Erel et al., 2025). Distributions are **row vectors**: one step of the chain maps ``v`` to ``v A``.

This module holds the Markov operations: validating and building chains (:func:`check_stochastic`,
:func:`to_stochastic`), multi-bounce propagation (:func:`bounce`, :func:`source_chain`), and the
stationary distribution of the PageRank-damped chain, *TokenRank* (:func:`damped`,
:func:`token_rank`, its float64 reference :func:`stationary_dense`). Eigen-analysis lives in
:mod:`attnchain.spectral`.

Every function is batched over leading dimensions, keeps the input's device, computes in float32
by default (float64 on request through ``dtype=``, and for float64 input) and rejects bad input
with a :class:`ValueError` that names the problem. float16/bfloat16 inputs are upcast, checked with
``atol`` raised to the input type's machine epsilon (rounding to half precision moves row sums by
up to half of it) and their rows renormalised after the upcast.

**References**

- Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
   Chains". NeurIPS 2025, arXiv:2507.17657.
- Page, Brin, Motwani, Winograd. "The PageRank Citation Ranking: Bringing Order to the Web".
   Stanford InfoLab technical report, 1999.
- Saad, Schultz. "GMRES: A generalized minimal residual algorithm for solving nonsymmetric
   linear systems". SIAM J. Sci. Stat. Comput. 7(3), 1986.
- Levin, Peres, Wilmer. "Markov Chains and Mixing Times", 2nd ed., AMS 2017 (lazy chains,
   closed classes and uniqueness of the stationary distribution).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "ConvergenceError",
    "ReducibleChainError",
    "check_stochastic",
    "to_stochastic",
    "restrict",
    "source_chain",
    "bounce",
    "damped",
    "token_rank",
    "stationary_dense",
    "planted_chain",
    "bipartite_chain",
    "rollout",
]


class ConvergenceError(RuntimeError):
    """An iterative method did not reach its tolerance within its iteration budget.

    Raised by :func:`token_rank` and :func:`attnchain.spectral.lambda2` instead of returning an
    unconverged answer. Subclass of :class:`RuntimeError`.
    """


class ReducibleChainError(ValueError):
    """The chain has more than one closed class, so its stationary distribution is not unique.

    Raised for ``alpha=1`` (no damping) by :func:`token_rank` and :func:`stationary_dense`.
    Subclass of :class:`ValueError`; damping (``alpha < 1``) always makes the answer unique.
    """


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - message only
        raise ValueError(f"{name} must be a tensor or array-like, got {type(x).__name__}") from exc


def _compute_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """float32 by default, float64 if the input is float64 or it is asked for; halves upcast."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check_square(A: torch.Tensor, name: str = "A") -> int:
    if A.is_complex():
        raise ValueError(f"{name} must be real, got dtype {A.dtype}")
    if A.dtype == torch.bool:
        raise ValueError(f"{name} must be a real floating tensor, got dtype {A.dtype}")
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims (..., N, N), got shape "
                         f"{tuple(A.shape)}")
    if A.shape[-1] == 0:
        raise ValueError(f"{name} is empty: N = 0 tokens")
    return A.shape[-1]


def _prepare(A, dtype=None, atol: float = 1e-4, check: bool = True, name: str = "A"):
    A = _as_tensor(A, name)
    _check_square(A, name)
    low = A.dtype in (torch.float16, torch.bfloat16)
    if low:  # rounding to half precision moves row sums by up to eps / 2
        atol = max(atol, torch.finfo(A.dtype).eps)
    A = A.to(_compute_dtype(A, dtype))
    if check:
        _check_rows(A, atol, name)
    if low:
        A = A / A.sum(-1, keepdim=True)
    return A


def _cache_group(A3: torch.Tensor, group_bytes: int) -> int:
    """How many matrices of ``A3`` (B, N, N) to iterate on together: on CPU as many as fit in
    ``group_bytes`` (at least one), so that repeated passes over a group find it in cache; on
    other devices the whole batch."""
    if A3.device.type != "cpu":
        return A3.shape[0]
    return max(1, group_bytes // (A3[0].numel() * A3.element_size()))


def _first_bad(mask: torch.Tensor):
    """Index (tuple) of the first True entry of a bool tensor."""
    idx = torch.nonzero(mask)[0].tolist()
    return tuple(idx)


# ----------------------------------------------------------------------------------------------
# building and checking chains
# ----------------------------------------------------------------------------------------------
def check_stochastic(A, atol: float = 1e-4) -> None:
    r"""Check that ``A`` is a batch of row-stochastic matrices; raise ``ValueError`` if not.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Candidate transition matrices (rows = from-token, columns = to-token).
    atol : float
        Largest accepted deviation :math:`|\sum_j A_{ij} - 1|` of a row sum from one. For
        float16/bfloat16 input it is raised to that type's machine epsilon.

    Raises
    ------
    ValueError
        With a message naming the first problem found: not square, empty, non-real dtype,
        NaN or Inf entries, negative entries, zero rows, rows not summing to one within ``atol``.

    Notes
    -----
    A (row-)stochastic matrix has :math:`A_{ij} \ge 0` and :math:`\sum_j A_{ij} = 1`; it is the
    transition matrix of a Markov chain with :math:`P(X_{t+1}=j \mid X_t=i) = A_{ij}`.
    The check costs two passes over ``A`` (row sums, minimum): a finite row sum proves the row
    has no NaN or Inf.
    """
    A = _as_tensor(A, "A")
    _check_square(A)
    _check_rows(A, atol)


def _check_rows(A: torch.Tensor, atol: float, name: str = "A",
                rows: Optional[torch.Tensor] = None) -> None:
    """The row checks of :func:`check_stochastic` for ``(..., M, N)`` (square or not);
    ``rows``: the row sums, when a caller already has them (from a product with ones)."""
    if A.dtype in (torch.float16, torch.bfloat16):
        atol = max(atol, torch.finfo(A.dtype).eps)
    if not A.is_floating_point():
        A = A.to(torch.float64)
    if rows is None:
        rows = A.sum(-1, dtype=torch.float64 if A.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(rows).all():
        bad = ~torch.isfinite(A)
        if bad.any():
            raise ValueError(f"{name} contains NaN or Inf entries (first at index "
                             f"{_first_bad(bad)})")
        raise ValueError(f"{name} has rows whose sum overflows to Inf")
    amin = A.amin()
    if amin < 0:
        raise ValueError(f"{name} has negative entries (min {amin.item():.3g}, first at index "
                         f"{_first_bad(A < 0)}); a transition matrix must be non-negative")
    zero = rows == 0
    if zero.any():
        raise ValueError(f"{name} has zero rows (first at batch/row index {_first_bad(zero)}): "
                         "every row must be a probability distribution")
    dev = (rows - 1).abs()
    if (dev > atol).any():
        worst = dev.max().item()
        raise ValueError(f"{name} has rows not summing to 1 (max |row sum - 1| = {worst:.3g} > "
                         f"atol = {atol:g}, first at batch/row index {_first_bad(dev > atol)}); "
                         "use to_stochastic(x, kind='weights') to normalise")


def to_stochastic(x, kind: str = "logits", mask=None, dtype: Optional[torch.dtype] = None
                  ) -> torch.Tensor:
    r"""Build row-stochastic matrices from attention logits or non-negative weights.

    Parameters
    ----------
    x : Tensor, shape (..., N, N)
        Attention logits :math:`q_i \cdot k_j / \sqrt{d}` (``kind="logits"``; ``-inf`` entries
        are allowed and mean "masked") or non-negative weights (``kind="weights"``).
    kind : {"logits", "weights"}
        ``"logits"``: :math:`A_{ij} = \exp(x_{ij}) / \sum_k \exp(x_{ik})` (softmax over keys).
        ``"weights"``: :math:`A_{ij} = x_{ij} / \sum_k x_{ik}` (row normalisation).
    mask : bool Tensor, broadcastable to (..., N, N), optional
        ``True`` keeps key ``j`` for query ``i``; ``False`` removes it (its probability is 0).
        A 1-D mask of shape ``(N,)`` masks keys for every query.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    Tensor, shape (..., N, N)
        Row-stochastic matrices, on ``x``'s device.

    Raises
    ------
    ValueError
        Unknown ``kind``, non-square ``x``, NaN (or ``+inf``) entries, negative weights, a mask
        that is not boolean or not broadcastable, or a row left with no mass (all keys masked,
        all weights zero).
    """
    if kind not in ("logits", "weights"):
        raise ValueError(f"kind must be 'logits' or 'weights', got {kind!r}")
    x = _as_tensor(x, "x")
    _check_square(x, "x")
    x = x.to(_compute_dtype(x, dtype))
    if torch.isnan(x).any():
        raise ValueError(f"x contains NaN entries (first at index {_first_bad(torch.isnan(x))})")
    if mask is not None:
        mask = _as_tensor(mask, "mask").to(x.device)
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = keep key), got {mask.dtype}")
        try:
            torch.broadcast_shapes(mask.shape, x.shape)
        except RuntimeError as exc:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of "
                             f"shape {tuple(x.shape)}") from exc
    if kind == "logits":
        if torch.isposinf(x).any():
            raise ValueError("x contains +inf logits; softmax is undefined")
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        empty = torch.isneginf(x).all(-1)
        if empty.any():
            raise ValueError(f"every key is masked for some query (first at batch/row index "
                             f"{_first_bad(empty)}): the row has no probability mass")
        return torch.softmax(x, dim=-1)
    # weights
    if torch.isinf(x).any():
        raise ValueError(f"x contains Inf weights (first at index {_first_bad(torch.isinf(x))})")
    if (x < 0).any():
        raise ValueError(f"x has negative weights (first at index {_first_bad(x < 0)}); "
                         "weights must be non-negative (use kind='logits' for logits)")
    if mask is not None:
        x = x.masked_fill(~mask, 0.0)
    s = x.sum(-1, keepdim=True)
    if (s == 0).any():
        raise ValueError(f"x has zero rows after masking (first at batch/row index "
                         f"{_first_bad(s[..., 0] == 0)}): the row has no probability mass")
    return x / s


def restrict(A, tokens, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    r"""The chain restricted to a subset of tokens, its rows renormalised.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Non-negative weights or a row-stochastic chain.
    tokens : sequence of int, LongTensor or bool Tensor of shape (N,)
        The tokens to keep (in that order), or a keep-mask.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.

    Returns
    -------
    Tensor, shape (..., M, M)
        :math:`A_{ij} / \sum_{l \in T} A_{il}` for :math:`i, j \in T`: the walk that is
        conditioned to stay on the kept tokens for one step (the "image tokens only" chain).

    Raises
    ------
    ValueError
        Non-square ``A``, an empty or out-of-range token set, NaN or negative entries, or a kept
        row with no mass on the kept tokens.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [0.0, 0.5, 0.5]])
    >>> restrict(A, [1, 2])
    tensor([[0.5000, 0.5000],
            [0.5000, 0.5000]])

    See Also
    --------
    to_stochastic : the row normalisation used here.
    """
    A = _as_tensor(A, "A")
    N = _check_square(A)
    idx = _as_tensor(tokens, "tokens")
    if idx.dtype == torch.bool:
        if idx.shape != (N,):
            raise ValueError(f"a boolean token mask must have shape ({N},), got {tuple(idx.shape)}")
        idx = torch.nonzero(idx)[:, 0]
    idx = idx.reshape(-1).long()
    if idx.numel() == 0:
        raise ValueError("restrict: no tokens to keep")
    if bool(((idx < -N) | (idx >= N)).any()):
        raise ValueError(f"restrict: token index out of range for N = {N} tokens")
    idx = idx.to(A.device)
    sub = A.index_select(-2, idx).index_select(-1, idx)
    return to_stochastic(sub, kind="weights", dtype=dtype)


def source_chain(A, dtype: Optional[torch.dtype] = None, atol: float = 1e-4) -> torch.Tensor:
    r"""The row-stochastic transposed ("source") chain: column-normalised :math:`A^\top`.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention (rows = queries, columns = keys).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    S : Tensor, shape (..., N, N)
        :math:`S_{ji} = A_{ij} / \sum_k A_{kj}`. From token ``j`` the source chain steps to the
        queries that attend to ``j``, in proportion to how much they attend to it:
        ``e_j S`` is column ``j`` of ``A`` normalised ("who attends to j").

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`check_stochastic`), or a key column that no query attends to
        (its column sum is 0, so the source chain has no step out of that token).
    """
    A = _prepare(A, dtype, atol)
    col = A.sum(-2)  # (..., N)
    if (col == 0).any():
        raise ValueError(f"A has zero columns (first at batch/column index "
                         f"{_first_bad(col == 0)}): no query attends to that key, so the "
                         "source chain is undefined there")
    return (A / col.unsqueeze(-2)).transpose(-1, -2)


def _start_distribution(start, N: int, dtype, device, atol: float) -> torch.Tensor:
    """Turn an int / index tensor / one-hot / distribution into (..., N) row vectors."""
    if isinstance(start, bool):
        raise ValueError("start must be a token index, a one-hot or a distribution, not a bool")
    if isinstance(start, int):
        if not -N <= start < N:
            raise ValueError(f"start index {start} out of range for N = {N} tokens")
        v = torch.zeros(N, dtype=dtype, device=device)
        v[start] = 1.0
        return v
    s = _as_tensor(start, "start").to(device)
    if s.dtype == torch.bool or s.is_complex():
        raise ValueError(f"start must be integer indices or a real distribution, got {s.dtype}")
    if not s.is_floating_point():  # integer index tensor (...,) -> one-hot (..., N)
        if ((s < -N) | (s >= N)).any():
            raise ValueError(f"start indices out of range for N = {N} tokens")
        return torch.nn.functional.one_hot(s.long() % N, N).to(dtype)
    s = s.to(dtype)
    if s.ndim == 0 or s.shape[-1] != N:
        raise ValueError(f"start distribution must have last dim N = {N}, got shape "
                         f"{tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("start contains NaN or Inf entries")
    if (s < 0).any():
        raise ValueError("start has negative entries; it must be a probability distribution")
    dev = (s.sum(-1) - 1).abs()
    if (dev > atol).any():
        raise ValueError(f"start does not sum to 1 (max |sum - 1| = {dev.max().item():.3g})")
    return s


def bounce(A, start, n: int, direction: str = "sink", dtype: Optional[torch.dtype] = None,
           atol: float = 1e-4) -> torch.Tensor:
    r"""Multi-bounce attention: the distributions of the chain after 0, 1, ..., n steps.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    start : int, integer Tensor (...,), or Tensor (..., N)
        A token index (or a batch of them), a one-hot vector, or any distribution over tokens.
    n : int
        Number of steps, ``n >= 0``.
    direction : {"sink", "source"}
        ``"sink"``: :math:`v_{k+1} = v_k A` (mass flows to attended keys; ``n = 1`` from
        :math:`e_i` is row select ``A[i, :]``). ``"source"``: the same recursion on
        :func:`source_chain` ``S`` (from :math:`e_j` the first step is column ``j`` of ``A``,
        normalised).
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    atol : float
        Tolerance of the input checks.

    Returns
    -------
    Tensor, shape (..., n + 1, N)
        ``v_0, ..., v_n`` with :math:`v_k = v_0 P^k`, :math:`P = A` or ``S``; the batch shape is
        the broadcast of ``A``'s and ``start``'s batch shapes. Each row sums to one.

    Notes
    -----
    Costs ``n`` batched vector-matrix products, never a matrix power. The paper (Erel et al., 2025) finds
    ``n = 2`` best for segmentation.
    """
    if direction not in ("sink", "source"):
        raise ValueError(f"direction must be 'sink' or 'source', got {direction!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    A = _prepare(A, dtype, atol)
    P = A if direction == "sink" else source_chain(A, atol=atol)
    N = A.shape[-1]
    v = _start_distribution(start, N, A.dtype, A.device, atol)
    batch = torch.broadcast_shapes(P.shape[:-2], v.shape[:-1])
    v = v.expand(*batch, N).unsqueeze(-2)  # (..., 1, N)
    out = [v]
    for _ in range(n):
        v = v @ P
        out.append(v)
    return torch.cat(out, dim=-2)


# ----------------------------------------------------------------------------------------------
# TokenRank: the damped chain and its stationary distribution
# ----------------------------------------------------------------------------------------------
def _check_alpha(alpha) -> float:
    try:
        a = float(alpha)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}") from exc
    if not (0.0 <= a <= 1.0) or math.isnan(a):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    return a


def _personalization(p, N: int, dtype, device) -> torch.Tensor:
    if p is None:
        return torch.full((N,), 1.0 / N, dtype=dtype, device=device)
    p = _as_tensor(p, "personalization").to(device=device, dtype=dtype)
    if p.ndim == 0 or p.shape[-1] != N:
        raise ValueError(f"personalization must have last dim N = {N}, got shape "
                         f"{tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError("personalization contains NaN or Inf entries")
    if (p < 0).any():
        raise ValueError("personalization has negative entries")
    s = p.sum(-1, keepdim=True)
    if (s == 0).any():
        raise ValueError("personalization sums to 0; it must put mass on some token")
    return p / s


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
        and aperiodic, so its stationary distribution is unique (Page et al., 1999).
    """
    alpha = _check_alpha(alpha)
    A = _prepare(A, dtype, atol)
    p = _personalization(personalization, A.shape[-1], A.dtype, A.device)
    return alpha * A + (1.0 - alpha) * p.unsqueeze(-2)


def _closed_class_count(A: torch.Tensor) -> torch.Tensor:
    """Number of closed communicating classes of each chain in a batch (..., N, N) -> (...,).

    A chain has a unique stationary distribution iff it has exactly one closed class (Levin et al., 2017).
    All-positive chains (every softmax without masking) have one; others go through scipy's
    strongly connected components.
    """
    batch = A.shape[:-2]
    N = A.shape[-1]
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
    counts = _closed_class_count(A)
    if (counts > 1).any():
        idx = _first_bad(counts > 1)
        raise ReducibleChainError(
            f"reducible chain (batch index {idx}) has {int(counts.max())} closed classes, so its "
            "stationary distribution is not unique; use alpha < 1 (damping) to make it unique")


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

    Notes
    -----
    For :math:`\alpha < 1`, :math:`\pi (I - \alpha A) = (1-\alpha) p` (Page et al., 1999). For
    :math:`\alpha = 1`, :math:`\pi (I - A + \mathbf 1 u^\top) = u^\top` with :math:`u = \mathbf
    1/N`, a system that is non-singular exactly when the stationary distribution is unique.
    Costs :math:`O(N^3)` per matrix; use :func:`token_rank` for speed.
    """
    alpha = _check_alpha(alpha)
    A = _prepare(A, torch.float64, atol)
    N = A.shape[-1]
    p = _personalization(personalization, N, A.dtype, A.device)
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if alpha < 1.0:
        M = eye - alpha * A
        b = (1.0 - alpha) * p
    else:
        _check_unique(A)
        M = eye - A + 1.0 / N
        b = torch.full((N,), 1.0 / N, dtype=A.dtype, device=A.device)
    batch = torch.broadcast_shapes(M.shape[:-2], b.shape[:-1])
    M = M.expand(*batch, N, N)
    b = b.expand(*batch, N)
    pi = torch.linalg.solve(M.transpose(-1, -2), b.unsqueeze(-1)).squeeze(-1)
    pi = pi.clamp_min(0)
    return pi / pi.sum(-1, keepdim=True)


class _Damped:
    """Row-vector operator of the damped chain on a flattened batch (B, N, N)."""

    def __init__(self, A3: torch.Tensor, alpha: float, p: torch.Tensor):
        self.A3, self.alpha, self.p = A3, alpha, p  # p: (B, N)
        self.passes = 0

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """x A for x (B, N): one pass over A."""
        self.passes += 1
        return torch.matmul(x.unsqueeze(1), self.A3).squeeze(1)

    def damp(self, x: torch.Tensor, xA: torch.Tensor) -> torch.Tensor:
        """x A' = alpha x A + (1 - alpha)(x 1) p, given x A."""
        if self.alpha == 1.0:
            return xA
        return self.alpha * xA + (1.0 - self.alpha) * x.sum(-1, keepdim=True) * self.p

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return self.damp(x, self.product(x))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp_min(0)
    return x / x.sum(-1, keepdim=True)


def _gmres_cycle(op, x0, r, m: int, target: torch.Tensor, budget: int):
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


def token_rank(A, alpha: float = 0.99, personalization=None, tol: float = 1e-6,
               max_iter: int = 1000, method: str = "krylov", dtype: Optional[torch.dtype] = None,
               check: bool = True, atol: float = 1e-4, return_info: bool = False):
    r"""TokenRank: the stationary distribution of the damped attention chain.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    alpha : float in [0, 1]
        Damping (0.99 in [1]_). ``alpha = 1`` solves the undamped chain and raises
        :class:`ReducibleChainError` when its stationary distribution is not unique.
    personalization : Tensor, shape (N,) or (..., N), optional
        Teleport distribution ``p`` (normalised; uniform if ``None``), as in PageRank [2]_.
    tol : float
        Convergence tolerance on the L1 change of one damped step (below).
    max_iter : int
        Budget of passes over ``A`` (vector-matrix products with the whole batch).
    method : {"krylov", "power"}
        ``"krylov"``: restarted GMRES [3]_ on the linear system below, then the verification
        step; typically far fewer passes. ``"power"``: plain power iteration from ``p`` (on the
        lazy chain :math:`(I + A)/2` when ``alpha = 1``), the classic PageRank method [2]_.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64``.
    check : bool
        Validate ``A`` with :func:`check_stochastic` (two passes). Leave on unless ``A`` is known
        to be valid.
    atol : float
        Row-sum tolerance of the input check.
    return_info : bool
        Also return a dict with ``"passes"`` (products with ``A``, checks excluded, in units of
        the whole of ``A``: with several groups (Notes) it is the size-weighted mean of the
        groups' counts, 2 decimals),
        ``"check_passes"`` and ``"residual"`` (final L1 change per matrix, shape ``(...,)``).

    Returns
    -------
    pi : Tensor, shape (..., N)
        Non-negative, sums to one; batch shape = broadcast of ``A``'s and ``p``'s batch shapes.

    Raises
    ------
    ConvergenceError
        (a :class:`RuntimeError`) when the L1 rule is not met within ``max_iter`` passes.
    ReducibleChainError
        (a :class:`ValueError`) ``alpha = 1`` and the chain has several closed classes.
    ValueError
        Invalid ``A``, ``alpha``, ``personalization``, ``tol``, ``max_iter`` or ``method``.

    Notes
    -----
    The damped chain :math:`A' = \alpha A + (1-\alpha)\mathbf 1 p^\top` (:func:`damped`) has a
    unique stationary row vector :math:`\pi = \pi A'` for :math:`\alpha < 1` [2]_. Equivalently
    :math:`\pi (I - \alpha A) = (1 - \alpha) p`, and for :math:`\alpha = 1`,
    :math:`\pi (I - A + \mathbf 1 u^\top) = u^\top` with :math:`u = \mathbf 1 / N`
    (non-singular iff :math:`\pi` is unique). ``"krylov"`` solves that system by GMRES in the
    row-vector space, batched over all matrices with ``bmm``; periodic chains need no special
    care there (their eigenvalue :math:`-1` is harmless for GMRES).

    **Convergence rule** (both methods, exact): with :math:`x` the current iterate, clipped at 0
    and normalised to sum 1, the result is :math:`y = x A'` as soon as

    .. math:: \lVert x A' - x \rVert_1 < \mathrm{tol}

    holds for every matrix in the batch, where :math:`x A'` is renormalised to sum 1 (a no-op
    for exactly stochastic ``A``; it keeps row sums that are 1 only up to rounding from setting a
    floor on the change). One damped step then changes the answer by less than ``tol`` in L1
    (networkx's ``pagerank`` tests the same quantity against ``N * tol``). Since one step
    contracts differences of distributions by :math:`\alpha` in L1, the distance to
    :math:`\pi` is at most :math:`\alpha\,\mathrm{tol}/(1-\alpha)` for :math:`\alpha < 1`, and in
    practice far less.
    ``"power"`` with ``alpha = 1`` iterates the lazy chain :math:`(I + A)/2`, which has the
    same stationary law and is aperiodic, so periodic chains converge instead of oscillating.

    **Memory traffic.** Each product reads all of ``A``. On CPU the batch is solved in groups of
    at most ``TOKEN_RANK_GROUP_BYTES`` (32 MiB), one group to convergence before the next, so
    that a group's repeated products find it in cache rather than streaming the whole batch from
    memory every pass; the input check runs group by group just before the group's first
    product (errors still name indices in the whole batch). The rule above then holds for each
    group, hence for every matrix; ``max_iter`` bounds the passes of each group. On other
    devices the whole batch is one group.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025.
    .. [2] Page, Brin, Motwani, Winograd. "The PageRank Citation Ranking", 1999.
    .. [3] Saad, Schultz. "GMRES", SIAM J. Sci. Stat. Comput., 1986.
    """
    alpha = _check_alpha(alpha)
    if method not in ("krylov", "power"):
        raise ValueError(f"method must be 'krylov' or 'power', got {method!r}")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    A = _as_tensor(A, "A")
    _check_square(A)
    # the check runs group by group, just before each group's first product (Notes);
    # half-precision input is checked up front, before its rows are renormalised
    late_check = check and A.dtype in (torch.float32, torch.float64)
    A = _prepare(A, dtype, atol, check=check and not late_check)
    N = A.shape[-1]
    p = _personalization(personalization, N, A.dtype, A.device)
    if late_check and alpha == 1.0:  # _check_unique needs a valid chain
        _check_rows(A, atol)
        late_check = False
    if alpha == 1.0:
        _check_unique(A)
    batch = torch.broadcast_shapes(A.shape[:-2], p.shape[:-1])
    A3 = A.expand(*batch, N, N).reshape(-1, N, N)
    P2 = p.expand(*batch, N).reshape(-1, N)
    B = A3.shape[0]
    g = _cache_group(A3, TOKEN_RANK_GROUP_BYTES)
    xs, errs, passes = [], [], 0.0
    for s in range(0, B, g):
        if late_check:
            try:
                _check_rows(A3[s:s + g], atol)
            except ValueError:
                _check_rows(A3, atol)  # raise with indices into the whole batch
                raise
        x, err, n = _token_rank_solve(A3[s:s + g], P2[s:s + g], alpha, tol, max_iter, method)
        xs.append(x)
        errs.append(err)
        passes += n * x.shape[0] / B
    x, err = torch.cat(xs), torch.cat(errs)
    pi = x.reshape(*batch, N)
    if return_info:
        info = {"passes": round(passes, 2), "check_passes": 2 if check else 0,
                "residual": err.reshape(batch)}
        return pi, info
    return pi


#: On CPU, token_rank solves the matrices in groups of at most this many bytes, one group after
#: the other, so that the repeated products with a group find it in cache.
TOKEN_RANK_GROUP_BYTES = 32 * 2 ** 20


def _token_rank_solve(A3, P2, alpha: float, tol: float, max_iter: int, method: str):
    """The solver of :func:`token_rank` on (B, N, N), (B, N); returns (pi, L1 change, passes)."""
    B, N = A3.shape[0], A3.shape[-1]
    A = A3
    chain = _Damped(A3, alpha, P2)

    if method == "power":
        x, err = _power_from(chain, P2.clone(), alpha, tol, max_iter, "power")
    else:
        # op(v) = v (I - alpha A + c 1 u^T): alpha < 1 -> c = 0, b = (1 - alpha) p;
        # alpha = 1 -> c = 1, u = 1/N, b = u (non-singular iff pi is unique)
        if alpha < 1.0:
            b, cu = (1.0 - alpha) * P2, 0.0
        else:
            b, cu = torch.full_like(P2, 1.0 / N), 1.0 / N

        def op(v):
            return v - alpha * chain.product(v) + cu * v.sum(-1, keepdim=True)

        m = min(30, N)
        x = _normalise(P2.clone())
        # the L1 norm is at most sqrt(N) times the L2 norm
        target = torch.full((B,), 0.5 * tol / math.sqrt(N), dtype=A.dtype, device=A.device)
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
                    f"{err.max().item():.3g} >= tol = {tol:g}")
            if prev is not None and bool(((err >= tol) & (err > 0.5 * prev)).any()):
                # GMRES stagnates (possible for strongly non-normal chains): fall back to the
                # damped/lazy power iteration from the current iterate, which always converges.
                x, err = _power_from(chain, x, alpha, tol, max_iter, "krylov")
                break
            prev = err
            r0 = b - (x - alpha * xA + cu * x.sum(-1, keepdim=True))
            x, _ = _gmres_cycle(op, x, r0, m, target, max_iter - chain.passes)
            x = _normalise(x)
    return x, err, chain.passes


def _power_from(chain: _Damped, x, alpha: float, tol: float, max_iter: int, method: str):
    """Power iteration (lazy when alpha = 1) from x until the L1 rule holds; (y, L1 change)."""
    lazy = alpha == 1.0
    err = None
    while chain.passes < max_iter:
        y = chain.step(x)
        y = y / y.sum(-1, keepdim=True)
        err = (y - x).abs().sum(-1)
        if bool((err < tol).all()):
            return y, err
        x = _normalise(0.5 * (x + y)) if lazy else _normalise(y)
    worst = float("nan") if err is None else err.max().item()
    raise ConvergenceError(
        f"token_rank(method={method!r}) did not converge in {max_iter} passes: L1 change "
        f"{worst:.3g} >= tol = {tol:g}")


# ----------------------------------------------------------------------------------------------
# example chains and related constructions
# ----------------------------------------------------------------------------------------------
def planted_chain(sizes, leak: float = 0.1, concentration: float = 1.0, shuffle: bool = False,
                  seed: int = 0, dtype: Optional[torch.dtype] = None, device=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A random row-stochastic chain with planted blocks (metastable states known in advance).

    Parameters
    ----------
    sizes : sequence of int
        Block sizes :math:`n_1, \dots, n_k` (each >= 1); :math:`N = \sum_b n_b`.
    leak : float in [0, 1]
        Exactly this much probability mass of every row leaves the row's own block.
    concentration : float > 0
        Concentration :math:`c` of the random entries (Dirichlet(:math:`c`) rows): large values
        make rows flat inside and outside the block, small values make them spiky.
    shuffle : bool
        Randomly permute the tokens so that blocks are not contiguous.
    seed : int
        Seed of a private NumPy generator (no global random state is touched); the same seed
        gives the same chain for every ``dtype`` and ``device``.
    dtype : torch.dtype, optional
        ``torch.float32`` (default) or ``torch.float64`` for the result (drawn in float64).
    device : torch.device or str, optional
        Device of the result (CPU by default).

    Returns
    -------
    A : Tensor, shape (N, N)
        Row-stochastic transition matrix.
    labels : LongTensor, shape (N,)
        The planted block of each token, ``0 .. k-1``.

    Raises
    ------
    ValueError
        Empty ``sizes`` or a block size < 1, ``leak`` outside [0, 1], ``leak > 0`` with a single
        block (nowhere to leak to), ``concentration <= 0``, or an unsupported ``dtype``.

    Notes
    -----
    Let :math:`b(i)` be the block of token ``i``. Row ``i`` is

    .. math::

        A_{ij} = (1 - \ell)\, d^{\mathrm{in}}_{ij}\, [b(j) = b(i)]
               + \ell\, d^{\mathrm{out}}_{ij}\, [b(j) \ne b(i)],

    with :math:`d^{\mathrm{in}}_{i\cdot}` and :math:`d^{\mathrm{out}}_{i\cdot}` independent
    Dirichlet(:math:`c`) vectors on the tokens inside and outside the block (drawn as normalised
    Gamma(:math:`c`, 1) variables), :math:`\ell` = ``leak``. So every row sends exactly
    :math:`\ell` of its mass out of its block. With :math:`\ell = 0` the chain is reducible
    (``k`` closed classes, eigenvalue 1 with multiplicity ``k``); for small :math:`\ell` it is
    *nearly completely decomposable* (Simon & Ando): ``k`` eigenvalues close to 1, then a
    spectral gap.
    If the out-of-block mass were spread uniformly over ``k`` equal blocks, the lumped ``k``-state
    chain would have eigenvalues :math:`1` and :math:`1 - \ell k / (k - 1)` (multiplicity
    :math:`k - 1`).

    References
    ----------
    Simon, Ando. "Aggregation of variables in dynamic systems". Econometrica 29(2), 1961
    (nearly decomposable systems).
    """
    import numpy as np

    try:
        sizes = [int(s) for s in sizes]
    except (TypeError, ValueError) as err:
        raise ValueError(f"planted_chain: sizes must be a sequence of positive ints, got "
                         f"{sizes!r}") from err
    if len(sizes) == 0 or any(s < 1 for s in sizes):
        raise ValueError(f"planted_chain: sizes must be a non-empty list of positive ints, "
                         f"got {sizes}")
    leak = float(leak)
    if not 0.0 <= leak <= 1.0:
        raise ValueError(f"planted_chain: leak must lie in [0, 1], got {leak}")
    if len(sizes) == 1 and leak > 0:
        raise ValueError("planted_chain: a single block has nowhere to leak to; use leak=0")
    if not float(concentration) > 0:
        raise ValueError(f"planted_chain: concentration must be positive, got {concentration}")
    out_dtype = _compute_dtype(torch.empty(0), dtype)
    rng = np.random.default_rng(int(seed))
    n = sum(sizes)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    same = labels[:, None] == labels[None, :]
    w = torch.from_numpy(rng.gamma(float(concentration), 1.0, size=(n, n))) + 1e-12
    w_in = torch.where(same, w, torch.zeros_like(w))
    w_out = torch.where(same, torch.zeros_like(w), w)
    a = (1.0 - leak) * w_in / w_in.sum(-1, keepdim=True)
    if leak > 0:
        a = a + leak * w_out / w_out.sum(-1, keepdim=True)
    if shuffle:
        perm = torch.from_numpy(rng.permutation(n))
        a = a[perm][:, perm]
        labels = labels[perm]
    a = a / a.sum(-1, keepdim=True)
    return a.to(device=device, dtype=out_dtype), labels.to(device)


def bipartite_chain(A, dtype: Optional[torch.dtype] = None, atol: float = 1e-4) -> torch.Tensor:
    r"""The square chain on queries ∪ keys built from a non-square (cross-)attention matrix.

    Parameters
    ----------
    A : Tensor, shape (..., Nq, Nk)
        Row-stochastic cross-attention (rows = queries, columns = keys).
    dtype : torch.dtype, optional
        ``torch.float32`` (default; float64 input stays float64) or ``torch.float64``.
    atol : float
        Row-sum tolerance of the input check (raised to machine epsilon for half precision).

    Returns
    -------
    P : Tensor, shape (..., Nq + Nk, Nq + Nk)
        The block matrix :math:`P = \begin{pmatrix} 0 & A \\ B & 0 \end{pmatrix}`, row-stochastic,
        on the device of ``A``.

    Raises
    ------
    ValueError
        ``A`` with fewer than two dims or an empty dim, non-real dtype, NaN/Inf or negative
        entries, zero rows, or rows not summing to 1 within ``atol``.

    Notes
    -----
    :math:`B_{ji} = A_{ij} / \sum_k A_{kj}` is :math:`A^\top` with its rows normalised: key ``j``
    steps to query ``i`` in proportion to how much ``i`` attends to ``j`` ("who attends to j",
    the source direction of :func:`source_chain`). A key that no query attends to gets a uniform
    row :math:`1/N_q` over the queries so that ``P`` stays row-stochastic.

    The chain alternates query → key → query, so it is periodic with period 2 (its spectrum is
    symmetric under :math:`\lambda \mapsto -\lambda` and contains :math:`-1`); the two-step chains
    :math:`AB` (on queries) and :math:`BA` (on keys) are ordinary square chains. This is the
    standard bipartite construction for a rectangular kernel, as in co-clustering by bipartite
    spectral partitioning (Dhillon).

    References
    ----------
    Dhillon. "Co-clustering documents and words using bipartite spectral graph partitioning".
    KDD 2001.
    """
    A = _as_tensor(A, "A")
    if A.is_complex() or A.dtype == torch.bool:
        raise ValueError(f"bipartite_chain: A must be a real floating tensor, got dtype {A.dtype}")
    if A.ndim < 2:
        raise ValueError(f"bipartite_chain: expected (..., Nq, Nk), got shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"bipartite_chain: A is empty, shape {tuple(A.shape)}")
    low = A.dtype in (torch.float16, torch.bfloat16)
    _check_rows(A, atol, "bipartite_chain: A")
    a = A.to(_compute_dtype(A, dtype))
    if low:
        a = a / a.sum(-1, keepdim=True)
    nq, nk = a.shape[-2], a.shape[-1]
    b = a.transpose(-1, -2)
    s = b.sum(-1, keepdim=True)
    b = torch.where(s > 0, b / s.clamp_min(torch.finfo(b.dtype).tiny), torch.full_like(b, 1.0 / nq))
    top = torch.cat([torch.zeros(*a.shape[:-2], nq, nq, dtype=a.dtype, device=a.device), a], -1)
    bot = torch.cat([b, torch.zeros(*a.shape[:-2], nk, nk, dtype=a.dtype, device=a.device)], -1)
    return torch.cat([top, bot], -2)


def rollout(attentions, residual: float = 0.5, dtype: Optional[torch.dtype] = None,
            atol: float = 1e-4) -> torch.Tensor:
    r"""Attention rollout across layers (Abnar & Zuidema, 2020), to compare with multi-bounce.

    Parameters
    ----------
    attentions : sequence or mapping of Tensors, each of shape (..., N, N), first layer first
        Row-stochastic attention per layer (average the heads before calling). A mapping (such
        as ``rec.attentions`` of :func:`attnchain.capture`) is used in its iteration order; a
        tensor of shape ``(L, ..., N, N)`` is read as ``L`` layers along dim 0. Leading batch
        dims broadcast across layers.
    residual : float in [0, 1]
        Weight :math:`r` of the identity that models the residual connection.
    dtype : torch.dtype, optional
        ``torch.float32`` (default; float64 if any layer is float64) or ``torch.float64``.
    atol : float
        Row-sum tolerance of the input check.

    Returns
    -------
    R : Tensor, shape (..., N, N)
        Row-stochastic; row ``i`` is how much token ``i`` at the last layer draws from each input
        token. On the device of the first layer.

    Raises
    ------
    ValueError
        No layers, ``residual`` outside [0, 1], a layer that is not a batch of row-stochastic
        square matrices (see :func:`check_stochastic`), or layers with different ``N``.

    Notes
    -----
    With :math:`\hat A_l = r I + (1 - r) A_l`,

    .. math::  R = \hat A_L \hat A_{L-1} \cdots \hat A_1 ,

    computed as :math:`R_1 = \hat A_1`, :math:`R_l = \hat A_l R_{l-1}`: the output at layer
    :math:`l` reads the output of layer :math:`l - 1`. Each :math:`\hat A_l` is row-stochastic,
    so ``R`` is too: a *time-inhomogeneous* chain with one step per layer, whereas
    :func:`bounce` takes ``n`` steps of one layer's chain. Abnar & Zuidema use :math:`r = 0.5`.

    References
    ----------
    Abnar, Zuidema. "Quantifying Attention Flow in Transformers". ACL 2020, arXiv:2005.00928.
    """
    from collections.abc import Mapping

    mats = list(attentions.values()) if isinstance(attentions, Mapping) else list(attentions)
    if not mats:
        raise ValueError("rollout: no attention matrices given")
    residual = float(residual)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"rollout: residual must lie in [0, 1], got {residual}")
    mats = [_as_tensor(a, f"attentions[{i}]") for i, a in enumerate(mats)]
    if dtype is None and any(a.dtype == torch.float64 for a in mats):
        dtype = torch.float64
    r = None
    n = None
    for i, a in enumerate(mats):
        try:
            a = _prepare(a, dtype, atol, name=f"rollout: attentions[{i}]")
        except ValueError as err:
            if "rollout" in str(err):
                raise
            raise ValueError(f"rollout: attentions[{i}]: {err}") from err
        if n is None:
            n = a.shape[-1]
        elif a.shape[-1] != n:
            raise ValueError(f"rollout: attentions[{i}] has N = {a.shape[-1]} tokens, the first "
                             f"layer has N = {n}")
        if r is not None:
            a = a.to(r.device)
        eye = torch.eye(n, dtype=a.dtype, device=a.device)
        step = residual * eye + (1.0 - residual) * a
        r = step if r is None else step @ r
    return r
