r"""Record post-softmax attention from real models without changing their outputs.

``with attnchain.capture(model) as rec: model(x)`` records, for every attention layer, the map
:math:`A_h = \operatorname{softmax}(s\,Q_h K_h^\top + M)` that the layer's kernel computes, keyed
by the model's own module names in model order (``rec.attentions["blocks.3.attn"]``), with each
layer's token layout (``rec.tokens[name]``: CLS, registers, text, image tokens and the patch grid).

Fused attention (SDPA, flash) stays on: the adapters only *observe* queries and keys with hooks,
and the recorder forms the softmax itself, so the model's outputs are bit-identical.

Layout of the package:

- :mod:`attnchain.capture.core`: the adapter interface and registry, installing and undoing hooks.
- :mod:`attnchain.capture.recorder`: the :class:`Recorder` and its records (:class:`QK`).
- :mod:`attnchain.capture.layout`: :class:`TokenLayout`.
- :mod:`attnchain.capture.probe`: :class:`AttentionProbs`, the capture point of models written in
  this project.
- ``attnchain.capture.adapters``: one module per architecture (timm ViT, transformers encoders,
  diffusers UNet and FLUX, AttentionProbs).

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains" :cite:`erel2025attention`.
"""
from __future__ import annotations

import sys
import types
from typing import Any

