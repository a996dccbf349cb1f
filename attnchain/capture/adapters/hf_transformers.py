r"""Capture adapter for transformers encoders: the BERT family (BERT, RoBERTa, XLM-R, CamemBERT,
ELECTRA; the offline MiniLM is a BERT) and the ViT family (ViT, DeiT, DINOv2, DINOv2 with
registers).

These self-attention modules (``BertSelfAttention``, ``ViTAttention``, ...) project the hidden
states with ``query``/``key`` (``q_proj``/``k_proj``) linear layers, reshape to ``(B, H, N, d)``
and call the configured kernel (SDPA, eager, ...) with ``scaling`` :math:`= d^{-1/2}` and the
prepared mask: a boolean keep-mask (SDPA), an additive float mask (eager) or None. No rotary
embedding or norm sits between projection and kernel in these families, so the projections'
outputs are exactly what the kernel multiplies. Padded keys get probability exactly zero.
Families are recognised by the defining ``transformers.models.<family>`` package; others (rotary
embeddings, relative position biases) are not claimed.

Tokens: text: ``[CLS]`` at 0, every other position ``text``. Vision: ``[CLS]`` at 0, the DeiT
distillation token or DINOv2 registers as ``registers``, then the patches in raster order, with
the grid from the ``pixel_values`` size.

**References**

:cite:`wang2020minilm`, :cite:`dosovitskiy2021vit`, :cite:`oquab2024dinov2`
"""
from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from attnchain.capture.core import Call, Observation, Site

__all__ = ["matches", "sites", "observers", "accept", "read", "TEXT_FAMILIES", "VISION_FAMILIES"]

TEXT_FAMILIES = ("bert", "roberta", "xlm_roberta", "camembert", "electra")
VISION_FAMILIES = ("vit", "deit", "dinov2", "dinov2_with_registers")


def _family(m: nn.Module) -> str | None:
    parts = type(m).__module__.split(".")
    fam = parts[2] if len(parts) > 2 and parts[:2] == ["transformers", "models"] else None
    return fam if fam in TEXT_FAMILIES + VISION_FAMILIES else None


def _projections(m: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """The (query, key) projections of a self-attention module we can observe, else None."""
    if _family(m) is None or "Cross" in type(m).__name__ or not hasattr(m, "scaling") \
            or not hasattr(m, "config"):
        return None
    for qn, kn in (("query", "key"), ("q_proj", "k_proj")):
        q, k = getattr(m, qn, None), getattr(m, kn, None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear):
            return q, k
    return None


def matches(model: Any) -> bool:
    """True when ``model`` contains a supported transformers self-attention module."""
    return "transformers" in sys.modules and isinstance(model, nn.Module) and \
        any(_projections(m) is not None for m in model.modules())


def sites(model: nn.Module) -> list[Site]:
    """``encoder.layer.0.attention.self`` (BERT) or ``encoder.layer.0.attention`` (ViT) ..."""
    return [Site(n, m, taps=list(zip("qk", proj))) for n, m in model.named_modules()
            if (proj := _projections(m)) is not None]


def observers(model: nn.Module, sites: list[Site]) -> list:
    """The image size, from the vision families' patch embeddings."""
    def fn(ctx, args):
        x = args.get("pixel_values")
        if isinstance(x, Tensor) and x.ndim == 4:
            ctx["hw"] = (int(x.shape[-2]), int(x.shape[-1]))
    return [(m, fn) for m in model.modules()
            if type(m).__name__.endswith("PatchEmbeddings") and _family(m) in VISION_FAMILIES]


def accept(site: Site, call: Call) -> bool:
    """Refuse cached keys and flex attention masks; skip calls used as cross-attention."""
    if any(call.args.get(a) is not None for a in ("past_key_values", "past_key_value", "cache")):
        raise ValueError(f"attnchain capture: {site.name}: cached keys (past_key_values) are not "
                         "supported; capture a forward pass without a cache")
    if call.args.get("encoder_hidden_states") is not None:
        return False   # used as cross-attention: not a self-attention map
    mask = call.args.get("attention_mask")
    if mask is not None and not isinstance(mask, Tensor):
        raise ValueError(f"attnchain capture: {site.name}: attention mask of type "
                         f"{type(mask).__name__} (e.g. flex attention's BlockMask) is not "
                         "supported; load the model with attn_implementation='sdpa' or 'eager'")
    return True


def _layout(m: nn.Module, n: int, hw: tuple[int, int] | None) -> dict:
    fam = _family(m)
    if fam in TEXT_FAMILIES:
        return {"kind": f"{fam}-text", "cls": (0, 1), "text": (1, n)}
    extra = 1 if fam == "deit" else int(getattr(m.config, "num_register_tokens", 0) or 0)
    spec: dict[str, Any] = {"kind": f"{fam}-vision", "cls": (0, 1), "registers": (1, 1 + extra),
                            "image": (1 + extra, n)}
    p = getattr(m.config, "patch_size", None)
    if hw is not None and p:
        p = (p, p) if isinstance(p, int) else tuple(p)
        if (hw[0] // p[0]) * (hw[1] // p[1]) == n - 1 - extra:
            spec["grid"] = (hw[0] // p[0], hw[1] // p[1])
    return spec


def read(site: Site, call: Call) -> Observation:
    """Projected queries and keys split into heads, ``scaling``, the mask, the layout."""
    m = site.module
    heads = int(getattr(m, "num_attention_heads", None) or m.config.num_attention_heads)
    q, k = (x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
            for x in (call.tap("q"), call.tap("k")))
    mask, n_q = call.args.get("attention_mask"), q.shape[-2]
    causal = mask is None and bool(getattr(m, "is_causal", False)) and n_q > 1
    return Observation(q=q, k=k, scale=float(m.scaling), mask=mask, is_causal=causal,
                       tokens=_layout(m, n_q, call.ctx.get("hw")))
