"""The per-call hook mechanics shared by the capture adapters.

Every adapter observes one attention call with the same small protocol: a forward pre-hook on
the attention module starts the call (clears what the last call left, asks ``recorder.wants``,
reads the mask and whatever else the adapter needs), forward hooks on the projections stash their
outputs while the call is active, and the recording happens either when the key projection runs
or when the attention module returns; a post-hook then clears the scratch space so no tensor
outlives the call. :class:`CallScratch` owns that protocol; an adapter supplies only what is
specific to its model (which modules to hook, how ``q``/``k`` are reshaped, the scale, the mask,
the token layout).
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

__all__ = ["CallScratch"]


class CallScratch(dict):
    """Scratch space of one captured attention layer for one call, with the hooks that fill it.

    A ``dict`` the hooks share: ``scratch["active"]`` is True while the current call of layer
    ``name`` is being recorded, and the other keys hold what the adapter's hooks stashed
    (projection outputs, the mask, ...). Each ``watch``/``stash``/``pair`` call registers hooks
    and appends their ``remove`` callables to :attr:`undo`, which the adapter returns.

    Parameters
    ----------
    recorder
        The capture recorder; ``recorder.wants(name)`` decides whether a call is recorded.
    name : str
        The layer's name.
    """

    def __init__(self, recorder: Any, name: str):
        super().__init__()
        self.recorder, self.name = recorder, name
        self.undo: list[Callable[[], None]] = []

    def watch(self, attn: nn.Module, start: Callable[..., dict | None] | None = None,
              finish: Callable[[nn.Module], None] | None = None) -> None:
        """Hook the attention module: begin each call with a reset, end it with a clear.

        Before each call the scratch is cleared; if ``recorder.wants(name)``,
        ``start(module, args, kwargs)`` (None: ``{}``) returns the entries to keep for this call
        (mask, sizes, ...) or None to leave the call unrecorded, and the call becomes active.
        ``start`` may raise to refuse the call. After the call, ``finish(module)`` runs if the
        call is still active, and the scratch is cleared in any case.
        """
        def pre(module, args, kwargs):
            self.clear()
            if not self.recorder.wants(self.name):
                return
            entries = {} if start is None else start(module, args, kwargs)
            if entries is not None:
                self.update(entries)
                self["active"] = True

        def post(module, args, kwargs, output):
            try:
                if finish is not None and self.get("active"):
                    finish(module)
            finally:
                self.clear()   # drop references to q / k / the mask after each call

        self.undo.append(attn.register_forward_pre_hook(pre, with_kwargs=True).remove)
        self.undo.append(attn.register_forward_hook(post, with_kwargs=True).remove)

    def stash(self, module: nn.Module, key: str,
              transform: Callable[[Any], Any] | None = None) -> None:
        """While a call is active, store ``module``'s output (or ``transform(output)``) as
        ``key``."""
        def hook(mod, args, output):
            if self.get("active"):
                self[key] = output if transform is None else transform(output)

        self.undo.append(module.register_forward_hook(hook).remove)

    def pair(self, module: nn.Module, key: str, record: Callable[[Any, Any], None]) -> None:
        """Record when ``module`` runs after ``key`` was stashed in the active call.

        Pops ``key``, ends the call (one record per call) and calls ``record(stashed, output)``,
        e.g. ``record(q, k)`` with a hook on the key projection.
        """
        def hook(mod, args, output):
            if not self.get("active") or key not in self:
                return
            first = self.pop(key)
            self["active"] = False
            record(first, output)

        self.undo.append(module.register_forward_hook(hook).remove)
