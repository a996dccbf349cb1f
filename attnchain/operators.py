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
from typing import Callable, Optional

import torch
from torch import Tensor

from ._validate import broadcast_batch, check_fraction, check_personalization, first_bad, prepare

__all__ = ["ChainOperator", "DenseChain", "DampedChain", "SourceChain", "as_operator",
           "mask_to_bias", "attention_logits", "attention_probs"]


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
    check its rows. A matrix-free operator from :math:`Q, K` needs, for :meth:`right`
    (:math:`A X`), the row-wise softmax of blocks of :math:`QK^\top`, and for :meth:`left`
    (:math:`X A`, the :math:`A^\top` direction) the row log-sum-exp of :math:`s\,QK^\top + M`
    once, kept as a length-:math:`N` tensor of the operator.

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
    DenseChain, DampedChain, SourceChain
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
