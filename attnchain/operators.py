r"""Chain operators: a batch of row-stochastic chains one can multiply by.

A :class:`ChainOperator` is a batch of row-stochastic :math:`N \times N` chains :math:`A`, known
only through its products: :meth:`~ChainOperator.left` (:math:`X A`, distributions are row
vectors and flow toward attended tokens, the sink direction) and :meth:`~ChainOperator.right`
(:math:`A X`). :func:`attnchain.bounce`, :func:`attnchain.token_rank` and
:func:`attnchain.lambda2` take an operator wherever they take a tensor, and their solvers use
nothing else, so a chain that is never stored as an :math:`N \times N` matrix (attention
recomputed from :math:`Q` and :math:`K`) works with them unchanged.

- :class:`DenseChain` holds the matrix itself (checked to be row-stochastic when built).
- :class:`DampedChain` is the PageRank-damped chain :math:`\alpha A + (1-\alpha)\mathbf 1 p^\top`
  of another operator, applied analytically (never formed).
- :class:`SourceChain` is the transposed ("source") chain
  :math:`S = \mathrm{diag}(c)^{-1} A^\top`, :math:`c = \mathbf 1^\top A`, of another operator.
- :class:`AttentionChain` is the attention chain computed from queries and keys, block by block,
  never stored as an :math:`N \times N` matrix (matrix-free).

This module is also the one home of the attention softmax,

.. math:: A = \operatorname{softmax}\!\left(s\, Q K^\top + M\right),

with ``s`` the logit scale and ``M`` the additive form of a mask (:func:`mask_to_bias`).

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657
:cite:`erel2025attention`. Page et al., "The PageRank Citation Ranking", 1999
:cite:`page1999pagerank`.
"""
from __future__ import annotations

import abc
import itertools
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._validate import (as_tensor, broadcast_batch, check_fraction, check_personalization,
                        check_real, compute_dtype, first_bad, prepare)

__all__ = ["ChainOperator", "DenseChain", "DampedChain", "SourceChain", "AttentionChain",
           "as_operator", "mask_to_bias", "attention_logits", "attention_probs",
           "ATTENTION_BLOCK_BYTES"]


class ChainOperator(abc.ABC):
    r"""A batch of row-stochastic :math:`N \times N` chains one can multiply by.

    Subclasses set the attributes below and implement :meth:`left`, :meth:`right` and
    :meth:`map_batch`; everything else (sub-batches, reshaping, the dense matrix) follows from
    those. Every tensor an operator holds carries the operator's full batch shape in its
    leading dimensions (expanded views cost nothing), so :meth:`map_batch` can index, reshape
    or expand them all alike.

    Attributes
    ----------
    n : int
        Number of states (tokens) :math:`N`.
    batch_shape : torch.Size
        Leading batch shape: the operator holds ``prod(batch_shape)`` chains.
    dtype : torch.dtype
        dtype of the products.
    device : torch.device
        Device of the products.
    member_bytes : int or None
        Bytes one product reads per chain of the batch; on CPU the solvers work on groups of
        chains that fit in cache by this size (see the Numerics page). ``None``: the whole batch
        at once.

    Notes
    -----
    The contract: :meth:`left` and :meth:`right` are exact (up to rounding) products with
    row-stochastic matrices; operators are trusted, so functions given an operator do not
    check its rows. :class:`AttentionChain` is the matrix-free operator from :math:`Q, K`: it
    keeps the row log-sum-exp of :math:`s\,QK^\top + M` (a length-:math:`N` tensor) and forms
    blocks of rows of :math:`A` for both products.

    Examples
    --------
    >>> import torch
    >>> op = DenseChain(torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    >>> op.n, tuple(op.batch_shape)
    (2, ())
    >>> op.left(torch.tensor([[1.0, 0.0]]))
    tensor([[0.5000, 0.5000]])

    See Also
    --------
    DenseChain, DampedChain, SourceChain, AttentionChain
    as_operator : a tensor or an operator, as an operator.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """

    n: int
    batch_shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    member_bytes: Optional[int] = None

    @abc.abstractmethod
    def left(self, X: Tensor) -> Tensor:
        r""":math:`X A` for row vectors ``X`` of shape ``(*batch, k, N)``; ``X``'s leading
        dimensions broadcast against :attr:`batch_shape` as in :func:`torch.matmul`."""

    @abc.abstractmethod
    def right(self, X: Tensor) -> Tensor:
        r""":math:`A X` for column vectors ``X`` of shape ``(*batch, N, k)``; ``X``'s leading
        dimensions broadcast against :attr:`batch_shape` as in :func:`torch.matmul`."""

    @abc.abstractmethod
    def map_batch(self, fn: Callable[[Tensor, int], Tensor]) -> "ChainOperator":
        """The operator whose every tensor ``t`` is replaced by ``fn(t, tail)``, where ``tail``
        is the number of trailing (non-batch) dimensions of ``t``."""

    def reshape(self, *shape: int) -> "ChainOperator":
        """The operator with its batch dimensions reshaped (``reshape(-1)`` flattens)."""
        return self.map_batch(lambda t, tail: t.reshape(*shape, *t.shape[t.ndim - tail:]))

    def expand(self, *shape: int) -> "ChainOperator":
        """The operator with its batch broadcast to ``shape`` (views, no copies)."""
        return self.map_batch(lambda t, tail: t.expand(*shape, *t.shape[t.ndim - tail:]))

    def __getitem__(self, index) -> "ChainOperator":
        """A sub-batch: ``index`` (int, slice, index tensor) applies to the batch dimensions."""
        return self.map_batch(lambda t, tail: t[index])

    @property
    def requires_grad(self) -> bool:
        """Whether any tensor the operator holds requires a gradient."""
        found = []
        self.map_batch(lambda t, tail: found.append(t.requires_grad) or t)
        return any(found)

    def dense(self) -> Tensor:
        """The matrices themselves, ``(*batch, N, N)``: :math:`I A`, one product."""
        eye = torch.eye(self.n, dtype=self.dtype, device=self.device)
        return self.left(eye.expand(*self.batch_shape, self.n, self.n))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.n}, batch_shape={tuple(self.batch_shape)}, "
                f"dtype={self.dtype}, device={self.device})")


