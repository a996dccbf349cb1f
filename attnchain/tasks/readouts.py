r"""Read-outs: maps over chosen target tokens, read off an attention chain.

Every task reads its maps through these functions, so that "row select" or "bounce 2" means the
same thing in every chapter and table. Each takes a batch of row-stochastic chains ``A`` of shape
``(..., N, N)`` (rows = queries, columns = keys), and where it has one a start token (or a batch
of them, or a distribution), and returns values over the ``targets`` tokens (e.g. the image
patches of a vision model: ``layout.image``; all ``N`` tokens by default), on ``A``'s device.

- :func:`row_select`: :math:`A_{ij}`, what query :math:`i` attends to (one sink step from
  :math:`e_i`).
- :func:`column_select`: :math:`A_{ij} / \sum_k A_{kj}` at query :math:`i`, who attends to key
  :math:`j` (one source step from :math:`e_j`).
- :func:`column_sum`: :math:`\sum_i A_{ij}`, how much key :math:`j` is attended
  (:math:`N \cdot u A`).
- :func:`bounce_maps`: :math:`(v_0 P^n)_j` for :math:`n = 0, \dots,` ``max_bounces``, sink or
  source (:func:`attnchain.bounce`).
- :func:`token_rank_map`: :math:`\pi_j` of the damped chain (:func:`attnchain.token_rank`).
- :func:`metastable_map`: the metastable state of :math:`j`
  (:func:`attnchain.metastable_states`).

:func:`upsample` turns patch maps into pixel maps for scoring against masks.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025 :cite:`erel2025attention`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import attnchain as ac

__all__ = [
    "row_select",
    "column_select",
    "column_sum",
    "bounce_maps",
    "token_rank_map",
    "metastable_map",
    "upsample",
]


def _at_targets(x: Tensor, targets) -> Tensor:
    """The last dimension of ``x`` restricted to ``targets`` (all of it for None)."""
    if targets is None:
        return x
    idx = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    n = x.shape[-1]
    if idx.numel() == 0 or bool(((idx < -n) | (idx >= n)).any()):
        raise ValueError(f"targets must be a non-empty set of token indices in [0, {n})")
    return x.index_select(-1, (idx % n).to(x.device))


def row_select(A, start, targets=None) -> Tensor:
    r"""Row select: what a query token attends to, :math:`A_{i, \text{targets}}`.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    start : int or integer Tensor broadcastable to ``A.shape[:-2]``
        The query token :math:`i` (one per chain for a tensor).
    targets : sequence of int, optional
        Key tokens to report (default all ``N``).

    Returns
    -------
    Tensor, shape (..., T)
        Row :math:`i` of each chain at the targets; equal to ``bounce_maps(A, i, 1)[..., 1, :]``
        (one sink step from :math:`e_i`), read by indexing.

    Raises
    ------
    ValueError
        ``A`` not row-stochastic, a start or target out of range.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    >>> row_select(A, 1)
    tensor([0.1000, 0.6000, 0.3000])
    >>> row_select(A, 1, targets=[1, 2])
    tensor([0.6000, 0.3000])

    See Also
    --------
    column_select, bounce_maps, attnchain.bounce
    """
    ac.check_stochastic(A)
    N = A.shape[-1]
    if isinstance(start, int) and not isinstance(start, bool):
        if not -N <= start < N:
            raise ValueError(f"start index {start} out of range for N = {N} tokens")
        rows = A[..., start, :]
    else:
        s = torch.as_tensor(start)
        if s.is_floating_point() or s.dtype == torch.bool:
            raise ValueError(f"start must be integer token indices, got dtype {s.dtype}")
        if bool(((s < -N) | (s >= N)).any()):
            raise ValueError(f"start indices out of range for N = {N} tokens")
        batch = torch.broadcast_shapes(A.shape[:-2], s.shape)
        s = (s.to(A.device).long() % N).expand(batch)
        rows = torch.gather(A.expand(*batch, N, N), -2, s[..., None, None].expand(*batch, 1, N))
        rows = rows[..., 0, :]
    return _at_targets(rows, targets)


def column_select(A, key, targets=None) -> Tensor:
    r"""Column select: who attends to a key token, :math:`A_{\text{targets}, j} / \sum_k A_{kj}`.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    key : int or integer Tensor broadcastable to ``A.shape[:-2]``
        The key token :math:`j`.
    targets : sequence of int, optional
        Query tokens to report (default all ``N``).

    Returns
    -------
    Tensor, shape (..., T)
        Column :math:`j` normalised to sum to one over all ``N`` queries (then restricted to the
        targets): one step of the source chain :func:`attnchain.source_chain` from :math:`e_j`.

    Raises
    ------
    ValueError
        ``A`` not row-stochastic, or column :math:`j` is zero (no query attends to it).

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    >>> column_select(A, 0)
    tensor([0.8333, 0.1667, 0.0000])

    See Also
    --------
    row_select, bounce_maps, attnchain.source_chain
    """
    return bounce_maps(A, key, 1, direction="source", targets=targets)[..., 1, :]


def column_sum(A, targets=None) -> Tensor:
    r"""Column sums: how much attention each key receives from all queries, :math:`\mathbf 1^\top A`.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    targets : sequence of int, optional
        Key tokens to report (default all ``N``).

    Returns
    -------
    Tensor, shape (..., T)
        :math:`\sum_i A_{ij}` for :math:`j` in the targets; :math:`N` times one sink step from the
        uniform distribution.

    Raises
    ------
    ValueError
        ``A`` not row-stochastic, or a target out of range.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    >>> column_sum(A)
    tensor([0.6000, 1.3000, 1.1000])

    See Also
    --------
    row_select, token_rank_map
    """
    ac.check_stochastic(A)
    return _at_targets(A, targets).sum(-2)


def bounce_maps(A, start, max_bounces: int, direction: str = "sink", targets=None) -> Tensor:
    r"""Multi-bounce maps :math:`v_n = v_0 P^n` for :math:`n = 0, \dots,` ``max_bounces``.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    start : int, integer Tensor (...,), or Tensor (..., N)
        Start token(s) or a start distribution :math:`v_0` (see :func:`attnchain.bounce`).
    max_bounces : int
        Largest number of bounces :math:`n`.
    direction : {"sink", "source"}
        ``"sink"``: :math:`P = A` (mass flows to attended keys; :math:`n = 1` from :math:`e_i` is
        :func:`row_select`); ``"source"``: :math:`P` = the source chain (:math:`n = 1` from
        :math:`e_j` is :func:`column_select`).
    targets : sequence of int, optional
        Tokens to report (default all ``N``).

    Returns
    -------
    Tensor, shape (..., max_bounces + 1, T)
        :math:`v_0, \dots, v_{\text{max\_bounces}}` at the targets.

    Raises
    ------
    ValueError
        As :func:`attnchain.bounce`, or a target out of range.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.5, 0.5, 0.0], [0.1, 0.6, 0.3], [0.0, 0.2, 0.8]])
    >>> bounce_maps(A, 0, 2)
    tensor([[1.0000, 0.0000, 0.0000],
            [0.5000, 0.5000, 0.0000],
            [0.3000, 0.5500, 0.1500]])
    >>> bounce_maps(A, 0, 2, targets=[2])[..., 0]
    tensor([0.0000, 0.0000, 0.1500])

    See Also
    --------
    attnchain.bounce, attnchain.choose_bounces
    """
    return _at_targets(ac.bounce(A, start, max_bounces, direction=direction), targets)


def token_rank_map(A, targets=None, alpha: float = 0.99, personalization=None) -> Tensor:
    r"""TokenRank at the target tokens: the stationary distribution of the damped chain.

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    targets : sequence of int, optional
        Tokens to report (default all ``N``).
    alpha : float
        Damping (0.99 in the paper).
    personalization : Tensor (..., N), optional
        Teleport distribution :math:`p` (uniform by default).

    Returns
    -------
    Tensor, shape (..., T)
        :math:`\pi` of :func:`attnchain.token_rank` at the targets (it sums to one over all
        ``N`` tokens, not over the targets).

    Raises
    ------
    ValueError
        As :func:`attnchain.token_rank`, or a target out of range.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    >>> token_rank_map(A, alpha=1.0).round(decimals=4)
    tensor([0.3333, 0.6667])

    See Also
    --------
    attnchain.token_rank, attnchain.stationary_dense
    """
    pi = ac.token_rank(A, alpha=alpha, personalization=personalization)
    return _at_targets(pi, targets)


def metastable_map(A, targets=None, k: Optional[int] = None) -> Tensor:
    r"""Metastable state of each target token (spectral clustering of the whole chain).

    Parameters
    ----------
    A : Tensor, shape (..., N, N)
        Row-stochastic attention.
    targets : sequence of int, optional
        Tokens to report (default all ``N``).
    k : int, optional
        Number of states; None picks it from the largest spectral gap
        (:func:`attnchain.metastable_states`).

    Returns
    -------
    LongTensor, shape (..., T)
        State labels in ``0 .. k - 1`` of the states found on all ``N`` tokens, read at the
        targets.

    Examples
    --------
    >>> import attnchain as ac
    >>> A, planted = ac.planted_chain([3, 3], leak=0.01, seed=0)
    >>> lab = metastable_map(A, k=2)
    >>> bool((lab[:3] == lab[0]).all() and (lab[3:] == lab[3]).all() and lab[0] != lab[3])
    True

    See Also
    --------
    attnchain.metastable_states
    """
    return _at_targets(ac.metastable_states(A, k=k), targets)


def upsample(maps: Tensor, size, mode: str = "bilinear") -> Tensor:
    """Patch maps ``(B, r, c)`` to pixel maps ``(B, H, W)`` (:func:`torch.nn.functional.interpolate`).

    Parameters
    ----------
    maps : Tensor, shape (B, r, c)
        One map per image on its patch grid.
    size : (int, int)
        Pixel size ``(H, W)``.
    mode : {"bilinear", "nearest"}
        ``"nearest"`` repeats each patch value over its pixels; ``"bilinear"`` interpolates
        between patch centres (``align_corners=False``).

    Returns
    -------
    Tensor, shape (B, H, W)
        float32, on ``maps``' device.

    Raises
    ------
    ValueError
        An unknown ``mode``.

    Examples
    --------
    >>> import torch
    >>> upsample(torch.tensor([[[0.0, 1.0]]]), (1, 4), "nearest")
    tensor([[[0., 0., 1., 1.]]])

    See Also
    --------
    attnchain.metrics.foreground_scores
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    x = maps.float()[:, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **kw)[:, 0]
