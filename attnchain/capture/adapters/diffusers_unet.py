r"""Capture adapter for diffusers' ``UNet2DConditionModel`` (Stable Diffusion) self-attention.

Every self-attention ``attn1`` of the UNet's transformer blocks
(``down_blocks.i.attentions.j.transformer_blocks.t.attn1``, ``mid_block...``, ``up_blocks...``).
At a block whose feature map is ``h × w`` the tokens are the ``N = h·w`` latent positions in
raster order, and

.. math:: A = \operatorname{softmax}\!\left(s\, Q K^\top + M\right),\qquad Q = X W_q,\ K = X W_k,

with ``X`` the block's normalised hidden states, ``s`` the processor's scale (``attn.scale`` for
the classic processors that call ``get_attention_scores``, :math:`d^{-1/2}` for the SDPA ones)
and ``M`` the mask as the processors prepare it. The processor (fused SDPA, xformers, sliced, ...)
stays in place; the taps are ``to_q``/``to_k`` (``to_qkv`` after ``fuse_qkv_projections``,
``norm_q``/``norm_k`` with QK-norm). The grid of each layer (64×64 ... 8×8 for SD1.5 at 512 px)
is the spatial size of the enclosing ``Transformer2DModel``'s input. A pipeline with a ``.unet``
is captured through it; each UNet call is one denoising step.

**References**

:cite:`rombach2022ldm`
"""
from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from attnchain.capture.core import Call, Observation, Site, denoiser_lookup

__all__ = ["matches", "root", "sites", "observers", "read"]

# processors that form probabilities with ``attn.scale``; the SDPA ones use SDPA's 1/sqrt(d)
_USES_ATTN_SCALE = {"AttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}


root, matches = denoiser_lookup("unet", "UNet2DConditionModel")


def _chunk(n: int, i: int):
    return lambda output: output.chunk(n, dim=-1)[i]


_STAGES = ("down_blocks", "mid_block", "up_blocks")  # the order a UNet computes its blocks in


def _computation_order(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` sorted by stage: down blocks, mid block, up blocks (a UNet registers
    ``mid_block`` after its up blocks)."""
    named = list(unet.named_modules())
    rank = {s: i for i, s in enumerate(_STAGES)}
    return sorted(named, key=lambda nm: rank.get(nm[0].split(".")[0], -1))


def sites(unet: nn.Module) -> list[Site]:
    """Every ``attn1``, in the order the UNet computes them (down, mid, up); ``info`` = the
    enclosing ``Transformer2DModel``'s name."""
    out = []
    for name, attn in _computation_order(unet):
        if name.rsplit(".", 1)[-1] != "attn1" or not hasattr(attn, "to_q") \
                or not hasattr(attn, "heads"):
            continue
        taps = [("q", attn.to_q), ("k", attn.to_k)]
        for mod, parts, keys in (("to_qkv", 3, "qk"), ("to_kv", 2, "k")):
            if isinstance(getattr(attn, mod, None), nn.Module):
                taps += [(key, getattr(attn, mod), _chunk(parts, i)) for i, key in enumerate(keys)]
        taps += [(key, getattr(attn, mod)) for key, mod in (("qn", "norm_q"), ("kn", "norm_k"))
                 if isinstance(getattr(attn, mod, None), nn.Module)]
        parent = name.split(".transformer_blocks.")[0] if ".transformer_blocks." in name else None
        out.append(Site(name, attn, taps=taps, info=parent))
    return out


def _hw(x: Any) -> tuple[int, int] | None:
    return tuple(x.shape[-2:]) if isinstance(x, Tensor) and x.ndim == 4 else None


def observers(unet: nn.Module, sites: list[Site]) -> list:
    """The latent size per UNet call, and the feature-map size of each enclosing block."""
    def on_unet(ctx, args):
        ctx["sample_hw"], ctx["grids"] = _hw(args.get("sample")), {}

    def on_parent(parent):
        def fn(ctx, args):
            ctx.setdefault("grids", {})[parent] = _hw(args.get("hidden_states"))
        return fn

    parents = sorted({s.info for s in sites if s.info is not None})
    return [(unet, on_unet)] + [(unet.get_submodule(p), on_parent(p)) for p in parents]


def _grid_from_sample(sample_hw: tuple[int, int] | None, n: int) -> tuple[int, int] | None:
    """The ``(h, w)`` of a UNet level with ``n`` tokens, from the input size (ceil-halving)."""
    h, w = sample_hw or (0, 0)
    while h >= 1 and w >= 1:
        if h * w == n:
            return (h, w)
        if h == 1 and w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


def _per_head(call: Call, key: str, heads: int) -> Tensor:
    """``(B, H, N, d)``: the QK-normed tap when it is per head, else the projection split."""
    normed = call.taps.get(key + "n")
    if normed is not None and normed.ndim == 4:
        return normed
    x = call.tap(key)
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def read(site: Site, call: Call) -> Observation:
    """Per-head ``Q``, ``K`` (after QK-norm), the processor's scale, the prepared mask, the grid."""
    attn = site.module
    q, k = _per_head(call, "q", attn.heads), _per_head(call, "k", attn.heads)
    b, _, n_q, d = q.shape
    grid = _hw(call.args.get("hidden_states")) or call.ctx.get("grids", {}).get(site.info)
    if grid is None or grid[0] * grid[1] != n_q:
        grid = _grid_from_sample(call.ctx.get("sample_hw"), n_q)
    scale = attn.scale if type(attn.processor).__name__ in _USES_ATTN_SCALE else 1.0 / math.sqrt(d)
    mask = call.args.get("attention_mask")
    if mask is not None:  # as the processors do: repeat per head, then (B, H, *, N_k)
        mask = attn.prepare_attention_mask(mask, k.shape[-2], b)
        mask = mask.view(b, attn.heads, -1, mask.shape[-1])
    return Observation(q=q, k=k, scale=scale, mask=mask,
                       tokens={"image": (0, n_q), "grid": grid, "kind": "unet-self"})