def as_operator(A, dtype: Optional[torch.dtype] = None, atol: float = 1e-4,
                check: bool = True) -> ChainOperator:
    """A tensor or an operator, as an operator: what :func:`attnchain.bounce`,
    :func:`attnchain.token_rank` and :func:`attnchain.lambda2` do with their input.

    Parameters
    ----------
    A : Tensor, shape (..., N, N), or ChainOperator
        Row-stochastic matrices, or an operator.
    dtype : torch.dtype, optional
        For a tensor: the compute dtype (see :class:`DenseChain`). For an operator: ``None``
        or the operator's own dtype.
    atol : float
        Row-sum tolerance of the input check of a tensor.
    check : bool
        Check a tensor with :func:`attnchain.check_stochastic` (operators are trusted).

    Returns
    -------
    ChainOperator
        ``A`` itself if it is an operator, else ``DenseChain(A, dtype, atol, check)``.

    Raises
    ------
    ValueError
        An invalid tensor (see :class:`DenseChain`), or a ``dtype`` that differs from the
        operator's.

    Examples
    --------
    >>> import torch
    >>> op = as_operator(torch.eye(3))
    >>> type(op).__name__, as_operator(op) is op
    ('DenseChain', True)

    See Also
    --------
    DenseChain

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    if isinstance(A, ChainOperator):
        if dtype is not None and dtype != A.dtype:
            raise ValueError(f"dtype={dtype} differs from the operator's dtype {A.dtype}; "
                             "build the operator in the dtype you want")
        return A
    return DenseChain(A, dtype=dtype, atol=atol, check=check)


class DenseChain(ChainOperator):
    r"""A batch of chains stored as matrices, ``A`` of shape ``(..., N, N)``.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic matrices (rows = from-token, columns = to-token).
    dtype : torch.dtype, optional
        ``torch.float32`` (default; float64 input stays float64) or ``torch.float64``.
    atol : float
        Row-sum tolerance of the input check.
    check : bool
        Check ``A`` with :func:`attnchain.check_stochastic`.

    Attributes
    ----------
    A : Tensor, shape (..., N, N)
        The matrices, in the compute dtype (half precision is upcast and renormalised).

    Raises
    ------
    ValueError
        ``A`` is not a batch of row-stochastic square matrices (see
        :func:`attnchain.check_stochastic`), or ``dtype`` is not float32/float64.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    >>> op = DenseChain(A)
    >>> op.right(torch.ones(2, 1)).flatten()     # A 1 = 1: rows sum to one
    tensor([1., 1.])
    >>> torch.equal(op.dense(), A)
    True

    See Also
    --------
    ChainOperator, DampedChain, SourceChain
    attnchain.check_stochastic : the input check.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """

    def __init__(self, A, dtype: Optional[torch.dtype] = None, atol: float = 1e-4,
                 check: bool = True):
        self._set(prepare(A, dtype, atol, check=check))

    def _set(self, A: Tensor) -> "DenseChain":
        self.A, self.n, self.batch_shape = A, A.shape[-1], A.shape[:-2]
        self.dtype, self.device = A.dtype, A.device
        self.member_bytes = self.n * self.n * A.element_size()
        return self

    def left(self, X: Tensor) -> Tensor:
        return torch.matmul(X, self.A)

    def right(self, X: Tensor) -> Tensor:
        # computed in the row layout (X^T A^T)^T, a view: the layout the solvers read
        return torch.matmul(X.mT, self.A.mT).mT

    def map_batch(self, fn) -> "DenseChain":
        # a view of a prepared tensor: no conversion or check (solvers index chains per pass)
        return DenseChain.__new__(DenseChain)._set(fn(self.A, 2))

    def dense(self) -> Tensor:
        return self.A

    @property
    def requires_grad(self) -> bool:
        return self.A.requires_grad


class DampedChain(ChainOperator):
    r"""The PageRank-damped chain :math:`A' = \alpha A + (1-\alpha)\,\mathbf 1 p^\top` of ``op``.

    Parameters
    ----------
    op : ChainOperator or Tensor, shape (..., N, N)
        The undamped chain (a tensor is wrapped in :class:`DenseChain`).
    alpha : float in [0, 1]
        Damping: with probability :math:`1-\alpha` the walk teleports to a token drawn from ``p``.
    personalization : Tensor, shape (N,) or (..., N), optional
        Non-negative teleport weights ``p`` (normalised to sum 1); uniform if ``None``. Its
        batch shape broadcasts with the operator's.

    Attributes
    ----------
    op : ChainOperator
        The undamped chain, broadcast to the batch shape of the damped one.
    alpha : float
    p : Tensor, shape (..., N)
        The normalised teleport distribution.

    Raises
    ------
    ValueError
        ``alpha`` outside [0, 1], an invalid ``personalization`` (wrong last dimension, NaN,
        negative entries, zero sum), or an invalid dense ``op``.

    Notes
    -----
    The products are analytic, :math:`X A' = \alpha X A + (1-\alpha)(X\mathbf 1)\, p^\top` and
    :math:`A' X = \alpha A X + (1-\alpha)\mathbf 1 (p^\top X)`: one product with ``op`` each,
    and the rank-one teleport term is never formed. :func:`attnchain.damped` is the dense matrix.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    >>> G = DampedChain(A, alpha=0.5)
    >>> G.dense()
    tensor([[0.2500, 0.7500],
            [0.7500, 0.2500]], dtype=torch.float64)

    See Also
    --------
    attnchain.damped : the dense damped matrix.
    attnchain.token_rank : its stationary distribution.

    References
    ----------
    Page, Brin, Motwani, Winograd, "The PageRank Citation Ranking", 1999
    :cite:`page1999pagerank`.
    """

    def __init__(self, op, alpha: float = 0.99, personalization=None):
        op = as_operator(op)
        alpha = check_fraction(alpha, "alpha")
        p = check_personalization(personalization, op.n, op.dtype, op.device)
        batch = broadcast_batch(op.batch_shape, p.shape[:-1], "A", "personalization")
        if batch != op.batch_shape:
            op = op.expand(*batch)
        self._set(op, alpha, p.expand(*batch, op.n))

    def _set(self, op: ChainOperator, alpha: float, p: Tensor) -> "DampedChain":
        self.op, self.alpha, self.p = op, alpha, p
        self.n, self.batch_shape = op.n, op.batch_shape
        self.dtype, self.device, self.member_bytes = op.dtype, op.device, op.member_bytes
        return self

    def damp(self, X: Tensor, XA: Tensor) -> Tensor:
        r""":math:`X A'` given :math:`X A` (``X`` of shape ``(*batch, k, N)``)."""
        if self.alpha == 1.0:
            return XA
        return self.alpha * XA + (1.0 - self.alpha) * X.sum(-1, keepdim=True) * self.p.unsqueeze(-2)

    def left(self, X: Tensor) -> Tensor:
        return self.damp(X, self.op.left(X))

    def right(self, X: Tensor) -> Tensor:
        AX = self.op.right(X)
        if self.alpha == 1.0:
            return AX
        return self.alpha * AX + (1.0 - self.alpha) * (self.p.unsqueeze(-2) @ X)

    def map_batch(self, fn) -> "DampedChain":
        return DampedChain.__new__(DampedChain)._set(self.op.map_batch(fn), self.alpha,
                                                     fn(self.p, 1))

    def dense(self) -> Tensor:
        return self.alpha * self.op.dense() + (1.0 - self.alpha) * self.p.unsqueeze(-2)


class SourceChain(ChainOperator):
    r"""The transposed ("source") chain :math:`S = \mathrm{diag}(c)^{-1} A^\top`,
    :math:`c = \mathbf 1^\top A`, of ``op``.

    Parameters
    ----------
    op : ChainOperator or Tensor, shape (..., N, N)
        The attention chain (a tensor is wrapped in :class:`DenseChain`).

    Attributes
    ----------
    op : ChainOperator
    colsum : Tensor, shape (..., N)
        The column sums :math:`c_j = \sum_i A_{ij}` (how much attention key ``j`` receives).

    Raises
    ------
    ValueError
        A key column that no query attends to (:math:`c_j = 0`): the source chain has no step
        out of that token.

    Notes
    -----
    :math:`S_{ji} = A_{ij} / c_j`: from token ``j`` the chain steps to the queries that attend
    to ``j``, in proportion to how much they attend to it; ``S`` is row-stochastic. For a
    :class:`DenseChain` the matrix ``S`` is formed once (:func:`attnchain.source_chain`);
    for any other operator the products come from ``op`` alone, :math:`X S = \bigl(A (X
    \mathrm{diag}(c)^{-1})^\top\bigr)^\top` and :math:`S X = \mathrm{diag}(c)^{-1} (X^\top
    A)^\top`, with :math:`c` from one product :math:`\mathbf 1^\top A`.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    >>> SourceChain(A).dense()          # key 1 is attended to by query 0 only
    tensor([[0.3333, 0.6667],
            [1.0000, 0.0000]], dtype=torch.float64)

    See Also
    --------
    attnchain.source_chain : the dense matrix ``S``.
    attnchain.bounce : ``direction="source"`` runs this chain.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention` (the two directions of attention chains).
    """

    def __init__(self, op):
        op = as_operator(op)
        if isinstance(op, DenseChain):
            colsum = op.A.sum(-2)  # (..., N)
        else:
            ones = torch.ones(*op.batch_shape, 1, op.n, dtype=op.dtype, device=op.device)
            colsum = op.left(ones).squeeze(-2)
        if (colsum == 0).any():
            raise ValueError(f"A has zero columns (first at batch/column index "
                             f"{first_bad(colsum == 0)}): no query attends to that key, so "
                             "the source chain is undefined there")
        S = None
        if isinstance(op, DenseChain):
            S = DenseChain((op.A / colsum.unsqueeze(-2)).transpose(-1, -2), check=False)
        self._set(op, colsum, S)

    def _set(self, op: ChainOperator, colsum: Tensor, S: Optional[DenseChain]) -> "SourceChain":
        self.op, self.colsum, self._S = op, colsum, S
        self.n, self.batch_shape = op.n, op.batch_shape
        self.dtype, self.device, self.member_bytes = op.dtype, op.device, op.member_bytes
        return self

    def left(self, X: Tensor) -> Tensor:
        if self._S is not None:
            return self._S.left(X)
        return self.op.right((X / self.colsum.unsqueeze(-2)).mT).mT

    def right(self, X: Tensor) -> Tensor:
        if self._S is not None:
            return self._S.right(X)
        return self.op.left(X.mT).mT / self.colsum.unsqueeze(-1)

    def map_batch(self, fn) -> "SourceChain":
        S = None if self._S is None else self._S.map_batch(fn)
        return SourceChain.__new__(SourceChain)._set(self.op.map_batch(fn), fn(self.colsum, 1), S)

    def dense(self) -> Tensor:
        return self._S.A if self._S is not None else super().dense()


def mask_to_bias(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """An attention mask in additive form.

    Parameters
    ----------
    mask : Tensor or None
        Boolean keep-mask (``True`` = may attend) or an additive float mask.
    dtype : torch.dtype
        dtype of the returned bias.

    Returns
    -------
    Tensor or None
        ``0`` where attending is allowed and ``-inf`` where it is not (a float mask is only cast
        to ``dtype``); None for no mask.

    Raises
    ------
    ValueError
        ``mask`` is not a tensor.

    Examples
    --------
    >>> import torch
    >>> mask_to_bias(torch.tensor([True, False]))
    tensor([0., -inf])

    See Also
    --------
    attention_probs : uses the bias.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"attention mask must be a tensor, not {type(mask).__name__}")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def attention_logits(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Attention logits :math:`s\, Q K^\top + M`, computed in ``dtype``.

    Parameters
    ----------
    q : Tensor, shape (..., N_q, d)
    k : Tensor, shape (..., N_k, d)
    scale : float
        Logit scale ``s`` (usually :math:`d^{-1/2}`).
    bias : Tensor, optional
        Additive mask broadcastable to ``(..., N_q, N_k)`` (see :func:`mask_to_bias`).
    dtype : torch.dtype
        Computation dtype (inputs are cast to it first).

    Returns
    -------
    Tensor, shape (..., N_q, N_k)

    Raises
    ------
    RuntimeError
        From torch, when the shapes of ``q``, ``k`` and ``bias`` do not fit.

    Examples
    --------
    >>> import torch
    >>> attention_logits(torch.ones(1, 2), torch.ones(3, 2), scale=0.5)
    tensor([[1., 1., 1.]])

    See Also
    --------
    attention_probs

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(dtype)
    return s


def attention_probs(q: Tensor, k: Tensor, scale: float, bias: Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Post-softmax attention :math:`\operatorname{softmax}(s\, Q K^\top + M)` over the keys.

    Parameters
    ----------
    q : Tensor, shape (..., N_q, d)
    k : Tensor, shape (..., N_k, d)
    scale : float
        Logit scale ``s``.
    bias : Tensor, optional
        Additive mask broadcastable to ``(..., N_q, N_k)``, ``-inf`` on removed keys.
    dtype : torch.dtype
        Computation dtype (float32 by default, also for half-precision ``q`` and ``k``).

    Returns
    -------
    Tensor, shape (..., N_q, N_k)
        Row-stochastic: every row is a distribution over the keys.

    Raises
    ------
    RuntimeError
        From torch, when the shapes of ``q``, ``k`` and ``bias`` do not fit.

    Examples
    --------
    >>> import torch
    >>> q, k = torch.zeros(2, 4), torch.randn(3, 4)
    >>> attention_probs(q, k, scale=0.5)
    tensor([[0.3333, 0.3333, 0.3333],
            [0.3333, 0.3333, 0.3333]])

    See Also
    --------
    mask_to_bias, attention_logits
    attnchain.to_stochastic : the softmax of given logits, with checks.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    """
    return torch.softmax(attention_logits(q, k, scale, bias, dtype), dim=-1)


#: Row blocks of :class:`AttentionChain`: at most this many bytes of :math:`A` are held at once,
#: per device type (on CPU a block of rows fits in cache; see the Numerics page).
ATTENTION_BLOCK_BYTES = {"cpu": 32 * 2 ** 20, "cuda": 512 * 2 ** 20}

# blocks have at least this many rows (fewer chains at a time instead): small matrix products
# waste the CPU
_MIN_ROWS = 64


def _check_bias(bias: Tensor, N: int) -> Tensor:
    """The additive bias as ``(..., 1 or N, 1 or N)``, checked: no NaN, no ``+inf``."""
    if bias.ndim < 2:
        bias = bias.reshape(*([1] * (2 - bias.ndim)), *bias.shape)
    if bias.shape[-1] not in (1, N) or bias.shape[-2] not in (1, N):
        raise ValueError(f"mask of shape {tuple(bias.shape)} does not broadcast to the "
                         f"(..., {N}, {N}) attention logits")
    if bool(torch.isnan(bias).any()) or bool((bias == float("inf")).any()):
        raise ValueError("mask has NaN or +inf entries; an additive mask is 0 (or finite) where "
                         "attending is allowed and -inf where it is not")
    return bias


class AttentionChain(ChainOperator):
    r"""The attention chain :math:`A = \operatorname{softmax}(s\,QK^\top + M)`, computed from
    ``q`` and ``k`` block by block, never stored as an :math:`N \times N` matrix.

    Parameters
    ----------
    q, k : Tensor, shape (..., N, d)
        Queries and keys (self-attention: as many keys as queries, so that :math:`A` is a
        chain). Their batch shapes broadcast; half precision is upcast.
    scale : float, optional
        Logit scale :math:`s`; :math:`d^{-1/2}` if ``None``.
    mask : Tensor, optional
        A boolean keep-mask (``True`` = may attend) or an additive float mask :math:`M` (finite,
        or ``-inf`` on removed keys), broadcastable to ``(..., N, N)``: a key mask of shape
        ``(..., 1, N)`` costs nothing; a full ``(..., N, N)`` one is the caller's memory.
    causal : bool
        Query :math:`i` attends to keys :math:`j \le i` only (as ``is_causal`` in
        :func:`torch.nn.functional.scaled_dot_product_attention`); half of the blocks' work is
        skipped.
    dtype : torch.dtype, optional
        ``torch.float32`` (default; float64 input stays float64) or ``torch.float64``.
    block_bytes : int, optional
        Largest block of :math:`A` held at once (default :data:`ATTENTION_BLOCK_BYTES` of the
        device): rows of all chains of the batch, or of fewer chains at a time when a block
        would otherwise have fewer than 64 rows (a block has at least 64 rows, or all
        :math:`N` when :math:`N < 64`).
    sdpa : bool
        On CUDA in float32 without a ``mask``, compute :math:`AX` with
        :func:`~torch.nn.functional.scaled_dot_product_attention` (``X`` as the values).

    Attributes
    ----------
    bias : Tensor or None, shape (..., 1 or N, 1 or N)
        The additive mask :math:`M` (without the causal part).
    causal : bool
    lse : Tensor, shape (..., N)
        The row log-sum-exp :math:`\ell_i = \log \sum_j \exp(s\,q_i \cdot k_j + M_{ij})`.

    Raises
    ------
    ValueError
        ``q``/``k`` not real floating tensors of matching ``N`` and ``d`` (cross-attention is not
        a chain), NaN or infinite entries, a non-finite ``scale``, a ``mask`` that does not
        broadcast or holds NaN/``+inf``, batch shapes that do not broadcast, or a query row whose
        keys are all removed (its row of :math:`A` is not a distribution).

    Notes
    -----
    Building the operator takes one pass over the blocks of :math:`s\,QK^\top + M` for the row
    log-sum-exp :math:`\ell`; every entry is then known in closed form,
    :math:`A_{ij} = \exp(s\,q_i \cdot k_j + M_{ij} - \ell_i)`, so

    - :math:`AX` (``right``): for each block of rows :math:`R`, :math:`A_{R,:} X`;
    - :math:`XA` (``left``, the :math:`A^\top` direction): :math:`\sum_R X_{:,R} A_{R,:}`;

    each product recomputes the blocks of :math:`QK^\top`, holding one block of rows (at most
    ``block_bytes``) at a time: :math:`O(N d + N k)` memory besides that block, against
    :math:`N^2` for the matrix. On CUDA in float32 without a mask, ``right`` goes through
    :func:`~torch.nn.functional.scaled_dot_product_attention` with ``X`` as the values (fused
    kernels compute the same softmax without forming the block). Entries below the smallest normal
    float are computed as that number (about :math:`10^{-38}` in float32; subnormal arithmetic is
    an order of magnitude slower on CPUs): every entry of a softmax of finite logits is positive,
    and stays so; removed keys are exactly 0. Damping and the source chain come on top,
    analytically (:class:`DampedChain`, :class:`SourceChain`).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> q, k = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    >>> op = AttentionChain(q, k, causal=True)
    >>> op.n, tuple(op.batch_shape)
    (6, (2,))
    >>> A = attention_probs(q, k, 0.5, mask_to_bias(torch.ones(6, 6, dtype=torch.bool).tril()))
    >>> torch.allclose(op.dense(), A, atol=1e-6)
    True
    >>> x = torch.full((2, 1, 6), 1 / 6)
    >>> torch.allclose(op.left(x), x @ A, atol=1e-6)
    True

    See Also
    --------
    attention_probs : the dense matrix.
    attnchain.capture.QK.operator : the operator of a captured layer (``keep="qk"``).
    attnchain.token_rank, attnchain.lambda2, attnchain.bounce : run on it unchanged.

    References
    ----------
    .. [1] Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
       :cite:`erel2025attention`.
    .. [2] Dao et al., "FlashAttention", NeurIPS 2022 :cite:`dao2022flashattention` (attention
       recomputed from the saved log-sum-exp in its backward pass; the fused kernels behind
       ``scaled_dot_product_attention``).
    """

    def __init__(self, q, k, scale: Optional[float] = None, mask=None, causal: bool = False,
                 dtype: Optional[torch.dtype] = None, block_bytes: Optional[int] = None,
                 sdpa: bool = True):
        q, k = as_tensor(q, "q"), as_tensor(k, "k")
        for t, name in ((q, "q"), (k, "k")):
            check_real(t, name)
            if not t.is_floating_point() or t.ndim < 2:
                raise ValueError(f"{name} must be a floating tensor of shape (..., N, d), got "
                                 f"{t.dtype} of shape {tuple(t.shape)}")
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"q and k must have the same feature dimension d, got "
                             f"{q.shape[-1]} and {k.shape[-1]}")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(f"q has {q.shape[-2]} tokens and k has {k.shape[-2]}: a chain needs "
                             "as many keys as queries (self-attention)")
        if q.device != k.device:
            raise ValueError(f"q is on {q.device} and k on {k.device}")
        N, d = q.shape[-2:]
        if N == 0:
            raise ValueError("q and k have no tokens")
        dtype = compute_dtype(q if q.dtype == torch.float64 else k, dtype)
        if scale is None:
            scale = d ** -0.5
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
                or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        q, k = q.to(dtype), k.to(dtype)
        if not (bool(torch.isfinite(q).all()) and bool(torch.isfinite(k).all())):
            raise ValueError("q or k has NaN or infinite entries")
        batch = broadcast_batch(q.shape[:-2], k.shape[:-2], "q", "k")
        bias = None
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise ValueError(f"mask must be a tensor, not {type(mask).__name__}")
            bias = _check_bias(mask_to_bias(mask.to(q.device), dtype), N)
            batch = broadcast_batch(batch, bias.shape[:-2], "q and k", "mask")
            bias = bias.expand(*batch, *bias.shape[-2:])
        if block_bytes is None:
            block_bytes = ATTENTION_BLOCK_BYTES.get(q.device.type, ATTENTION_BLOCK_BYTES["cuda"])
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
            raise ValueError(f"block_bytes must be a positive int, got {block_bytes!r}")
        # augmented so that one product gives the exponent of A:
        # [s q_i, -lse_i] . [k_j, 1] = s q_i . k_j - lse_i (the last column is 0 until lse is known)
        qa = torch.cat([(q * scale).expand(*batch, N, d), q.new_zeros(*batch, N, 1)], -1)
        ka = torch.cat([k, k.new_ones(*k.shape[:-1], 1)], -1).expand(*batch, N, d + 1)
        self._set(qa, ka, bias, bool(causal), None, block_bytes, bool(sdpa))
        lse = self._row_lse()
        if bool(torch.isneginf(lse).any()):
            raise ValueError(f"query row {first_bad(torch.isneginf(lse))} (batch/row index) "
                             "attends to no key: every key is removed by the mask")
        qa[..., -1] = -lse
        self.lse = lse

    def _set(self, qa, ka, bias, causal, lse, block_bytes, sdpa) -> "AttentionChain":
        self._qa, self._ka, self.bias, self.causal, self.lse = qa, ka, bias, causal, lse
        self.block_bytes, self.sdpa = block_bytes, sdpa
        self.n, self.batch_shape = qa.shape[-2], qa.shape[:-2]
        self.dtype, self.device = qa.dtype, qa.device
        # the size of the map each product recomputes: the solvers then group (and stop)
        # chains as they would the dense maps, so each chain takes the passes it needs
        self.member_bytes = self.n * self.n * (torch.finfo(self.dtype).bits // 8)
        self._removed = None if bias is None or not bool(torch.isneginf(bias).any()) \
            else torch.isneginf(bias)
        return self

    @property
    def q(self) -> Tensor:
        """The queries times ``scale``, ``(..., N, d)``, in the compute dtype."""
        return self._qa[..., :-1]

    @property
    def k(self) -> Tensor:
        """The keys, ``(..., N, d)``."""
        return self._ka[..., :-1]

    def map_batch(self, fn) -> "AttentionChain":
        bias = None if self.bias is None else fn(self.bias, 2)
        lse = None if self.lse is None else fn(self.lse, 1)
        return AttentionChain.__new__(AttentionChain)._set(
            fn(self._qa, 2), fn(self._ka, 2), bias, self.causal, lse, self.block_bytes,
            self.sdpa)

    @property
    def positive(self) -> bool:
        """True when every entry of :math:`A` is positive (no removed key, not causal): the
        chain is then irreducible and aperiodic."""
        return not self.causal and self._removed is None

    # ------------------------------------------------------------------ blocks
    def _plan(self, members: int) -> tuple[int, int]:
        """``(chains, rows)``: products run on at most ``chains`` chains at a time, in blocks of
        ``rows`` rows, so that a block holds at most ``block_bytes`` of :math:`A` (or the
        blocks of ``_MIN_ROWS`` rows of one chain, when even those are larger)."""
        per_row = self.n * torch.finfo(self.dtype).bits // 8
        low = min(self.n, _MIN_ROWS)
        rows = self.block_bytes // (max(1, members) * per_row)
        if rows >= low:
            return members, min(self.n, rows)
        chains = max(1, self.block_bytes // (low * per_row))
        return chains, max(low, min(self.n, self.block_bytes // (chains * per_row)))

    def _run(self, kernel, X: Tensor, tail: int):
        """``kernel(op, X, rows)`` over pieces of the batch (see :meth:`_plan`); results have
        ``tail`` non-batch dimensions."""
        batch = self._out_batch(X)
        members = math.prod(batch)
        chains, rows = self._plan(members)
        if chains >= members:
            return kernel(self, X, rows)
        op = self.expand(*batch)
        X = X.expand(*batch, *X.shape[X.ndim - 2:])
        out = None
        lead = [range(n) for n in batch[:-1]]
        for idx in itertools.product(*lead):
            for c0 in range(0, batch[-1], chains):
                piece = (*idx, slice(c0, c0 + chains))
                y = kernel(op[piece], X[piece], rows)
                if out is None:
                    out = y.new_empty(*batch, *y.shape[y.ndim - tail:])
                out[piece] = y
        return out

    def _logits(self, r0: int, r1: int, removed: bool = True):
        r"""Rows ``r0:r1`` of :math:`s\,QK^\top + M - \ell` (before ``lse`` is known: of
        :math:`s\,QK^\top + M`), ``(*batch, r, nk)``, over keys ``0:nk`` (``nk = r1`` when
        causal: later keys are removed). ``removed``: set removed entries to ``-inf``."""
        nk = r1 if self.causal else self.n
        L = torch.matmul(self._qa[..., r0:r1, :], self._ka[..., :nk, :].mT)
        if self.bias is not None:
            b = self.bias if self.bias.shape[-2] == 1 else self.bias[..., r0:r1, :]
            L += b if b.shape[-1] == 1 else b[..., :nk]
        if self.causal and removed:
            L[..., r0:r1].masked_fill_(self._triangle(r0, r1), float("-inf"))
        return L, nk

    def _triangle(self, r0: int, r1: int) -> Tensor:
        r = r1 - r0
        return torch.ones(r, r, dtype=torch.bool, device=self.device).triu_(1)

    @staticmethod
    def _blocks(n: int, rows: int):
        return [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]

    def _row_lse(self) -> Tensor:
        def kernel(op, _, rows):
            out = op._qa.new_empty(op._qa.shape[:-1])
            floor = math.log(torch.finfo(op.dtype).tiny)
            for r0, r1 in op._blocks(op.n, rows):  # log-sum-exp in place: one block in memory
                L = op._logits(r0, r1)[0]
                m = L.amax(-1, keepdim=True)
                dead = torch.isneginf(m)  # every key removed
                m.masked_fill_(dead, 0.0)
                L.sub_(m).clamp_min_(floor).exp_()
                out[..., r0:r1] = L.sum(-1).log_().add_(m.squeeze(-1)).masked_fill_(
                    dead.squeeze(-1), float("-inf"))
                del L
            return out.unsqueeze(-1)

        return self._run(kernel, self._qa.new_empty(0, 0), 2).squeeze(-1)

    def _probs(self, r0: int, r1: int):
        """Rows ``r0:r1`` of :math:`A` over keys ``0:nk``: ``((*batch, r, nk), nk)``."""
        L, nk = self._logits(r0, r1, removed=False)  # removed entries are zeroed below
        floor = math.log(torch.finfo(self.dtype).tiny)
        L.clamp_min_(floor).exp_()
        if self._removed is not None:
            m = self._removed if self._removed.shape[-2] == 1 else self._removed[..., r0:r1, :]
            L.masked_fill_(m if m.shape[-1] == 1 else m[..., :nk], 0.0)
        if self.causal:
            L[..., r0:r1].masked_fill_(self._triangle(r0, r1), 0.0)
        return L, nk

    def _out_batch(self, X: Tensor) -> torch.Size:
        return torch.broadcast_shapes(self.batch_shape, X.shape[:-2])

    # ------------------------------------------------------------------ products
    def left(self, X: Tensor) -> Tensor:
        def kernel(op, X, rows):
            out = X.new_zeros(*op._out_batch(X), X.shape[-2], op.n)
            for r0, r1 in op._blocks(op.n, rows):
                P, nk = op._probs(r0, r1)
                out[..., :nk] += torch.matmul(X[..., r0:r1], P)
                del P  # before the next block is formed
            return out

        return self._run(kernel, X, 2)

    def right(self, X: Tensor) -> Tensor:
        if self.sdpa and self.device.type == "cuda" and self.dtype == torch.float32 \
                and self.bias is None:
            return self._run(AttentionChain._right_sdpa, X, 2)

        def kernel(op, X, rows):
            out = X.new_empty(*op._out_batch(X), op.n, X.shape[-1])
            for r0, r1 in op._blocks(op.n, rows):
                P, nk = op._probs(r0, r1)
                out[..., r0:r1, :] = torch.matmul(P, X[..., :nk, :])
                del P
            return out

        return self._run(kernel, X, 2)

    def _right_sdpa(self, X: Tensor, rows: int) -> Tensor:
        """:math:`AX` by ``scaled_dot_product_attention`` over blocks of ``rows`` queries, ``X``
        (padded to a multiple of 8 columns) as the values."""
        from torch.nn.functional import pad, scaled_dot_product_attention

        batch, N, c = self._out_batch(X), self.n, X.shape[-1]
        Xp = pad(X, (0, -c % 8))
        flat = lambda t: t.expand(*batch, *t.shape[-2:]).reshape(-1, 1, *t.shape[-2:])  # noqa
        q, k, v = flat(self.q), flat(self.k), flat(Xp)
        out = X.new_empty(q.shape[0], 1, N, v.shape[-1])
        for r0, r1 in self._blocks(N, rows):
            nk = r1 if self.causal else N
            keep = None  # causal: query r0 + t sees keys 0 .. r0 + t (a block-sized mask)
            if self.causal:
                keep = torch.ones(r1 - r0, nk, dtype=torch.bool, device=self.device).tril_(r0)
            out[:, :, r0:r1] = scaled_dot_product_attention(
                q[:, :, r0:r1], k[:, :, :nk], v[:, :, :nk], attn_mask=keep, scale=1.0)
            del keep
        return out.reshape(*batch, N, -1)[..., :c]

    def dense(self) -> Tensor:
        out = self._qa.new_zeros(*self.batch_shape, self.n, self.n)
        for r0, r1 in self._blocks(self.n, self._plan(math.prod(self.batch_shape))[1]):
            P, nk = self._probs(r0, r1)
            out[..., r0:r1, :nk] = P
            del P
        return out
