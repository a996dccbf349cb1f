"""Capture adapter for models written in this project: every
:class:`~attnchain.capture.probe.AttentionProbs` module is a capture point.

Such a model passes its post-softmax weights ``(B, H, N_q, N_k)`` through an ``AttentionProbs``
(an identity) and the adapter reads them from its output. The layer is named by the probe's
parent module (``blocks.0.attn`` for a probe at ``blocks.0.attn.probs``). Only probabilities are
observable, so ``keep="qk"`` raises for these layers.

Tokens: the layout is taken, in this order, from a ``tokens`` attribute of the probe, of its
parent, or of the captured root model (a :class:`~attnchain.capture.TokenLayout`, a dict spec,
or a callable ``n -> layout``); without one, the layer's tokens have no roles.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from attnchain.capture.core import Call, Observation, Site
from attnchain.capture.probe import AttentionProbs

__all__ = ["matches", "sites", "read"]


def matches(model: Any) -> bool:
    """True when ``model`` contains an ``AttentionProbs`` module."""
    return isinstance(model, nn.Module) and \
        any(isinstance(m, AttentionProbs) for m in model.modules())


def sites(model: nn.Module) -> list[Site]:
    """One site per ``AttentionProbs``, named by its parent module, in module order."""
    out = []
    for name, probe in model.named_modules():
        if isinstance(probe, AttentionProbs):
            layer = name.rsplit(".", 1)[0] if "." in name else name
            parent = model.get_submodule(layer) if layer != name else probe
            out.append(Site(layer, probe, info=(probe, parent, model)))
    return out


def read(site: Site, call: Call) -> Observation:
    """The probe's output, with the first ``tokens`` layout found on probe, parent or model."""
    probs = call.output
    for obj in site.info:
        spec = getattr(obj, "tokens", None)
        if spec is not None and not isinstance(spec, nn.Module):
            tokens = spec(probs.shape[-2]) if callable(spec) else spec
            return Observation(probs=probs, tokens=tokens)
    return Observation(probs=probs)
