"""Record post-softmax attention from real models without changing their outputs.

Usage
-----
>>> with attnchain.capture(model) as rec:             # doctest: +SKIP
...     model(x)
>>> rec.attentions["blocks.3.attn"].shape              # (B, H, N_q, N_k)  # doctest: +SKIP
>>> rec.tokens["blocks.3.attn"].registers, rec.layout.grid   # doctest: +SKIP

Keys are the model's own module names (``model.get_submodule(name)`` is the attention module),
in model order. Fused attention (SDPA, flash) stays on: adapters only *observe* queries and keys
with hooks, and the recorder forms ``softmax(s · Q Kᵀ + M)`` itself (see
:mod:`attnchain.capture.recorder`).

How an adapter plugs in (for adapter authors)
---------------------------------------------
An adapter is a module listed in :data:`ADAPTERS`, imported lazily the first time a
``capture`` context opens; a listed module that does not exist (yet) or fails to import is
skipped (the failure is reported if no other adapter matches). It defines three functions:

``matches(model) -> bool``
    True when this adapter handles ``model`` (any object; must not raise and should not import
    heavy libraries just to say no).
``attention_layers(model) -> list[tuple[str, nn.Module]]``
    Every attention layer it can capture, ``(name, module)``, in model order. Names must be
    stable and readable -- normally ``model.named_modules()`` names. The core concatenates the
    lists of all matching adapters and resolves ``layers=`` (names, glob patterns, integer
    indices into that list, or a predicate) before any install.
``install(model, recorder) -> list[callable]``
    Registers hooks (or swaps processors) for the layers with ``recorder.wants_layer(name)``
    and returns undo callables; the core calls them in reverse order on exit, also after an
    exception. If ``install`` itself fails it must undo what it did before raising.

At run time an adapter, for each call of a selected layer:

1. checks ``recorder.wants(name)`` (layer selected, current step selected, context open) and
   skips all work otherwise;
2. calls ``recorder.record_qk(name, q, k, scale=s, mask=m, tokens=layout)`` with
   ``q (B, H, N_q, d)`` and ``k (B, H, N_k, d)`` exactly as the kernel multiplies them (after
   QK-norm/RoPE, before scaling), ``m`` a boolean keep-mask (True = may attend) or additive
   float mask broadcastable to ``(B, H, N_q, N_k)`` (``bias=`` is an alias), ``is_causal=``
   as SDPA; or ``recorder.record_probs(name, probs, tokens=layout)`` when only the
   probabilities are observable (then ``keep="qk"`` raises);
3. describes the token sequence with ``tokens=``: a :class:`TokenLayout` or a dict
   ``{"cls": ..., "registers": ..., "text": ..., "image": ..., "grid": (h, w), "kind": str}``
   where a 2-tuple is a half-open range ``(start, stop)`` and a list/tensor explicit positions;
   ``key_tokens=`` likewise for the key sequence of cross-attention.

Steps: when the captured object is an ``nn.Module``, the core counts its forward calls
(``recorder.step``, 0-based) with a pre-hook registered before the adapters' hooks;
``recorder.begin_step()`` is then a no-op, so adapters may call it anyway. For other objects
(a pipeline) an adapter calls ``recorder.begin_step()`` at the start of each denoiser call.
``recorder.wants_step()`` says whether the current step is selected.

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from torch import nn

from attnchain.capture.probe import AttentionProbs
from attnchain.capture.recorder import QK, ROLES, Recorder, TokenLayout

__all__ = ["capture", "Recorder", "TokenLayout", "QK", "AttentionProbs", "ADAPTERS",
           "available_layers", "ROLES"]

#: adapter modules, tried in this order.
ADAPTERS = (
    "attnchain.capture.probe_adapter",
    "attnchain.capture.timm_vit",
    "attnchain.capture.hf_transformers",
    "attnchain.capture.diffusers_unet",
    "attnchain.capture.diffusers_flux",
)

_loaded: dict[str, Any] = {}


def _adapter(modname: str) -> tuple[Any | None, str | None]:
    """Import one adapter lazily; (module, None) or (None, why it is unavailable)."""
    if modname in _loaded:
        return _loaded[modname], None
    try:
        if importlib.util.find_spec(modname) is None:
            return None, "not written yet"
        mod = importlib.import_module(modname)
    except Exception as err:  # an adapter still being written must not break the others
        return None, f"import failed: {err!r}"
    for fn in ("matches", "attention_layers", "install"):
        if not callable(getattr(mod, fn, None)):
            return None, f"has no {fn}()"
    _loaded[modname] = mod
    return mod, None


def _matching(model: Any) -> tuple[list[Any], dict[str, str]]:
    found, skipped = [], {}
    for modname in ADAPTERS:
        mod, why = _adapter(modname)
        if mod is None:
            skipped[modname] = why
            continue
        if mod.matches(model):
            found.append(mod)
    return found, skipped


def _model_order(model: Any, names: list[str]) -> list[str]:
    if not isinstance(model, nn.Module):
        return names
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted(names, key=lambda n: (order.get(n, len(order)), names.index(n)))


def available_layers(model: Any) -> list[str]:
    """Names of every attention layer ``capture`` can record in ``model``, in model order."""
    adapters, skipped = _matching(model)
    if not adapters:
        raise ValueError(_no_adapter_message(model, skipped))
    names = [n for a in adapters for n, _ in a.attention_layers(model)]
    return _model_order(model, names)


def _no_adapter_message(model: Any, skipped: dict[str, str]) -> str:
    msg = (f"attnchain.capture: no adapter handles {type(model).__name__} (supported: timm "
           "VisionTransformer, transformers BERT-family/ViT encoders, diffusers UNet2DCondition"
           "Model and FluxTransformer2DModel, models with attnchain AttentionProbs modules)")
    if skipped:
        msg += "; unavailable adapters: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
    return msg


def _install(rec: Recorder) -> None:
    """Install the adapters' hooks for ``rec`` (called by ``Recorder.__enter__``)."""
    model = rec._model
    adapters, skipped = _matching(model)
    if not adapters:
        raise ValueError(_no_adapter_message(model, skipped))
    names = [n for a in adapters for n, _ in a.attention_layers(model)]
    if not names:
        raise ValueError(f"attnchain.capture: {type(model).__name__} has no attention layer that "
                         f"{', '.join(a.__name__ for a in adapters)} can capture")
    rec._resolve_layers(_model_order(model, names))
    rec._adapters = [a.__name__.rsplit(".", 1)[-1] for a in adapters]
    try:
        if isinstance(model, nn.Module):
            rec.core_counts_steps = True
            rec._undo.append(model.register_forward_pre_hook(rec._core_step).remove)
        for a in adapters:
            undo = a.install(model, rec)
            rec._undo.extend(undo)
    except BaseException:
        rec.close()
        raise
    rec.active = True


