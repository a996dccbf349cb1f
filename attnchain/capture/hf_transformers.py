"""Capture adapter for transformers encoders: the BERT family (BERT, RoBERTa, XLM-R, CamemBERT,
ELECTRA; the offline MiniLM is a BERT) and the ViT family (ViT, DeiT, DINOv2, DINOv2 with
registers).

How (observation, not replacement)
----------------------------------
In transformers 5.x these self-attention modules (``BertSelfAttention``, ``ViTAttention``, ...)
project ``hidden_states`` with ``query``/``key`` (``q_proj``/``k_proj`` in the ViT family)
``nn.Linear`` layers, reshape to ``(B, H, N, d)`` and call the configured attention function
(SDPA by default, eager, flash, ...) with ``scaling = d^{-1/2}`` and the prepared mask. No
rotary embedding or norm sits between the projection and the kernel in these families, so
forward hooks on the two projections observe ``Q`` and ``K`` exactly, and a keyword-aware
pre-hook on the attention module observes ``attention_mask``: a boolean keep-mask
(``sdpa``), an additive float mask (``eager``) or None (no padding). The recorder forms

.. math:: A_h = \\operatorname{softmax}(s\\, Q_h K_h^\\top + M),

and the model's own computation is untouched, so its outputs are bit-identical. Padded keys get
probability exactly zero (``M = -inf`` or the dtype's minimum, whose ``exp`` underflows to 0).

Families are recognised by the module's defining ``transformers.models.<family>`` package;
other architectures (rotary embeddings, relative position biases) are not claimed, because
hooks on the projections would not see what their kernels multiply.

Tokens
------
Text: ``[CLS]`` at 0, all other positions (including ``[SEP]`` and padding) ``text``.
Vision: ``[CLS]`` at 0, then the DeiT distillation token or DINOv2 registers as ``registers``,
then the patches in raster order with the grid from the ``pixel_values`` size.

References
----------
Devlin et al., "BERT", NAACL 2019. Wang et al., "MiniLM", NeurIPS 2020. Dosovitskiy et al.,
"An Image is Worth 16x16 Words", ICLR 2021.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from ._scratch import CallScratch

__all__ = ["matches", "attention_layers", "install", "TEXT_FAMILIES", "VISION_FAMILIES"]

TEXT_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra")
VISION_FAMILIES = ("vit", "deit", "dinov2", "dinov2_with_registers")
_PROJ = (("query", "key"), ("q_proj", "k_proj"))


def _family(m: nn.Module) -> str | None:
    mod = type(m).__module__
    if not mod.startswith("transformers.models."):
        return None
    fam = mod.split(".")[2]
    return fam if fam in TEXT_FAMILIES + VISION_FAMILIES else None


def _projections(m: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """The (query, key) projections of a self-attention module we can observe, else None."""
    if _family(m) is None or "Cross" in type(m).__name__:
        return None
    if not hasattr(m, "scaling") or not hasattr(m, "config"):
        return None
    for qn, kn in _PROJ:
        q, k = getattr(m, qn, None), getattr(m, kn, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


def matches(model: Any) -> bool:
    """True when ``model`` contains a supported transformers self-attention module."""
    if "transformers" not in sys.modules or not isinstance(model, nn.Module):
        return False
    return any(_projections(m) is not None for m in model.modules())


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, attention)]``, e.g. ``encoder.layer.0.attention.self`` (BERT) or
    ``encoder.layer.0.attention`` (ViT)."""
    return [(n, m) for n, m in model.named_modules() if _projections(m) is not None]


def _heads(m: nn.Module) -> tuple[int, int]:
    h = getattr(m, "num_attention_heads", None) or m.config.num_attention_heads
    d = getattr(m, "attention_head_size", None) or getattr(m, "head_dim", None)
    return int(h), int(d)


def _layout(m: nn.Module, n: int, hw: tuple[int, int] | None) -> dict:
    fam = _family(m)
    if fam in TEXT_FAMILIES:
        spec: dict[str, Any] = {"kind": f"{fam}-text", "cls": (0, 1)}
        if n > 1:
            spec["text"] = (1, n)
        return spec
    cfg = m.config
    extra = 1 if fam == "deit" else int(getattr(cfg, "num_register_tokens", 0) or 0)
    prefix = 1 + extra
    spec = {"kind": f"{fam}-vision", "cls": (0, 1)}
    if extra:
        spec["registers"] = (1, prefix)
    if n > prefix:
        spec["image"] = (prefix, n)
        p = getattr(cfg, "patch_size", None)
        if hw is not None and p:
            p = (p, p) if isinstance(p, int) else tuple(p)
            grid = (hw[0] // p[0], hw[1] // p[1])
            if grid[0] * grid[1] == n - prefix:
                spec["grid"] = grid
    return spec


def install(model: nn.Module, recorder: Any) -> list[Callable[[], None]]:
    """Hook the query/key projections and the mask of every selected self-attention module."""
    undo: list[Callable[[], None]] = []
    ctx: dict[str, Any] = {"hw": None}
    try:
        for _, m in model.named_modules():
            if type(m).__name__.endswith("PatchEmbeddings") and _family(m) in VISION_FAMILIES:
                def pe_pre(mod, args, kwargs):
                    x = args[0] if args else kwargs.get("pixel_values")
                    if isinstance(x, Tensor) and x.ndim == 4:
                        ctx["hw"] = (int(x.shape[-2]), int(x.shape[-1]))
                undo.append(m.register_forward_pre_hook(pe_pre, with_kwargs=True).remove)
        for name, m in attention_layers(model):
            if recorder.wants_layer(name):
                undo.extend(_install_layer(name, m, recorder, ctx))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return undo


def _install_layer(name, m, recorder, ctx):
    qproj, kproj = _projections(m)
    heads, d = _heads(m)
    st = CallScratch(recorder, name)

    def start(module, args, kwargs):
        if kwargs.get("past_key_values") is not None:
            raise ValueError(f"attnchain capture: {name}: cached keys (past_key_values) are not "
                             "supported; capture a forward pass without a cache")
        if kwargs.get("encoder_hidden_states") is not None:
            return None  # used as cross-attention: not a self-attention map
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        if mask is not None and not isinstance(mask, Tensor):
            raise ValueError(f"attnchain capture: {name}: attention mask of type "
                             f"{type(mask).__name__} (e.g. flex attention's BlockMask) is not "
                             "supported; load the model with attn_implementation='sdpa' or 'eager'")
        return {"mask": mask}

    def record(q, k):
        b, n_q = q.shape[0], q.shape[1]
        q = q.view(b, n_q, heads, d).transpose(1, 2)
        k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
        mask = st.pop("mask", None)
        causal = mask is None and bool(getattr(m, "is_causal", False)) and n_q > 1
        recorder.record_qk(name, q, k, scale=float(m.scaling), mask=mask, is_causal=causal,
                           tokens=_layout(m, n_q, ctx["hw"]))

    st.watch(m, start)
    st.stash(qproj, "q")
    st.pair(kproj, "q", record)
    return st.undo
