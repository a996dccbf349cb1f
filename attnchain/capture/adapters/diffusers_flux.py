r"""Capture adapter for diffusers' ``FluxTransformer2DModel`` (FLUX.1) joint attention.

Every ``FluxAttention`` of the double-stream blocks (``transformer_blocks.i.attn``) and of the
single-stream blocks (``single_transformer_blocks.i.attn``). Both attend jointly over
``[text; image]`` of length ``N = N_txt + N_img`` (text first, as in ``FluxAttnProcessor``):

.. math::

    A = \operatorname{softmax}\!\left(\frac{\tilde Q \tilde K^\top}{\sqrt{d}} + M\right),
    \qquad \tilde Q = \operatorname{RoPE}\big([\mathrm{RMS}(Q_{txt}); \mathrm{RMS}(Q_{img})]\big).

The taps are the per-head RMS norms ``norm_q``/``norm_k`` (and ``norm_added_q``/``norm_added_k``
for the text stream of double blocks; single blocks see ``[text; image]`` already); the rotary
embedding ``image_rotary_emb`` and ``attention_mask`` are the module's arguments, and RoPE is
applied with diffusers' own ``apply_rotary_emb``. Tokens: the ``text`` and ``image`` spans and
the image grid ``(h, w)`` read from ``img_ids``. A pipeline with a ``.transformer`` is captured
through it; each transformer call is one denoising step.

**References**

:cite:`bfl2024flux`; diffusers ``transformer_flux.py``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from attnchain.capture.core import Call, Observation, Site, denoiser_lookup

__all__ = ["matches", "root", "sites", "observers", "read", "image_grid"]


root, matches = denoiser_lookup("transformer", "FluxTransformer2DModel")


def sites(model: nn.Module) -> list[Site]:
    """Double-stream blocks, then single-stream blocks; ``info`` = ``"double"``/``"single"``."""
    out = []
    for prefix, kind in (("transformer_blocks", "double"), ("single_transformer_blocks", "single")):
        for i, block in enumerate(getattr(model, prefix, None) or []):
            attn = getattr(block, "attn", None)
            if attn is None or not hasattr(attn, "norm_q") or not hasattr(attn, "norm_k"):
                continue
            taps = [("q", attn.norm_q), ("k", attn.norm_k)]
            if getattr(attn, "added_kv_proj_dim", None) is not None \
                    and hasattr(attn, "norm_added_q"):
                taps += [("q_txt", attn.norm_added_q), ("k_txt", attn.norm_added_k)]
            out.append(Site(f"{prefix}.{i}.attn", attn, taps=taps, info=kind))
    return out


def image_grid(img_ids: Tensor | None, n_img: int) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of FLUX image tokens from their position ids, or None.

    FLUX pipelines give image token ``r * w + c`` the ids ``(0, r, c)`` (raster order); the grid
    is returned only when the ids are exactly that raster of ``n_img`` tokens.

    Examples
    --------
    >>> import torch
    >>> ids = torch.tensor([[0, r, c] for r in range(2) for c in range(3)])
    >>> image_grid(ids, 6), image_grid(ids.flip(0), 6)
    ((2, 3), None)
    """
    ids = img_ids[0] if img_ids is not None and img_ids.ndim == 3 else img_ids
    if ids is None or ids.ndim != 2 or ids.shape[0] != n_img or ids.shape[1] < 3:
        return None
    rows, cols = ids[:, 1].round().long(), ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    raster = torch.arange(n_img, device=ids.device)
    return (h, w) if h * w == n_img and torch.equal((rows - r0) * w + (cols - c0), raster) else None


def _n_text(args: dict) -> int | None:
    ehs = args.get("encoder_hidden_states")
    return ehs.shape[1] if isinstance(ehs, Tensor) else None


def observers(model: nn.Module, sites: list[Site]) -> list:
    """The image grid per transformer call; the text length each single block is called with."""
    def on_model(ctx, args):
        hs = args.get("hidden_states")
        n_img = hs.shape[1] if isinstance(hs, Tensor) else None
        ctx["grid"] = image_grid(args.get("img_ids"), n_img) if n_img else None

    def on_single_block(ctx, args):
        ctx["single_n_txt"] = _n_text(args)

    blocks = [model.get_submodule(s.name.rsplit(".", 1)[0]) for s in sites if s.info == "single"]
    return [(model, on_model)] + [(block, on_single_block) for block in blocks]


def read(site: Site, call: Call) -> Observation:
    """Post-RoPE ``[text; image]`` queries and keys, SDPA's scale, the mask, the layout."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k = call.tap("q"), call.tap("k")
    if call.taps.get("q_txt") is not None:
        q, k = torch.cat([call.taps["q_txt"], q], dim=1), torch.cat([call.tap("k_txt"), k], dim=1)
    rope = call.args.get("image_rotary_emb")
    if rope is not None:
        q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
    q, k = q.transpose(1, 2), k.transpose(1, 2)   # (B, N, H, d) -> (B, H, N, d)
    n = q.shape[-2]
    if site.info == "single":
        n_txt = call.ctx.get("single_n_txt") or 0
    else:
        q_txt = call.taps.get("q_txt")
        n_txt = (q_txt.shape[1] if q_txt is not None else _n_text(call.args)) or 0
    grid = call.ctx.get("grid")
    grid = grid if grid is not None and grid[0] * grid[1] == n - n_txt else None
    # SDPA's default scale 1/sqrt(d); the mask goes to SDPA unchanged, so pass it as is
    return Observation(q=q, k=k, scale=1.0 / math.sqrt(q.shape[-1]),
                       mask=call.args.get("attention_mask"),
                       tokens={"text": (0, n_txt), "image": (n_txt, n), "grid": grid,
                               "kind": "flux-" + site.info})
