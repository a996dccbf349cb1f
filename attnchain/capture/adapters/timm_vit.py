r"""Capture adapter for timm's ``Attention`` (VisionTransformer: DINO, DINOv2 with registers, CLIP
image towers, supervised ViT, DeiT, ...).

timm's ``Attention.forward`` passes ``q`` and ``k`` through ``q_norm`` and ``k_norm``
(``nn.Identity`` unless the model uses QK-norm) right before the attention kernel, so their
outputs are exactly the ``(B, H, N, d)`` tensors the kernel multiplies; ``attn_mask`` and
``is_causal`` are the module's arguments. The scale is :math:`d^{-1/2}` on the fused path (SDPA's
default) and the module's ``scale`` on the explicit one.

Tokens: ``[CLS] [REG_1 .. REG_r] [patch_(0,0) .. patch_(h-1,w-1)]`` (timm's ``_pos_embed``
order), from the enclosing ``VisionTransformer`` (``cls_token``, ``num_prefix_tokens``); the grid
``(h, w)`` from the image size its ``patch_embed`` sees on each call (so ``dynamic_img_size``
models at other resolutions get the right grid).

**References**

:cite:`dosovitskiy2021vit`, :cite:`darcet2024registers`; timm:
https://github.com/huggingface/pytorch-image-models
"""
from __future__ import annotations

import sys
from typing import Any

from torch import Tensor, nn

from attnchain.capture.core import Call, Observation, Site

__all__ = ["matches", "sites", "observers", "read"]


def _attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if "timm" not in sys.modules or not isinstance(model, nn.Module):
        return []   # a timm model cannot exist without timm being imported
    from timm.layers import Attention
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, Attention) and type(m).forward is Attention.forward
            and isinstance(getattr(m, "q_norm", None), nn.Module)
            and isinstance(getattr(m, "k_norm", None), nn.Module)]


def matches(model: Any) -> bool:
    """True when ``model`` contains a timm ``Attention`` module (that keeps timm's forward)."""
    return bool(_attention_layers(model))


def sites(model: nn.Module) -> list[Site]:
    """``blocks.0.attn`` ... with taps on ``q_norm``/``k_norm``; ``info`` = the owning ViT."""
    vits = [n for n, m in model.named_modules() if hasattr(m, "num_prefix_tokens")
            and isinstance(getattr(m, "patch_embed", None), nn.Module)]
    out = []
    for name, attn in _attention_layers(model):
        owner = max((v for v in vits if v == "" or name.startswith(v + ".")), key=len, default=None)
        out.append(Site(name, attn, taps=[("q", attn.q_norm), ("k", attn.k_norm)],
                        info=None if owner is None else (owner, model.get_submodule(owner))))
    return out


def _grid(patch_embed: nn.Module, x: Any) -> tuple[int, int] | None:
    if not (isinstance(x, Tensor) and x.ndim == 4):   # already-embedded input: configured grid
        g = getattr(patch_embed, "grid_size", None)
        return None if g is None else (int(g[0]), int(g[1]))
    hw = (int(x.shape[-2]), int(x.shape[-1]))
    if hasattr(patch_embed, "dynamic_feat_size"):
        g = patch_embed.dynamic_feat_size(hw)
        return int(g[0]), int(g[1])
    ps = getattr(patch_embed, "patch_size", None)
    if ps is None:
        return None
    ps = (ps, ps) if isinstance(ps, int) else ps
    return hw[0] // ps[0], hw[1] // ps[1]


def observers(model: nn.Module, sites: list[Site]) -> list:
    """The grid of each owning ViT, from its ``patch_embed``'s input."""
    owners = {s.info[0]: s.info[1] for s in sites if s.info is not None}

    def watch(owner, vit):
        def fn(ctx, args):
            ctx[owner] = _grid(vit.patch_embed, next(iter(args.values()), None))
        return vit.patch_embed, fn

    return [watch(owner, vit) for owner, vit in sorted(owners.items())]


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


def read(site: Site, call: Call) -> Observation:
    """``q_norm``/``k_norm`` outputs, the kernel's scale, ``attn_mask``/``is_causal``, layout."""
    attn, q = site.module, call.tap("q")
    scale = q.shape[-1] ** -0.5 if getattr(attn, "fused_attn", False) else float(attn.scale)
    owner, vit = site.info or (None, None)
    return Observation(q=q, k=call.tap("k"), scale=scale, mask=call.args.get("attn_mask"),
                       is_causal=bool(call.args.get("is_causal", False)),
                       tokens=_layout(vit, call.ctx.get(owner), q.shape[-2]))
