r"""Chain operators: a batch of row-stochastic chains one can multiply by.

This module is the one home of the attention softmax,

.. math:: A = \operatorname{softmax}\!\left(s\, Q K^\top + M\right),

with ``s`` the logit scale and ``M`` the additive form of a mask (:func:`mask_to_bias`).

References
----------
Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657
:cite:`erel2025attention`.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mask_to_bias", "attention_logits", "attention_probs"]


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

    Examples
    --------
    >>> import torch
    >>> attention_logits(torch.ones(1, 2), torch.ones(3, 2), scale=0.5)
    tensor([[1., 1., 1.]])

    See Also
    --------
    attention_probs
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
    """
    return torch.softmax(attention_logits(q, k, scale, bias, dtype), dim=-1)
