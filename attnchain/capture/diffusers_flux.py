r"""Capture adapter for diffusers' ``FluxTransformer2DModel`` (FLUX.1) joint attention.

What it records
---------------
Every ``FluxAttention`` module of the double-stream blocks (``transformer_blocks.i.attn``) and of
the single-stream blocks (``single_transformer_blocks.i.attn``). Both attend jointly over the
concatenated sequence ``[text; image]`` of length ``N = N_txt + N_img`` (text first, as in
diffusers' ``FluxAttnProcessor``):

.. math::

    A = \operatorname{softmax}\!\left(\frac{\tilde Q \tilde K^\top}{\sqrt{d}} + M\right),
    \qquad \tilde Q = \operatorname{RoPE}\big([\mathrm{RMS}(Q_{txt});
    \mathrm{RMS}(Q_{img})]\big)

with ``d`` the head dimension, ``M`` the (optional) additive form of ``attention_mask`` and RoPE
the rotary embedding ``image_rotary_emb`` built from ``[txt_ids; img_ids]``. In double-stream
blocks the text queries/keys come from ``add_q_proj``/``add_k_proj`` followed by
``norm_added_q``/``norm_added_k``, the image ones from ``to_q``/``to_k`` and ``norm_q``/``norm_k``;
in single-stream blocks ``to_q``/``to_k`` already see ``[text; image]``.

How (observation, not replacement)
----------------------------------
The processor is left alone, so the fused SDPA kernel still produces the model's output. The
adapter reads the per-head normalised queries/keys from forward hooks on ``norm_q``/``norm_k``
(and ``norm_added_q``/``norm_added_k``), reads ``image_rotary_emb`` and ``attention_mask`` with a
keyword-aware forward pre-hook on the attention module, applies RoPE with diffusers' own
``apply_rotary_emb`` and hands ``(Q, K)`` (post-RoPE, ``(B, H, N, d)``) to the recorder, which
either forms ``softmax(Q Kᵀ · scale)`` or keeps ``Q`` and ``K`` only. The token layout
(``text`` and ``image`` spans and the image grid ``(h, w)`` read from ``img_ids``) goes into
``rec.tokens``. One forward call of the transformer is one denoising step.

References
----------
Black Forest Labs, FLUX.1 (2024); diffusers ``transformer_flux.py``.
Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._scratch import CallScratch
from .diffusers_unet import bind_args, denoiser, remove_all

__all__ = ["matches", "install", "attention_layers"]


def _transformer(obj: Any) -> nn.Module | None:
    return denoiser(obj, "transformer", "FluxTransformer2DModel")


def matches(model: Any) -> bool:
    """True for a diffusers ``FluxTransformer2DModel`` (or subclass), or a pipeline whose
    ``transformer`` is one (layer names are then those of ``pipe.transformer``, and each call of
    it is a step)."""
    return _transformer(model) is not None


def attention_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """``[(name, FluxAttention module)]``: double-stream blocks, then single-stream blocks."""
    return [(name, attn) for name, attn, _ in _layers(_transformer(model))]


def _layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    out = []
    for prefix, kind in (("transformer_blocks", "double"), ("single_transformer_blocks", "single")):
        blocks = getattr(model, prefix, None)
        if blocks is None:
            continue
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if attn is not None and hasattr(attn, "norm_q") and hasattr(attn, "norm_k"):
                out.append((f"{prefix}.{i}.attn", attn, kind))
    return out


def image_grid(img_ids: Tensor | None, n_img: int) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of FLUX image tokens from their position ids, or None.

    FLUX pipelines give image token ``r * w + c`` the ids ``(0, r, c)`` (raster order). The grid is
    returned only when the ids are exactly that raster of ``n_img`` tokens.
    """
    if img_ids is None:
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    if ids.ndim != 2 or ids.shape[0] != n_img or ids.shape[1] < 3:
        return None
    rows = ids[:, 1].round().long()
    cols = ids[:, 2].round().long()
    r0, c0 = int(rows.min()), int(cols.min())
    h, w = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    if h * w != n_img:
        return None
    expect = torch.arange(n_img, device=ids.device)
    if not torch.equal((rows - r0) * w + (cols - c0), expect):
        return None
    return (h, w)


def _heads_first(x: Tensor) -> Tensor:
    """``(B, N, H, d)`` (FLUX processor layout) -> ``(B, H, N, d)``."""
    return x.transpose(1, 2)


