"""Capture adapter for models written in this project: every
:class:`~attnchain.capture.probe.AttentionProbs` module is a capture point.

Such a model passes its post-softmax weights ``(B, H, N_q, N_k)`` through an ``AttentionProbs``
(an identity); a forward hook reads them. The layer is named by the probe's parent module
(``blocks.0.attn`` for a probe at ``blocks.0.attn.probs``). Only probabilities are observable,
so ``keep="qk"`` raises for these layers.

Tokens: the layout is taken, in this order, from a ``tokens`` attribute of the probe, of its
parent, or of the captured root model (a :class:`~attnchain.capture.recorder.TokenLayout`, a dict
spec, or a callable ``n -> layout``); without one, the layer's tokens have no roles.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from attnchain.capture.probe import AttentionProbs

__all__ = ["matches", "attention_layers", "install"]


def _layer_name(probe_name: str) -> str:
    return probe_name.rsplit(".", 1)[0] if "." in probe_name else probe_name


def matches(model: Any) -> bool:
    """True when ``model`` contains an ``AttentionProbs`` module."""
    return isinstance(model, nn.Module) and any(isinstance(m, AttentionProbs) for m in model.modules())


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(parent name, probe)]`` for every ``AttentionProbs`` in module order."""
    return [(_layer_name(n), m) for n, m in model.named_modules() if isinstance(m, AttentionProbs)]


def _tokens(candidates: list[Any], n: int) -> Any:
    for obj in candidates:
        spec = getattr(obj, "tokens", None)
        if spec is None or isinstance(spec, nn.Module):
            continue
        return spec(n) if callable(spec) else spec
    return None


def install(model: nn.Module, recorder: Any) -> list[Callable[[], None]]:
    """Forward hooks on every selected ``AttentionProbs``; returns their removers."""
    undo: list[Callable[[], None]] = []
    probe_names = {id(m): n for n, m in model.named_modules() if isinstance(m, AttentionProbs)}
    for name, probe in attention_layers(model):
        if not recorder.wants_layer(name):
            continue
        parent = model.get_submodule(name) if name != probe_names[id(probe)] else probe

        def hook(module, args, output, _name=name, _parent=parent):
            if recorder.wants(_name):
                recorder.record_probs(_name, output,
                                      tokens=_tokens([module, _parent, model], output.shape[-2]))

        undo.append(probe.register_forward_hook(hook).remove)
    return undo
