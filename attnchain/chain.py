r"""Building and checking attention chains, and multi-bounce propagation.

An attention matrix ``A`` of shape ``(..., N, N)`` (rows = queries, columns = keys, every row a
probability distribution) is the transition matrix of a discrete-time Markov chain over the
``N`` tokens [1]_. Distributions are **row vectors**: one step of the chain maps ``v`` to ``v A``.

This module checks and builds chains (:func:`check_stochastic`, :func:`to_stochastic`,
:func:`restrict`, :func:`source_chain`, :func:`bipartite_chain`, the example chains of
:func:`planted_chain`), propagates distributions along them (:func:`bounce`) and across layers
(:func:`rollout`). Stationary distributions live in :mod:`attnchain.stationary`; this module
re-exports :func:`~attnchain.stationary.token_rank` and
:func:`~attnchain.stationary.stationary_dense` for convenience (the same functions, not copies).
Eigen-analysis lives in :mod:`attnchain.spectral`, chain operators in :mod:`attnchain.operators`.

Every function is batched over leading dimensions, keeps the input's device, computes in float32
by default (float64 on request through ``dtype=``, and for float64 input) and rejects bad input
with a :class:`ValueError` that names the problem. float16/bfloat16 inputs are upcast, checked with
``atol`` raised to the input type's machine epsilon (rounding to half precision moves row sums by
up to half of it) and their rows renormalised after the upcast.

**References**

.. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
   :cite:`erel2025attention`.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral
from typing import Optional

import torch

from ._validate import (HALF, as_tensor, broadcast_batch, check_choice, check_fraction,
                        check_int, check_mask, check_positive, check_real, check_rows,
                        check_square, compute_dtype, first_bad, prepare, start_distribution,
                        token_indices)
from .operators import SourceChain, as_operator
from .stationary import stationary_dense, token_rank

__all__ = [
    "check_stochastic",
    "to_stochastic",
    "restrict",
    "source_chain",
    "bounce",
    "planted_chain",
    "bipartite_chain",
    "rollout",
    "token_rank",
    "stationary_dense",
]

#: The directions of :func:`bounce`.
DIRECTIONS = ("sink", "source")


def check_stochastic(A, atol: float = 1e-4) -> None:
    r"""Check that ``A`` is a batch of row-stochastic matrices; raise ``ValueError`` if not.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Candidate transition matrices (rows = from-token, columns = to-token).
    atol : float
        Largest accepted deviation :math:`|\sum_j A_{ij} - 1|` of a row sum from one. For
        float16/bfloat16 input it is raised to that type's machine epsilon.

    Returns
    -------
    None

    Raises
    ------
    ValueError
        With a message naming the first problem found: not square, empty, non-real dtype,
        NaN or Inf entries, negative entries, zero rows, rows not summing to one within ``atol``.

    Notes
    -----
    A (row-)stochastic matrix has :math:`A_{ij} \ge 0` and :math:`\sum_j A_{ij} = 1`; it is the
    transition matrix of a Markov chain with :math:`P(X_{t+1}=j \mid X_t=i) = A_{ij}` [1]_.

    Examples
    --------
    >>> import torch
    >>> check_stochastic(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    >>> check_stochastic(torch.tensor([[0.5, 0.6], [0.0, 1.0]]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: A has rows not summing to 1 (max |row sum - 1| = 0.1 > atol = 0.0001, ...

    See Also
    --------
    to_stochastic : build a chain from logits or weights.

    References
    ----------
    .. [1] Levin, Peres, Wilmer, "Markov Chains and Mixing Times", 2nd ed., AMS 2017
       :cite:`levin2017markov`.
    """
    A = as_tensor(A, "A")
    check_square(A)
    check_rows(A, atol)


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

    Examples
    --------
    >>> import torch
    >>> to_stochastic(torch.tensor([[1.0, 3.0], [2.0, 2.0]]), kind="weights")
    tensor([[0.2500, 0.7500],
            [0.5000, 0.5000]])
    >>> to_stochastic(torch.zeros(2, 2), mask=torch.tensor([True, False]))
    tensor([[1., 0.],
            [1., 0.]])

    See Also
    --------
    check_stochastic, restrict
    attnchain.operators.attention_probs : the softmax of :math:`s\,QK^\top + M` from q and k.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    check_choice(kind, "kind", ("logits", "weights"))
    x = as_tensor(x, "x")
    check_square(x, "x")
    x = x.to(compute_dtype(x, dtype))
    if torch.isnan(x).any():
        raise ValueError(f"x contains NaN entries (first at index {first_bad(torch.isnan(x))})")
    if mask is not None:
        mask = check_mask(mask, x)
    if kind == "logits":
        if torch.isposinf(x).any():
            raise ValueError("x contains +inf logits; softmax is undefined")
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        empty = torch.isneginf(x).all(-1)
        if empty.any():
            raise ValueError(f"every key is masked for some query (first at batch/row index "
                             f"{first_bad(empty)}): the row has no probability mass")
        return torch.softmax(x, dim=-1)
    # weights
    if torch.isinf(x).any():
        raise ValueError(f"x contains Inf weights (first at index {first_bad(torch.isinf(x))})")
    if (x < 0).any():
        raise ValueError(f"x has negative weights (first at index {first_bad(x < 0)}); "
                         "weights must be non-negative (use kind='logits' for logits)")
    if mask is not None:
        x = x.masked_fill(~mask, 0.0)
    s = x.sum(-1, keepdim=True)
    if (s == 0).any():
        raise ValueError(f"x has zero rows after masking (first at batch/row index "
                         f"{first_bad(s[..., 0] == 0)}): the row has no probability mass")
    if torch.isinf(s).any():  # finite weights whose sum overflows: scale by the row maximum
        x = x / x.amax(-1, keepdim=True)
        s = x.sum(-1, keepdim=True)
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

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    A = as_tensor(A, "A")
    N = check_square(A)
    idx = token_indices(tokens, N).to(A.device)
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

    Examples
    --------
    >>> import torch
    >>> source_chain(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    tensor([[0.3333, 0.6667],
            [1.0000, 0.0000]])

    See Also
    --------
    attnchain.operators.SourceChain : the same chain as an operator.
    bounce : ``direction="source"`` runs this chain.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    return SourceChain(as_operator(A, dtype, atol)).dense()


def bounce(A, start, n: int, direction: str = "sink", dtype: Optional[torch.dtype] = None,
           atol: float = 1e-4) -> torch.Tensor:
    r"""Multi-bounce attention: the distributions of the chain after 0, 1, ..., n steps.

    Parameters
    ----------
    A : Tensor, shape (..., N, N), or ChainOperator
        Row-stochastic attention, or an operator (:mod:`attnchain.operators`), which is trusted
        to be row-stochastic and not checked.
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
        ``torch.float32`` (default) or ``torch.float64``; for an operator ``None`` or its dtype.
    atol : float
        Tolerance of the input checks.

    Returns
    -------
    Tensor, shape (..., n + 1, N)
        ``v_0, ..., v_n`` with :math:`v_k = v_0 P^k`, :math:`P = A` or ``S``; the batch shape is
        the broadcast of ``A``'s and ``start``'s batch shapes. Each row sums to one.

    Raises
    ------
    ValueError
        Invalid ``A`` (see :func:`check_stochastic`), ``start`` (index out of range, not a
        distribution, wrong last dimension), ``n`` or ``direction``; for ``"source"``, a key
        column that no query attends to.

    Notes
    -----
    :math:`n` products with the chain, never a matrix power; ``A`` and ``DenseChain(A)`` give
    identical results. The paper [1]_ finds ``n = 2`` best for segmentation;
    :func:`attnchain.choose_bounces` is a spectral rule for ``n``.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    >>> bounce(A, 0, 2)                     # a cycle: 0 -> 1 -> 2
    tensor([[1., 0., 0.],
            [0., 1., 0.],
            [0., 0., 1.]])
    >>> bounce(A, 0, 1, direction="source")[-1]   # who attends to token 0: token 2
    tensor([0., 0., 1.])

    See Also
    --------
    source_chain, attnchain.choose_bounces, rollout

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    check_choice(direction, "direction", DIRECTIONS)
    check_int(n, "n", low=0)
    op = as_operator(A, dtype, atol)
    P = op if direction == "sink" else SourceChain(op)
    N = op.n
    v = start_distribution(start, N, op.dtype, op.device, atol)
    batch = broadcast_batch(P.batch_shape, v.shape[:-1], "A", "start")
    v = v.expand(*batch, N).unsqueeze(-2)  # (..., 1, N)
    out = [v]
    for _ in range(n):
        v = P.left(v)
        out.append(v)
    return torch.cat(out, dim=-2)


def _dirichlet_rows(w, g, log_w, support, mass: float) -> torch.Tensor:
    """Rows of ``w`` on ``support``, scaled to sum to ``mass``; rows where every raw Gamma draw
    ``g`` underflowed (below 1e-9) are taken from the log-space draws ``log_w`` instead."""
    zero = torch.zeros_like(w)
    rows = torch.where(support, w, zero)
    rows = mass * rows / rows.sum(-1, keepdim=True)
    if log_w is not None:
        flat = (torch.where(support, g, zero) < 1e-9).all(-1) & support.any(-1)
        logs = torch.softmax(torch.where(support, log_w, torch.full_like(w, -math.inf)), -1)
        rows = torch.where(flat.unsqueeze(-1), mass * logs, rows)
    return rows


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
        Empty ``sizes``, a block size that is not an int or is < 1, ``leak`` outside [0, 1],
        ``leak > 0`` with a single block (nowhere to leak to), ``concentration <= 0``, or an
        unsupported ``dtype``.

    Notes
    -----
    Let :math:`b(i)` be the block of token ``i``. Row ``i`` is

    .. math::

        A_{ij} = (1 - \ell)\, d^{\mathrm{in}}_{ij}\, [b(j) = b(i)]
               + \ell\, d^{\mathrm{out}}_{ij}\, [b(j) \ne b(i)],

    with :math:`d^{\mathrm{in}}_{i\cdot}` and :math:`d^{\mathrm{out}}_{i\cdot}` independent
    Dirichlet(:math:`c`) vectors on the tokens inside and outside the block (drawn as normalised
    Gamma(:math:`c`, 1) variables; a row whose draws all underflow, as they do for very small
    :math:`c`, is drawn in log space instead, :math:`\log G_c = \log G_{c+1} + \log(U)/c`),
    :math:`\ell` = ``leak``. So every row sends exactly
    :math:`\ell` of its mass out of its block. With :math:`\ell = 0` the chain is reducible
    (``k`` closed classes, eigenvalue 1 with multiplicity ``k``); for small :math:`\ell` it is
    *nearly completely decomposable* (Simon & Ando [1]_): ``k`` eigenvalues close to 1, then a
    spectral gap.
    If the out-of-block mass were spread uniformly over ``k`` equal blocks, the lumped ``k``-state
    chain would have eigenvalues :math:`1` and :math:`1 - \ell k / (k - 1)` (multiplicity
    :math:`k - 1`).

    Examples
    --------
    >>> A, labels = planted_chain([2, 3], leak=0.1, seed=0)
    >>> A.shape, labels.tolist()
    (torch.Size([5, 5]), [0, 0, 1, 1, 1])
    >>> A[:2, 2:].sum(-1)                      # every row leaks 0.1 out of its block
    tensor([0.1000, 0.1000])

    See Also
    --------
    attnchain.metastable_states : recovers the blocks.
    attnchain.choose_bounces : a bounce count from the spectral gap.

    References
    ----------
    .. [1] Simon, Ando, "Aggregation of variables in dynamic systems", Econometrica 29(2), 1961
       (nearly decomposable systems).
    """
    import numpy as np

    try:
        sizes = list(sizes)
    except TypeError as err:
        raise ValueError(f"planted_chain: sizes must be a sequence of positive ints, got "
                         f"{sizes!r}") from err
    if any(isinstance(s, bool) or not isinstance(s, Integral) for s in sizes):
        # int(2.5) would silently make a block of 2
        raise ValueError(f"planted_chain: sizes must be a sequence of positive ints, got "
                         f"{sizes!r}")
    sizes = [int(s) for s in sizes]
    if len(sizes) == 0 or any(s < 1 for s in sizes):
        raise ValueError(f"planted_chain: sizes must be a non-empty list of positive ints, "
                         f"got {sizes}")
    leak = check_fraction(leak, "leak", where="planted_chain: ")
    if len(sizes) == 1 and leak > 0:
        raise ValueError("planted_chain: a single block has nowhere to leak to; use leak=0")
    check_positive(concentration, "planted_chain: concentration")
    out_dtype = compute_dtype(torch.empty(0), dtype)
    rng = np.random.default_rng(int(seed))
    n = sum(sizes)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    same = labels[:, None] == labels[None, :]
    c = float(concentration)
    g = torch.from_numpy(rng.gamma(c, 1.0, size=(n, n)))
    log_w = None
    if c < 1.0 and bool((g < 1e-9).any()):
        # Gamma(c) underflows for small c: rows whose every draw did would come out flat.
        # Those rows use log Gamma(c) = log Gamma(c + 1) + log(U) / c (Marsaglia & Tsang, 2000)
        spare = np.random.default_rng([int(seed), 1])
        log_w = torch.from_numpy(np.log(spare.gamma(c + 1.0, 1.0, size=(n, n)))
                                 + np.log(spare.uniform(size=(n, n))) / c)
    w = g + 1e-12
    a = _dirichlet_rows(w, g, log_w, same, 1.0 - leak)
    if leak > 0:
        a = a + _dirichlet_rows(w, g, log_w, ~same, leak)
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
    spectral partitioning [1]_.

    Examples
    --------
    >>> import torch
    >>> bipartite_chain(torch.tensor([[0.5, 0.5]]))     # one query, two keys
    tensor([[0.0000, 0.5000, 0.5000],
            [1.0000, 0.0000, 0.0000],
            [1.0000, 0.0000, 0.0000]])

    See Also
    --------
    source_chain : the key-to-query step ``B`` for square attention.

    References
    ----------
    .. [1] Dhillon, "Co-clustering documents and words using bipartite spectral graph
       partitioning", KDD 2001.
    """
    A = as_tensor(A, "A")
    check_real(A, "bipartite_chain: A")
    if A.ndim < 2:
        raise ValueError(f"bipartite_chain: expected (..., Nq, Nk), got shape {tuple(A.shape)}")
    if A.shape[-1] == 0 or A.shape[-2] == 0:
        raise ValueError(f"bipartite_chain: A is empty, shape {tuple(A.shape)}")
    low = A.dtype in HALF
    check_rows(A, atol, "bipartite_chain: A")
    a = A.to(compute_dtype(A, dtype))
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
    :func:`bounce` takes ``n`` steps of one layer's chain. Abnar & Zuidema [1]_ use :math:`r = 0.5`.

    Examples
    --------
    >>> import torch
    >>> swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    >>> rollout([swap, swap], residual=0.0)            # two swaps: back where we started
    tensor([[1., 0.],
            [0., 1.]])

    See Also
    --------
    bounce : ``n`` steps of one layer's chain.

    References
    ----------
    .. [1] Abnar, Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020
       :cite:`abnar2020rollout`.
    """

    mats = list(attentions.values()) if isinstance(attentions, Mapping) else list(attentions)
    if not mats:
        raise ValueError("rollout: no attention matrices given")
    residual = check_fraction(residual, "residual", where="rollout: ")
    mats = [as_tensor(a, f"attentions[{i}]") for i, a in enumerate(mats)]
    if dtype is None and any(a.dtype == torch.float64 for a in mats):
        dtype = torch.float64
    r = None
    n = None
    for i, a in enumerate(mats):
        try:
            a = prepare(a, dtype, atol, name=f"rollout: attentions[{i}]")
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
