r"""Capture adapter for diffusers' ``UNet2DConditionModel`` (Stable Diffusion) self-attention.

What it records
---------------
Every self-attention module ``attn1`` of the UNet's transformer blocks
(``down_blocks.i.attentions.j.transformer_blocks.t.attn1``, ``mid_block...``, ``up_blocks...``).
At a block whose feature map is ``h × w`` the tokens are the ``N = h·w`` latent positions in
raster order (token ``r·w + c`` is row ``r``, column ``c``), and the layer attends over them:

.. math::

    A = \operatorname{softmax}\!\left(\frac{Q K^\top}{\sqrt{d}} + M\right) \in
    \mathbb{R}^{B \times H \times N \times N},\qquad Q = X W_q,\ K = X W_k,

with ``X`` the block's normalised hidden states, ``d`` the head dimension and ``M`` the additive
form of the attention mask (usually absent). Each layer's grid ``(h, w)`` goes into
``rec.tokens[name]["grid"]``; it differs between resolutions (e.g. 64×64, 32×32, 16×16, 8×8 for
SD1.5 at 512 px).

How (observation, not replacement)
----------------------------------
The attention processor (``AttnProcessor2_0``'s fused SDPA, xformers, sliced, ...) is left in
place and computes the output as before. Forward hooks on ``to_q``/``to_k`` (``to_qkv`` after
``fuse_qkv_projections``; ``norm_q``/``norm_k`` when the model has QK-norm) read the projected
queries and keys, a keyword-aware forward pre-hook on the attention module reads the mask and
the input shape, and a pre-hook on the enclosing ``Transformer2DModel`` reads the spatial size
of its ``(B, C, h, w)`` input. The recorder then forms ``softmax(Q Kᵀ · scale)`` (or keeps ``Q``,
``K`` only). One forward call of the UNet is one denoising step.

This module also holds the small helpers shared with ``diffusers_flux`` (argument binding,
class matching by name, undo).

References
----------
Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models", CVPR 2022.
Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable

from torch import Tensor, nn

from ._scratch import CallScratch

__all__ = ["matches", "install", "attention_layers"]


# ----------------------------------------------------------------------------------------------
# helpers shared with diffusers_flux
# ----------------------------------------------------------------------------------------------
def class_named(obj: Any, cls_name: str, package: str) -> bool:
    """True if ``obj`` is an instance of a class called ``cls_name`` defined in ``package``.

    Checks the MRO by name so that ``matches`` never imports diffusers.
    """
    return any(
        c.__name__ == cls_name and c.__module__.split(".")[0] == package for c in type(obj).__mro__
    )


_SIGNATURES: dict[Any, inspect.Signature] = {}


def bind_args(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by parameter name (positionals included); the kwargs if unbindable."""
    key = getattr(fn, "__func__", fn)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(fn)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    out = dict(bound.arguments)
    for p in sig.parameters.values():  # flatten **kwargs / **cross_attention_kwargs
        if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(out.get(p.name), dict):
            out.update(out.pop(p.name))
    return out


def remove_all(undo: list[Callable[[], None]]) -> None:
    """Call every undo callable (last first), even if some raise; re-raise the first error."""
    first = None
    while undo:
        fn = undo.pop()
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - keep removing the rest
            first = first or err
    if first is not None:
        raise first


# ----------------------------------------------------------------------------------------------
# UNet adapter
# ----------------------------------------------------------------------------------------------
def denoiser(obj: Any, attr: str, cls_name: str) -> nn.Module | None:
    """``obj`` itself if it is a diffusers ``cls_name``, else ``obj.<attr>`` if that is one (a
    pipeline such as ``StableDiffusionPipeline``), else None."""
    if class_named(obj, cls_name, "diffusers"):
        return obj
    inner = getattr(obj, attr, None) if not isinstance(obj, nn.Module) else None
    return inner if inner is not None and class_named(inner, cls_name, "diffusers") else None


def matches(model: Any) -> bool:
    """True for a diffusers ``UNet2DConditionModel`` (or subclass), or a pipeline whose ``unet``
    is one (then layer names are those of ``pipe.unet`` and each ``pipe.unet`` call is a step)."""
    return denoiser(model, "unet", "UNet2DConditionModel") is not None


def attention_layers(model: Any) -> list[tuple[str, nn.Module]]:
    """``[(name, Attention module)]`` for every self-attention ``attn1``, in module order."""
    unet = denoiser(model, "unet", "UNet2DConditionModel")
    return [
        (name, m)
        for name, m in unet.named_modules()
        if name.rsplit(".", 1)[-1] == "attn1" and hasattr(m, "to_q") and hasattr(m, "heads")
    ]


# processors that compute probabilities with ``attn.scale`` (``get_attention_scores``); the
# SDPA-based ones (AttnProcessor2_0 and friends) use the SDPA default 1/sqrt(d) instead.
_USES_ATTN_SCALE = {"AttnProcessor", "SlicedAttnProcessor", "AttnProcessorNPU"}


def _grid_from_sample(sample_hw: tuple[int, int] | None, n: int) -> tuple[int, int] | None:
    """The ``(h, w)`` of a UNet level with ``n`` tokens, from the input size (ceil-halving)."""
    if sample_hw is None:
        return None
    h, w = sample_hw
    while h >= 1 and w >= 1:
        if h * w == n:
            return (h, w)
        if h == 1 and w == 1:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return None