def capture(model: Any, layers=None, heads=None, reduce=None, dtype=None, *, steps=None,
            rows=None, cols=None, keep: str = "probs", step_reduce: str | None = None,
            detach: bool = True) -> Recorder:
    """Context manager that records the post-softmax attention of ``model``'s layers.

    Parameters
    ----------
    model : nn.Module (or an object an adapter matches)
        A timm ``VisionTransformer``, a transformers BERT-family or ViT model, a diffusers
        ``UNet2DConditionModel`` / ``FluxTransformer2DModel``, or any model whose attention goes
        through :class:`~attnchain.capture.probe.AttentionProbs`.
    layers : None, str, int, sequence of those, or callable
        Which layers: None = all; names (exact or ``fnmatch`` patterns such as
        ``"blocks.1*.attn"``); integer indices into :func:`available_layers`; or a predicate
        ``name -> bool``.
    heads : None, int or sequence of int
        Heads to keep (before any reduction).
    steps : None, int, sequence of int, or callable
        Which forward calls (denoising steps, 0-based) to record.
    reduce : None, "mean", "lambda2" or callable
        On-the-fly head reduction: plain head mean (computed head block by head block), the
        λ2-weighted head mean :func:`attnchain.spectral.weighted_head_mean` (weights from the
        full square maps, before ``rows``/``cols``), or ``f((B, H, N_q, N_k)) -> Tensor``.
        Reduced maps are ``(B, N_q, N_k)``.
    dtype : torch.dtype, optional
        Storage dtype (default float32; ``torch.float16``/``bfloat16`` halve memory). The
        softmax is always computed in float32 (float64 if ``dtype=torch.float64``).
    rows, cols : None, sequence of int, role name(s) or callable
        Keep only these query rows / key columns. Role names (``"cls"``, ``"registers"``,
        ``"prefix"``, ``"text"``, ``"image"``) resolve per layer through its token layout; a
        callable gets the layout and returns positions. The softmax is over all keys, so rows
        restricted in ``cols`` no longer sum to one.
    keep : "probs" or "qk"
        ``"qk"`` stores queries and keys only (:attr:`Recorder.qk`), never the ``N × N`` map;
        ``rec.qk[name].probs()`` or :mod:`attnchain.implicit` compute from them later.
    step_reduce : None, "mean", "stack" or "last"
        Several recorded calls of a layer: running mean (default for maps; a mean of
        row-stochastic maps is row-stochastic), stacked along a new leading dim (default for
        ``keep="qk"``), or the last one.
    detach : bool
        Record detached tensors (default), so capture never keeps an autograd graph alive.

    Returns
    -------
    Recorder
        Use it as a context manager; hooks live only inside the ``with`` block and are removed
        on exit, also after an exception.

    Notes
    -----
    For a selected layer and call, with queries ``Q_h`` and keys ``K_h`` of head ``h`` observed
    right where the model's kernel consumes them,
    ``A_h = softmax(s Q_h K_hᵀ + M)`` with the layer's scale ``s`` and additive mask ``M``.
    The model's outputs are bit-identical with and without capture because nothing in the
    model's computation is replaced. Maps are the pre-dropout probabilities (models in training
    mode apply attention dropout after them). The map is formed in float32 even for a half
    precision model, so it can differ from the model's own fp16 kernel by fp16 rounding.

    References
    ----------
    Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657.
    """
    rec = Recorder(layers=layers, heads=heads, steps=steps, reduce=reduce, rows=rows, cols=cols,
                   dtype=dtype, keep=keep, step_reduce=step_reduce, detach=detach)
    rec._model = model
    return rec


class _CallableModule(type(importlib)):
    """Makes ``attnchain.capture(model)`` work whether ``attnchain.capture`` names this package
    or the function (the package is callable and forwards to :func:`capture`)."""

    def __call__(self, *args, **kwargs):
        return capture(*args, **kwargs)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule
