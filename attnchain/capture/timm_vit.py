"""Capture adapter for timm's ``Attention`` (VisionTransformer: DINO, DINOv2 with registers, CLIP
image towers, supervised ViT, DeiT, ...).

How (observation, not replacement)
----------------------------------
timm's ``Attention.forward`` computes ``q, k, v`` from ``qkv(x)``, then passes ``q`` and ``k``
through ``q_norm`` and ``k_norm`` (``nn.Identity`` unless the model uses QK-norm) right before
the attention kernel (fused ``scaled_dot_product_attention`` or the explicit softmax). Forward
hooks on ``q_norm`` and ``k_norm`` therefore see exactly the ``(B, H, N, d)`` tensors the kernel
multiplies, and a keyword-aware pre-hook on the attention module sees ``attn_mask`` and
``is_causal``. Nothing in the computation changes, so the outputs are bit-identical; the map

.. math:: A_h = \\operatorname{softmax}(s\\, Q_h K_h^\\top + M)

is formed by the recorder, with ``s = d^{-1/2}`` on the fused path (SDPA's default) and the
module's ``scale`` on the explicit path.

Tokens
------
``[CLS] [REG_1 .. REG_r] [patch_(0,0) .. patch_(h-1,w-1)]`` (timm's ``_pos_embed`` order): the
layout comes from the enclosing ``VisionTransformer`` (``cls_token``, ``num_prefix_tokens``),
and the grid ``(h, w)`` from the image size seen by its ``patch_embed`` on each call (so
``dynamic_img_size`` models at other resolutions get the right grid).

References
----------
Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021. Darcet et al., "Vision
Transformers Need Registers", ICLR 2024. timm: https://github.com/huggingface/pytorch-image-models
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from ._scratch import CallScratch

__all__ = ["matches", "attention_layers", "install"]


def _attention_class():
    if "timm" not in sys.modules:   # a timm model cannot exist without timm being imported
        return None
    try:
        from timm.layers import Attention
    except ImportError:  # pragma: no cover - very old timm
        from timm.models.vision_transformer import Attention
    return Attention


def _is_plain_attention(m: nn.Module, cls) -> bool:
    """timm ``Attention`` (or a subclass that keeps its forward) with ``q_norm``/``k_norm``."""
    return (isinstance(m, cls) and type(m).forward is cls.forward
            and isinstance(getattr(m, "q_norm", None), nn.Module)
            and isinstance(getattr(m, "k_norm", None), nn.Module))


def matches(model: Any) -> bool:
    """True when ``model`` contains a timm ``Attention`` module."""
    cls = _attention_class()
    if cls is None or not isinstance(model, nn.Module):
        return False
    return any(_is_plain_attention(m, cls) for m in model.modules())


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(name, Attention)]`` in module order, e.g. ``blocks.0.attn`` ... ``blocks.11.attn``."""
    cls = _attention_class()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if _is_plain_attention(m, cls)]


def _is_vit(m: nn.Module) -> bool:
    return (hasattr(m, "num_prefix_tokens")
            and isinstance(getattr(m, "patch_embed", None), nn.Module))


def _owner_vits(model: nn.Module) -> dict[str, str]:
    """Map each attention layer name to the name of its closest VisionTransformer ancestor."""
    vits = [n for n, m in model.named_modules() if _is_vit(m)]
    owner = {}
    for name, _ in attention_layers(model):
        best = None
        for v in vits:
            if v == "" or name.startswith(v + "."):
                if best is None or len(v) > len(best):
                    best = v
        owner[name] = best
    return owner


def _grid(patch_embed: nn.Module, hw: tuple[int, int]) -> tuple[int, int] | None:
    if hasattr(patch_embed, "dynamic_feat_size"):
        try:
            g = patch_embed.dynamic_feat_size(hw)
            return int(g[0]), int(g[1])
        except Exception:  # pragma: no cover - defensive for unusual patch embeds
            pass
    ps = getattr(patch_embed, "patch_size", None)
    if ps is None:
        return None
    ps = (ps, ps) if isinstance(ps, int) else ps
    return hw[0] // ps[0], hw[1] // ps[1]


def _layout(vit: nn.Module | None, grid: tuple[int, int] | None, n: int) -> dict:
    if vit is None:
        return {"kind": "timm-attention"}
    n_prefix = int(getattr(vit, "num_prefix_tokens", 0))
    has_cls = getattr(vit, "cls_token", None) is not None
    n_reg = int(getattr(vit, "num_reg_tokens", n_prefix - int(has_cls)))
    spec: dict[str, Any] = {"kind": "timm-vit"}
    if has_cls:
        spec["cls"] = (0, 1)
    if n_reg:
        spec["registers"] = (int(has_cls), int(has_cls) + n_reg)
    if n > n_prefix:
        spec["image"] = (n_prefix, n)
        if grid is not None and grid[0] * grid[1] == n - n_prefix:
            spec["grid"] = grid
    return spec


def install(model: nn.Module, recorder: Any) -> list[Callable[[], None]]:
    """Hook ``q_norm``/``k_norm`` and the mask of every selected timm ``Attention``.

    Returns
    -------
    list of callables
        Each removes one hook.
    """
    undo: list[Callable[[], None]] = []
    owner = _owner_vits(model)
    grids: dict[str, tuple[int, int] | None] = {}
    try:
        for vname in sorted({v for v in owner.values() if v is not None}):
            vit = model.get_submodule(vname)

            def pe_pre(mod, args, _v=vname):
                x = args[0] if args else None
                if isinstance(x, Tensor) and x.ndim == 4:
                    grids[_v] = _grid(mod, (int(x.shape[-2]), int(x.shape[-1])))
                else:  # already-embedded input: fall back to the configured grid
                    g = getattr(mod, "grid_size", None)
                    grids[_v] = None if g is None else (int(g[0]), int(g[1]))

            undo.append(vit.patch_embed.register_forward_pre_hook(pe_pre).remove)

        for name, attn in attention_layers(model):
            if not recorder.wants_layer(name):
                continue
            undo.extend(_install_layer(name, attn, recorder, owner[name], model, grids))
    except BaseException:
        for fn in reversed(undo):
            fn()
        raise
    return undo


def _install_layer(name, attn, recorder, vname, model, grids):
    st = CallScratch(recorder, name)
    vit = model.get_submodule(vname) if vname is not None else None

    def start(module, args, kwargs):
        return {"mask": args[1] if len(args) > 1 else kwargs.get("attn_mask"),
                "causal": bool(args[2] if len(args) > 2 else kwargs.get("is_causal", False))}

    def record(q, k):
        n = q.shape[-2]
        scale = q.shape[-1] ** -0.5 if getattr(attn, "fused_attn", False) else float(attn.scale)
        tokens = _layout(vit, grids.get(vname), n)
        recorder.record_qk(name, q, k, scale=scale, mask=st.get("mask"),
                           is_causal=st.get("causal", False), tokens=tokens)

    st.watch(attn, start)
    st.stash(attn.q_norm, "q")
    st.pair(attn.k_norm, "q", record)
    return st.undo