from attnchain.capture.core import (
    BUILTIN_ADAPTERS,
    available_layers,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from attnchain.capture.layout import ROLES, TokenLayout
from attnchain.capture.probe import AttentionProbs
from attnchain.capture.recorder import QK, STEP_REDUCTIONS, Recorder

__all__ = ["capture", "available_layers", "Recorder", "TokenLayout", "QK", "AttentionProbs",
           "ROLES", "STEP_REDUCTIONS", "BUILTIN_ADAPTERS", "register_adapter",
           "unregister_adapter", "registered_adapters"]


def capture(model: Any, layers=None, heads=None, weighting=None, dtype=None, *, steps=None,
            rows=None, cols=None, keep: str = "probs", step_reduce: str | None = None,
            detach: bool = True) -> Recorder:
    r"""Context manager that records the post-softmax attention of ``model``'s layers.

    Parameters
    ----------
    model : nn.Module or a pipeline
        A timm ``VisionTransformer``, a transformers BERT-family or ViT model, a diffusers
        ``UNet2DConditionModel`` or ``FluxTransformer2DModel`` (or a pipeline holding one as
        ``.unet`` / ``.transformer``), a model whose attention goes through
        :class:`AttentionProbs`, or anything a registered adapter handles.
    layers : None, str, int, sequence of those, or callable
        Which layers: None = all; names (exact or ``fnmatch`` patterns such as
        ``"blocks.1*.attn"``); integer indices into :func:`available_layers`; or a predicate
        ``name -> bool``.
    heads : None, int or sequence of int
        Heads to keep (before any weighting).
    weighting : None, "uniform", "lambda2" or callable
        Head reduction while recording (:data:`attnchain.spectral.HEAD_WEIGHTINGS`): the plain
        head mean, the :math:`|\lambda_2|`-weighted head mean of :func:`attnchain.head_mean`
        (weights from the full square maps, before ``rows``/``cols``), or
        ``f((B, H, N_q, N_k)) -> Tensor``. None keeps every head.
    dtype : torch.dtype, optional
        Storage dtype (default float32; ``torch.float16``/``bfloat16`` halve memory). The
        softmax is computed in float32 (float64 if ``dtype=torch.float64``).
    steps : None, int, sequence of int, or callable
        Which forward calls (denoising steps, 0-based) to record.
    rows, cols : None, sequence of int, role name(s) or callable
        Keep only these query rows / key columns. Role names (``"cls"``, ``"registers"``,
        ``"prefix"``, ``"text"``, ``"image"``) resolve per layer through its token layout; a
        callable gets the layout and returns positions. The softmax is over all keys, so rows
        restricted by ``cols`` no longer sum to one.
    keep : "probs" or "qk"
        ``"qk"`` stores queries and keys only (:attr:`Recorder.qk`), never the ``N × N`` map.
    step_reduce : None, "mean", "stack" or "last"
        How several recorded calls of a layer combine: running mean (the default for maps; a
        mean of row-stochastic maps is row-stochastic), stacked along a leading step dimension
        (the default for ``keep="qk"``), or the last call only.
    detach : bool
        Record detached tensors (default), so capture never keeps an autograd graph alive.

    Returns
    -------
    Recorder
        Use it as a context manager; hooks live only inside the ``with`` block and are removed
        on exit, also after an exception.

    Raises
    ------
    ValueError
        A bad option; no adapter handles ``model``; ``layers`` matches nothing; during a forward
        pass: out-of-range ``heads``/``rows``/``cols``, or a call that cannot be combined with
        the earlier ones (see Notes).
    attnchain.errors.AdapterError
        A registered adapter cannot be imported or lacks its interface.

    Notes
    -----
    **What is recorded.** For a selected layer and call, with queries :math:`Q_h` and keys
    :math:`K_h` of head :math:`h` observed where the model's kernel consumes them (after QK-norm
    and RoPE), :math:`A_h = \operatorname{softmax}(s\,Q_h K_h^\top + M)` with the layer's scale
    :math:`s` and additive mask :math:`M` (:func:`attnchain.operators.attention_probs`). Nothing
    in the model's computation is replaced, so its outputs are bit-identical with and without
    capture. Maps are pre-dropout probabilities. They are formed in float32 even for a half
    precision model, so they can differ from the model's own fp16 kernel by fp16 rounding.

    **Shape of a record**, one rule whatever the number ``S`` of recorded calls (steps):

    - ``step_reduce="mean"`` or ``"last"``: ``(B, H, N_q, N_k)``, or ``(B, N_q, N_k)`` with
      ``weighting="uniform"``/``"lambda2"``. Never a step dimension, also for many steps.
    - ``step_reduce="stack"``: the same with a leading step dimension, ``(S, B, H, N_q, N_k)``
      or ``(S, B, N_q, N_k)``; ``S = 1`` for a single call.
    - ``keep="qk"``: ``rec.qk[name].q`` is ``(S, B, H, N_q, d)`` under ``"stack"`` (its
      default) and ``(B, H, N_q, d)`` under ``"last"``; ``rec.qk[name].probs()`` has the shape
      of the map.

    ``heads``, ``rows`` and ``cols`` shrink ``H``, ``N_q`` and ``N_k``; a callable
    ``weighting`` gives what it returns (behind the step dimension under ``"stack"``).

    **Calls of different shapes.** ``"mean"`` and ``"stack"`` combine calls whose records have
    one shape and one token layout: averaging or stacking maps of different batch sizes (or
    image sizes) has no meaning, because batch entries of different calls are different inputs.
    A call that differs raises a ``ValueError`` naming the layer and both shapes, in that forward
    pass, before anything is stored: the record of the earlier calls stays readable and the
    hooks are removed as the error leaves the ``with`` block. ``"last"`` keeps the latest call
    whatever its shape. To record batches of different sizes, capture each batch in its own
    context.

    Examples
    --------
    >>> import torch, attnchain as ac
    >>> model, _ = ac.zoo.load("tiny-timm-vit")
    >>> x = torch.zeros(2, 3, 32, 32)
    >>> with torch.no_grad(), ac.capture(model) as rec:
    ...     _ = model(x)
    >>> list(rec.attentions), rec.attentions["blocks.0.attn"].shape
    (['blocks.0.attn', 'blocks.1.attn'], torch.Size([2, 4, 19, 19]))
    >>> rec.layout.cls, rec.layout.registers, rec.layout.grid
    ((0,), (1, 2), (4, 4))

    Head weighting, one layer, and the step dimension of ``"stack"``:

    >>> with torch.no_grad(), ac.capture(model, layers=-1, weighting="lambda2",
    ...                                  step_reduce="stack") as rec:
    ...     _ = model(x)
    >>> rec.attentions["blocks.1.attn"].shape
    torch.Size([1, 2, 19, 19])

    See Also
    --------
    available_layers : the layer names ``layers=`` resolves against.
    attnchain.head_mean : the head weightings.
    attnchain.capture.core.register_adapter : capture one more architecture.

    References
    ----------
    Erel et al., "Attention (as Discrete-Time Markov) Chains" :cite:`erel2025attention`.
    """
    return Recorder(model, layers=layers, heads=heads, steps=steps, weighting=weighting,
                    rows=rows, cols=cols, dtype=dtype, keep=keep, step_reduce=step_reduce,
                    detach=detach)


class _CallableModule(types.ModuleType):
    """Makes ``attnchain.capture(model)`` work whether ``attnchain.capture`` names this package
    or the function (the package is callable and forwards to :func:`capture`)."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