def install(model: nn.Module, recorder: Any) -> list[Callable[[], None]]:
    """Attach observation hooks to a FLUX transformer; return the callables that remove them.

    Parameters
    ----------
    model : diffusers.FluxTransformer2DModel, or a pipeline with one as ``.transformer``
    recorder
        The capture core's recorder (see ``attnchain.capture``): it selects layers and steps,
        and receives ``(Q, K)`` per call.

    Returns
    -------
    list of callables
        Calling each (in any order) removes one hook; the model is then exactly as before.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    model = _transformer(model)
    undo: list[Callable[[], None]] = []
    ctx: dict[str, Any] = {"grid": None}
    try:
        def model_pre(module, args, kwargs):
            recorder.begin_step()  # no-op when the core counts the root's forward calls
            bound = bind_args(module.forward, args, kwargs)
            hs = bound.get("hidden_states")
            n_img = hs.shape[1] if isinstance(hs, Tensor) else None
            ctx["grid"] = image_grid(bound.get("img_ids"), n_img) if n_img else None

        undo.append(model.register_forward_pre_hook(model_pre, with_kwargs=True).remove)

        for name, attn, kind in _layers(model):
            if not recorder.wants_layer(name):
                continue
            undo.extend(_install_layer(model, name, attn, kind, recorder, ctx, apply_rotary_emb))
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error
            remove_all(undo)
        raise
    return undo


def _install_layer(model, name, attn, kind, recorder, ctx, apply_rotary_emb):
    st = CallScratch(recorder, name)

    def start(module, args, kwargs):
        bound = bind_args(module.forward, args, kwargs)
        ehs = bound.get("encoder_hidden_states")
        if kind == "double":
            n_txt = ehs.shape[1] if isinstance(ehs, Tensor) else 0
        else:
            n_txt = ctx.get("single_n_txt")
        return {"rope": bound.get("image_rotary_emb"), "mask": bound.get("attention_mask"),
                "n_txt": n_txt}

    def emit(module):
        q, k = st.get("q"), st.get("k")
        if q is None or k is None:
            raise RuntimeError(
                f"attnchain capture: {name}: the attention processor "
                f"{type(module.processor).__name__} did not call norm_q/norm_k, so queries and "
                "keys could not be observed"
            )
        if st.get("q_txt") is not None:
            q = torch.cat([st["q_txt"], q], dim=1)
            k = torch.cat([st["k_txt"], k], dim=1)
        rope = st["rope"]
        if rope is not None:
            q = apply_rotary_emb(q, rope, sequence_dim=1)
            k = apply_rotary_emb(k, rope, sequence_dim=1)
        q, k = _heads_first(q), _heads_first(k)
        n = q.shape[-2]
        n_txt = st["n_txt"]
        if kind == "double" and st.get("q_txt") is not None:
            n_txt = st["q_txt"].shape[1]
        if n_txt is None:
            n_txt = 0
        n_img = n - n_txt
        grid = ctx["grid"]
        if grid is not None and grid[0] * grid[1] != n_img:
            grid = None
        tokens = {
            "text": (0, n_txt),
            "image": (n_txt, n),
            "grid": grid,
            "kind": "flux-" + kind,
        }
        # SDPA's default scale 1/sqrt(d); the mask goes to SDPA unchanged, so pass it as is
        recorder.record_qk(name, q, k, scale=1.0 / math.sqrt(q.shape[-1]), mask=st["mask"],
                           tokens=tokens)

    st.watch(attn, start, emit)
    st.stash(attn.norm_q, "q")
    st.stash(attn.norm_k, "k")
    if getattr(attn, "added_kv_proj_dim", None) is not None and hasattr(attn, "norm_added_q"):
        st.stash(attn.norm_added_q, "q_txt")
        st.stash(attn.norm_added_k, "k_txt")

    if kind == "single":
        # the single-stream block concatenates [text; image] before its attention: read the text
        # length from the block's own encoder_hidden_states argument.
        block = _parent(model, name)

        def block_pre(module, args, kwargs):
            bound = bind_args(module.forward, args, kwargs)
            ehs = bound.get("encoder_hidden_states")
            ctx["single_n_txt"] = ehs.shape[1] if isinstance(ehs, Tensor) else None

        st.undo.append(block.register_forward_pre_hook(block_pre, with_kwargs=True).remove)
    return st.undo


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])