def install(model: nn.Module, recorder: Any) -> list[Callable[[], None]]:
    """Attach observation hooks to every selected ``attn1`` of a UNet; return their removers.

    Parameters
    ----------
    model : diffusers.UNet2DConditionModel, or a pipeline with one as ``.unet``
    recorder
        The capture core's recorder: it selects layers and steps and receives ``(Q, K)``.

    Returns
    -------
    list of callables
        Calling each removes one hook; afterwards the model is exactly as before.
    """
    model = denoiser(model, "unet", "UNet2DConditionModel")
    undo: list[Callable[[], None]] = []
    ctx: dict[str, Any] = {"sample_hw": None, "grids": {}}
    try:
        def model_pre(module, args, kwargs):
            recorder.begin_step()  # no-op when the core counts the root's forward calls
            bound = bind_args(module.forward, args, kwargs)
            sample = bound.get("sample")
            is_4d = isinstance(sample, Tensor) and sample.ndim == 4
            ctx["sample_hw"] = tuple(sample.shape[-2:]) if is_4d else None
            ctx["grids"].clear()

        undo.append(model.register_forward_pre_hook(model_pre, with_kwargs=True).remove)

        hooked_parents: set[str] = set()
        for name, attn in attention_layers(model):
            if not recorder.wants_layer(name):
                continue
            parent = None
            if ".transformer_blocks." in name:  # the enclosing Transformer2DModel
                parent = name.split(".transformer_blocks.")[0]
            if parent is not None and parent not in hooked_parents:
                hooked_parents.add(parent)
                undo.append(_hook_parent(model.get_submodule(parent), parent, ctx))
            undo.extend(_install_layer(name, attn, parent, recorder, ctx))
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error
            remove_all(undo)
        raise
    return undo


def _hook_parent(module: nn.Module, parent: str, ctx: dict) -> Callable[[], None]:
    def pre(mod, args, kwargs):
        bound = bind_args(mod.forward, args, kwargs)
        hs = bound.get("hidden_states")
        if isinstance(hs, Tensor) and hs.ndim == 4:
            ctx["grids"][parent] = tuple(hs.shape[-2:])

    return module.register_forward_pre_hook(pre, with_kwargs=True).remove


def _install_layer(name, attn, parent, recorder, ctx):
    st = CallScratch(recorder, name)

    def start(module, args, kwargs):
        bound = bind_args(module.forward, args, kwargs)
        hs = bound.get("hidden_states")
        return {"mask": bound.get("attention_mask"),
                "grid4d": tuple(hs.shape[-2:]) if isinstance(hs, Tensor) and hs.ndim == 4 else None}

    def emit(module):
        heads = module.heads
        if st.get("qn") is not None and st["qn"].ndim == 4:
            q = st["qn"]  # (B, H, N, d) after norm_q
        elif st.get("q") is not None:
            q = st["q"]
            q = q.reshape(q.shape[0], q.shape[1], heads, -1).transpose(1, 2)
        else:
            raise RuntimeError(
                f"attnchain capture: {name}: the attention processor "
                f"{type(module.processor).__name__} did not call to_q/to_qkv, so queries could not "
                "be observed"
            )
        if st.get("kn") is not None and st["kn"].ndim == 4:
            k = st["kn"]
        elif st.get("k") is not None:
            k = st["k"]
            k = k.reshape(k.shape[0], k.shape[1], heads, -1).transpose(1, 2)
        else:
            raise RuntimeError(f"attnchain capture: {name}: keys could not be observed")
        b, _, n_q, d = q.shape
        n_k = k.shape[-2]
        grid = st["grid4d"] or (ctx["grids"].get(parent) if parent else None)
        if grid is None or grid[0] * grid[1] != n_q:
            grid = _grid_from_sample(ctx["sample_hw"], n_q)
        proc = type(module.processor).__name__
        scale = module.scale if proc in _USES_ATTN_SCALE else 1.0 / math.sqrt(d)
        mask = st["mask"]
        if mask is not None:  # as the processors do: repeat per head, then (B, H, *, N_k)
            mask = module.prepare_attention_mask(mask, n_k, b)
            mask = mask.view(b, heads, -1, mask.shape[-1])
        tokens = {"image": (0, n_q), "grid": grid, "kind": "unet-self"}
        recorder.record_qk(name, q, k, scale=scale, mask=mask, tokens=tokens)

    def chunk(n, i):
        return lambda output: output.chunk(n, dim=-1)[i]

    st.watch(attn, start, emit)
    st.stash(attn.to_q, "q")
    st.stash(attn.to_k, "k")
    if isinstance(getattr(attn, "to_qkv", None), nn.Module):
        st.stash(attn.to_qkv, "q", chunk(3, 0))
        st.stash(attn.to_qkv, "k", chunk(3, 1))
    if isinstance(getattr(attn, "to_kv", None), nn.Module):
        st.stash(attn.to_kv, "k", chunk(2, 0))
    if isinstance(getattr(attn, "norm_q", None), nn.Module):
        st.stash(attn.norm_q, "qn")
    if isinstance(getattr(attn, "norm_k", None), nn.Module):
        st.stash(attn.norm_k, "kn")
    return st.undo
