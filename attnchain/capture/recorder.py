r"""The recorder: what one ``capture`` context stores, and the shape of its records.

The :class:`Recorder` is the object ``with attnchain.capture(model) as rec`` yields. The capture
core hands it one :class:`~attnchain.capture.core.Observation` per recorded call; the recorder
applies every memory option in one place (layer, head and step selection, rows and columns, head
weighting, storage dtype, ``keep="qk"``) and forms the maps from queries and keys,

.. math::

    A_h = \operatorname{softmax}\!\left(s\, Q_h K_h^\top + M\right) \in \mathbb{R}^{N_q \times N_k},

through :func:`attnchain.operators.attention_probs`, with ``s`` the layer's scale and ``M`` the
additive form of its mask (:func:`attnchain.operators.mask_to_bias`), in float32 (float64 when
``dtype=torch.float64``), as in Erel et al. :cite:`erel2025attention`.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from attnchain.capture.core import Observation, install, undo_all
from attnchain.capture.layout import ROLES, TokenLayout
from attnchain.operators import (AttentionChain, attention_logits, attention_probs,
                                 mask_to_bias)
from attnchain.spectral import HEAD_WEIGHTINGS, head_mean

__all__ = ["Recorder", "QK", "TokenLayout", "ROLES", "STEP_REDUCTIONS"]

#: how several recorded calls of one layer combine (see :func:`attnchain.capture`).
STEP_REDUCTIONS = ("mean", "stack", "last")

# at most this many float32 elements per head block in the recomputation (~64 MiB)
_BLOCK_ELEMENTS = 1 << 24


def _items(sel) -> list:
    """``layers=`` or ``steps=`` as a list: the items of an iterable, else ``[sel]``."""
    return list(sel) if isinstance(sel, Iterable) and not isinstance(sel, str) else [sel]


def _check_steps(steps) -> None:
    """``steps=``: None, a step index, a predicate or an iterable of step indices."""
    if steps is None or callable(steps):
        return
    for it in _items(steps):
        if isinstance(it, bool) or not isinstance(it, int) or it < 0:
            raise ValueError(f"steps: {it!r} is not a step index (an int >= 0); steps must be "
                             "None, an index, a list of indices or a predicate")


@dataclass
class QK:
    """Queries and keys of one layer kept by ``keep="qk"``; :meth:`probs` forms the map.

    Attributes
    ----------
    q : Tensor, shape (S, B, H, N_q, d) under ``step_reduce="stack"``, else (B, H, N_q, d)
    k : Tensor, shape (S, B, H, N_k, d), likewise
    scale : float
    mask : Tensor or None
        Additive mask broadcastable to the logits (``-inf`` = removed key), already restricted to
        the kept heads and rows.
    cols : LongTensor or None
        Key positions kept after the softmax (the ``cols=`` option).
    causal : bool
        Query ``i`` attends to keys ``j <= i`` only (a causal layer); not folded into ``mask``,
        so that no ``N × N`` tensor is stored.
    rows : LongTensor or None
        Query positions kept (the ``rows=`` option); ``q`` holds those rows only.

    Examples
    --------
    >>> import torch
    >>> qk = QK(q=torch.zeros(1, 1, 2, 4), k=torch.randn(1, 1, 3, 4), scale=0.5)
    >>> qk.probs()
    tensor([[[[0.3333, 0.3333, 0.3333],
              [0.3333, 0.3333, 0.3333]]]])
    """

    q: Tensor
    k: Tensor
    scale: float
    mask: Tensor | None = None
    cols: Tensor | None = None
    causal: bool = False
    rows: Tensor | None = None

    def _bias(self, dtype: torch.dtype) -> Tensor | None:
        """``mask`` plus the causal part (formed here, for the dense map only)."""
        bias = None if self.mask is None else self.mask.to(dtype)
        if self.causal:
            dev = self.q.device
            pos = torch.arange(self.q.shape[-2], device=dev) if self.rows is None \
                else self.rows.to(dev)
            later = torch.arange(self.k.shape[-2], device=dev) > pos[:, None]
            causal = torch.zeros(later.shape, dtype=dtype, device=dev).masked_fill_(
                later, float("-inf"))
            bias = causal if bias is None else bias + causal
        return bias

    def logits(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scale · q kᵀ + mask``, shape ``(..., N_q, N_k)`` (all keys)."""
        return attention_logits(self.q, self.k, self.scale, self._bias(dtype), dtype)

    def probs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Post-softmax attention ``(..., N_q, N_k)``, columns restricted when ``cols`` is set."""
        p = attention_probs(self.q, self.k, self.scale, self._bias(dtype), dtype)
        if self.cols is not None:
            p = p.index_select(-1, self.cols.to(p.device))
        return p

    def operator(self, dtype: torch.dtype | None = None, **kwargs) -> AttentionChain:
        r"""The layer's attention as a matrix-free chain operator, never an ``N × N`` map.

        Parameters
        ----------
        dtype : torch.dtype, optional
            ``torch.float32`` (default) or ``torch.float64``.
        **kwargs
            Passed to :class:`~attnchain.operators.AttentionChain` (``block_bytes``, ``sdpa``).

        Returns
        -------
        AttentionChain
            Batch shape ``q.shape[:-2]``: ``(S, B, H)`` under ``step_reduce="stack"``.

        Raises
        ------
        ValueError
            The record is not a chain: cross-attention, or rows/cols restricted by ``rows=`` or
            ``cols=`` (capture all tokens for an operator).

        Examples
        --------
        >>> import torch, attnchain as ac
        >>> g = torch.Generator().manual_seed(0)
        >>> qk = QK(q=torch.randn(1, 2, 5, 4, generator=g), k=torch.randn(1, 2, 5, 4, generator=g),
        ...         scale=0.5)
        >>> op = qk.operator()
        >>> torch.allclose(ac.token_rank(op), ac.token_rank(qk.probs()), atol=1e-6)
        True

        See Also
        --------
        attnchain.operators.AttentionChain
        """
        if self.rows is not None or self.cols is not None:
            raise ValueError("this record keeps only some rows or columns (rows=/cols=), so it "
                             "is not a chain; capture all tokens to get an operator")
        if self.q.shape[-2] != self.k.shape[-2]:
            raise ValueError(f"{self.q.shape[-2]} queries attend to {self.k.shape[-2]} keys: "
                             "cross-attention is not a chain")
        return AttentionChain(self.q, self.k, scale=self.scale, mask=self.mask,
                              causal=self.causal, dtype=dtype, **kwargs)


def _bias_4d(bias: Tensor) -> Tensor:
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    if bias.ndim != 4:
        raise ValueError(f"attention mask must broadcast to (B, H, N_q, N_k), got "
                         f"{tuple(bias.shape)}")
    return bias


def _shape_of(value: Any) -> tuple:
    if isinstance(value, QK):
        return tuple(value.q.shape), tuple(value.k.shape)
    return tuple(value.shape)


def _stack(xs: list[Tensor]) -> Tensor:
    # one call: a view, so the record keeps the model's strides (and products their rounding)
    return xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)


def _stack_qk(calls: list[QK]) -> QK:
    masks = [c.mask for c in calls]
    mask = None
    if any(m is not None for m in masks):
        ref = next(m for m in masks if m is not None)
        masks = [ref.new_zeros((1, 1, 1, 1)) if m is None else m for m in masks]
        mask = _stack(list(torch.broadcast_tensors(*masks)))
    return QK(q=_stack([c.q for c in calls]), k=_stack([c.k for c in calls]),
              scale=calls[0].scale, mask=mask, cols=calls[0].cols, causal=calls[0].causal,
              rows=calls[0].rows)


class Recorder:
    """Attention recorded inside one ``attnchain.capture`` context.

    Built by :func:`attnchain.capture`, which documents the options and the shape of the
    records. Readers use :attr:`attentions`, :attr:`qk`, :attr:`tokens`, :attr:`layout`,
    :attr:`layer_names` and :attr:`steps`; the capture core uses :meth:`select_layers`,
    :meth:`wants`, :meth:`begin_step` and :meth:`record`.

    Examples
    --------
    >>> import torch, attnchain as ac
    >>> model, _ = ac.zoo.load("tiny-timm-vit")
    >>> with torch.no_grad(), ac.capture(model, layers=0, rows="cls", cols="image") as rec:
    ...     _ = model(torch.zeros(1, 3, 32, 32))
    ...     _ = model(torch.ones(1, 3, 32, 32))
    >>> rec.steps, rec["blocks.0.attn"].shape, rec.cols["blocks.0.attn"].tolist()[:3]
    ([0, 1], torch.Size([1, 4, 1, 16]), [3, 4, 5])

    See Also
    --------
    attnchain.capture.capture : the options and the shape contract.
    """

    def __init__(self, model: Any, *, layers=None, heads=None, steps=None, weighting=None,
                 rows=None, cols=None, dtype=None, keep="probs", step_reduce=None, detach=True):
        if keep not in ("probs", "qk"):
            raise ValueError(f"keep must be 'probs' or 'qk', not {keep!r}")
        if step_reduce is None:
            step_reduce = "mean" if keep == "probs" else "stack"
        if step_reduce not in STEP_REDUCTIONS:
            raise ValueError(f"step_reduce must be one of {STEP_REDUCTIONS}, not {step_reduce!r}")
        if keep == "qk" and step_reduce == "mean":
            raise ValueError("keep='qk' cannot average queries/keys over steps; use step_reduce="
                             "'stack' or 'last'")
        if keep == "qk" and weighting is not None:
            raise ValueError("keep='qk' stores queries and keys; weighting= applies to maps only")
        if weighting is not None and weighting not in HEAD_WEIGHTINGS and not callable(weighting):
            raise ValueError(f"weighting must be None, one of {HEAD_WEIGHTINGS} or a callable, "
                             f"not {weighting!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, not {dtype!r}")
        _check_steps(steps)
        self.model = model
        self.layers_arg, self.heads_arg, self.steps_arg = layers, heads, steps
        self.rows_arg, self.cols_arg = rows, cols
        self.weighting = weighting
        self.dtype = dtype if dtype is not None else torch.float32
        self.compute_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.keep, self.step_reduce, self.detach = keep, step_reduce, detach

        self.layer_names: list[str] = []      # every capturable layer, model order
        self.selected: list[str] = []         # the selected ones, model order
        self.step = -1                        # index of the current forward call (step)
        self.steps: list[int] = []            # steps at which something was recorded
        self.adapters: list[str] = []
        self.active = False
        self._selected_set: set[str] = set()
        self._store: dict[str, Any] = {}      # name -> tensor / QK / list of them (stack)
        self._count: dict[str, int] = {}
        self._layouts: dict[str, TokenLayout] = {}
        self._key_layouts: dict[str, TokenLayout] = {}
        self._rows: dict[str, Tensor | None] = {}
        self._cols: dict[str, Tensor | None] = {}
        self._undo: list[Callable[[], None]] = []
        self._entered = False

    # ------------------------------------------------------------------ selection
    def select_layers(self, names: list[str]) -> None:
        """Resolve ``layers=`` against every capturable layer ``names`` (model order)."""
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"two adapters claim the same layer(s) {dup[:5]}")
        self.layer_names = list(names)
        sel = self.layers_arg
        if sel is None:
            chosen = set(names)
        elif callable(sel) and not isinstance(sel, str):
            chosen = {n for n in names if sel(n)}
        else:
            chosen = set()
            for it in _items(sel):
                if isinstance(it, bool) or not isinstance(it, (int, str)):
                    raise ValueError(f"layers: {it!r} is not a layer name, pattern or index")
                if isinstance(it, int):
                    if not -len(names) <= it < len(names):
                        raise ValueError(f"layers: index {it} out of range for {len(names)} "
                                         "capturable layers")
                    chosen.add(names[it])
                    continue
                hit = [n for n in names if n == it or fnmatch.fnmatchcase(n, it)]
                if not hit:
                    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                    raise ValueError(f"layers: {it!r} matches no capturable layer "
                                     f"(available: {shown})")
                chosen.update(hit)
        self.selected = [n for n in names if n in chosen]
        self._selected_set = set(self.selected)

    def wants_layer(self, name: str) -> bool:
        """True when layer ``name`` is selected (decided once, at install time)."""
        return name in self._selected_set

    def wants_step(self) -> bool:
        """True when the current forward call (step) is selected."""
        sel = self.steps_arg
        if sel is None:
            return True
        step = max(self.step, 0)
        if callable(sel):
            return bool(sel(step))
        if isinstance(sel, int):
            return step == sel
        return step in set(sel)

    def wants(self, name: str) -> bool:
        """``wants_layer(name) and wants_step()`` while the context is open."""
        return self.active and self.wants_layer(name) and self.wants_step()

    def begin_step(self) -> None:
        """A new forward call of the captured model (a denoising step) begins."""
        self.step += 1

    # ------------------------------------------------------------------ recording
    def record(self, name: str, obs: Observation) -> None:
        """Record one call of layer ``name``: its queries and keys, or its probabilities.

        Raises
        ------
        ValueError
            Malformed ``q``/``k``/``probs``, ``keep="qk"`` for an adapter that sees only
            probabilities, out-of-range ``heads``/``rows``/``cols``, or (``step_reduce`` "mean" or
            "stack") a call whose record shape or token layout differs from the earlier calls'.
        """
        if not self.wants(name):
            return
        if obs.probs is not None:
            self._record_probs(name, obs.probs, obs.tokens, obs.key_tokens)
        else:
            self._record_qk(name, obs)

    def _positions(self, spec, layout: TokenLayout, n: int, what: str) -> Tensor | None:
        if spec is None:
            return None
        if callable(spec) and not isinstance(spec, (str, Tensor)):
            spec = spec(layout)
        if isinstance(spec, str):
            spec = [spec]
        idx = []
        for it in (spec.flatten().tolist() if isinstance(spec, Tensor) else spec):
            if isinstance(it, str):
                pos = layout.role(it)
                if not pos:
                    raise ValueError(f"{what}={it!r}: this layer's token layout has no {it} "
                                     f"tokens ({layout.kind or 'no roles known'})")
                idx.extend(pos)
            else:
                idx.append(int(it))
        for i in idx:
            if not -n <= i < n:
                raise ValueError(f"{what}: position {i} out of range for {n} tokens")
        return torch.tensor([i % n for i in idx], dtype=torch.long)

    def _prepare(self, name, n_q, n_k, heads_total, tokens, key_tokens):
        layout = TokenLayout.from_spec(tokens, n_q)
        if key_tokens is None:
            key_layout = layout if n_k == n_q else TokenLayout(n=n_k)
        else:
            key_layout = TokenLayout.from_spec(key_tokens, n_k)
        rows = self._positions(self.rows_arg, layout, n_q, "rows")
        cols = self._positions(self.cols_arg, key_layout, n_k, "cols")
        heads = None
        if self.heads_arg is not None:
            hs = [self.heads_arg] if isinstance(self.heads_arg, int) else list(self.heads_arg)
            for h in hs:
                if not -heads_total <= int(h) < heads_total:
                    raise ValueError(f"heads: head {h} out of range for {heads_total} heads in "
                                     f"{name}")
            heads = torch.tensor([int(h) % heads_total for h in hs], dtype=torch.long)
        return (layout, key_layout, rows, cols), heads, rows, cols

    def _store_value(self, name: str, value: Any, meta: tuple) -> None:
        """Combine this call's record with the earlier ones (checked first: on a mismatch nothing
        changes and the record so far stays readable)."""
        c = self._count.get(name, 0) + 1
        if c > 1 and self.step_reduce != "last":
            old = self._store[name][0] if self.step_reduce == "stack" else self._store[name]
            old_meta = (self._layouts[name], self._key_layouts[name])
            if _shape_of(old) != _shape_of(value) or old_meta != meta[:2]:
                what = (f"shape {_shape_of(value)} where the earlier calls gave {_shape_of(old)}"
                        if _shape_of(old) != _shape_of(value) else
                        f"token layout {meta[0]} where the earlier calls gave {old_meta[0]}")
                raise ValueError(
                    f"attnchain capture: {name}: forward call {c} has {what}: the batch size or "
                    f"the tokens changed between calls, and step_reduce={self.step_reduce!r} "
                    "combines calls of one shape only. Capture each batch in its own context, "
                    "or pass step_reduce='last'.")
        self._layouts[name], self._key_layouts[name], self._rows[name], self._cols[name] = meta
        step = max(self.step, 0)
        if step not in self.steps:
            self.steps.append(step)
        self._count[name] = c
        if self.step_reduce == "stack":
            self._store.setdefault(name, []).append(value)
        elif c == 1 or self.step_reduce == "last":
            self._store[name] = value
        else:  # running mean of maps, in the storage dtype
            old = self._store[name]
            self._store[name] = (old.to(self.compute_dtype) * ((c - 1) / c)
                                 + value.to(self.compute_dtype) / c).to(old.dtype)

    def _record_qk(self, name: str, obs: Observation) -> None:
        q, k, mask = obs.q, obs.k, obs.mask
        if not isinstance(q, Tensor) or not isinstance(k, Tensor) or q.ndim != 4 or k.ndim != 4 \
                or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"{name}: q and k must be (B, H, N, d) with matching B, H, d; got "
                             f"{getattr(q, 'shape', q)} and {getattr(k, 'shape', k)}")
        if self.detach:
            q, k = q.detach(), k.detach()
            mask = mask.detach() if isinstance(mask, Tensor) else mask
        b, h_total, n_q, d = q.shape
        n_k = k.shape[-2]
        scale = float(d ** -0.5 if obs.scale is None else obs.scale)
        meta, heads, rows, cols = self._prepare(name, n_q, n_k, h_total, obs.tokens, obs.key_tokens)
        cd = self.compute_dtype
        bias4 = mask_to_bias(mask, cd)
        if bias4 is not None:
            bias4 = _bias_4d(bias4)
        if obs.is_causal and self.keep != "qk":  # keep="qk" stores the flag, not N x N
            causal = torch.full((n_q, n_k), float("-inf"), dtype=cd, device=q.device).triu_(1)
            causal = causal[None, None]
            bias4 = causal if bias4 is None else bias4 + causal
        if heads is not None:
            q = q.index_select(1, heads.to(q.device))
            k = k.index_select(1, heads.to(k.device))
            if bias4 is not None and bias4.shape[1] == h_total and h_total > 1:
                bias4 = bias4.index_select(1, heads.to(bias4.device))
        if rows is not None and self.weighting != "lambda2":
            q = q.index_select(2, rows.to(q.device))
            if bias4 is not None and bias4.shape[2] == n_q and n_q > 1:
                bias4 = bias4.index_select(2, rows.to(bias4.device))
        if self.keep == "qk":
            value = QK(q=q.to(self.dtype), k=k.to(self.dtype), scale=scale, mask=bias4, cols=cols,
                       causal=bool(obs.is_causal), rows=rows)
        else:
            value = self._maps_from_qk(name, q, k, scale, bias4, rows, cols)
        self._store_value(name, value, meta)

    def _maps_from_qk(self, name, q, k, scale, bias4, rows, cols):
        cd = self.compute_dtype
        b, h, n_q, _ = q.shape
        n_k_out = k.shape[-2] if cols is None else len(cols)
        block = max(1, _BLOCK_ELEMENTS // max(1, b * n_q * k.shape[-2]))

        def head_block(h0, h1):
            bb = bias4
            if bb is not None and bb.shape[1] == h and h > 1:
                bb = bb[:, h0:h1]
            p = attention_probs(q[:, h0:h1], k[:, h0:h1], scale, bb, cd)
            if cols is not None and self.weighting != "lambda2":
                p = p.index_select(-1, cols.to(p.device))
            return p

        if self.weighting == "uniform":
            acc = torch.zeros((b, n_q, n_k_out), dtype=cd, device=q.device)
            for h0 in range(0, h, block):
                acc += head_block(h0, min(h, h0 + block)).sum(1)
            return (acc / h).to(self.dtype)
        if self.weighting is None:
            out = torch.empty((b, h, n_q, n_k_out), dtype=self.dtype, device=q.device)
            for h0 in range(0, h, block):
                out[:, h0:min(h, h0 + block)] = head_block(h0, min(h, h0 + block))
            return out
        return self._reduce_full(name, head_block(0, h), rows, cols)  # lambda2 / callable

    def _reduce_full(self, name, p, rows, cols):
        if self.weighting == "lambda2":
            if p.shape[-1] != p.shape[-2]:
                raise ValueError(f"{name}: weighting='lambda2' needs square maps (self-attention); "
                                 f"got {tuple(p.shape[-2:])}")
            p = head_mean(p, "lambda2", head_dim=-3)
            if rows is not None:
                p = p.index_select(-2, rows.to(p.device))
            if cols is not None:
                p = p.index_select(-1, cols.to(p.device))
        elif self.weighting is not None:
            p = self.weighting(p)
            if not isinstance(p, Tensor):
                raise ValueError(f"weighting callable must return a tensor, got {type(p).__name__}")
        return p.to(self.dtype)

    def _record_probs(self, name: str, probs: Tensor, tokens: Any, key_tokens: Any) -> None:
        if self.keep == "qk":
            raise ValueError(f"{name}: keep='qk' is not available for this layer: its adapter "
                             "sees only probabilities, not queries and keys")
        if not isinstance(probs, Tensor) or probs.ndim != 4:
            raise ValueError(f"{name}: attention probabilities must be a (B, H, N_q, N_k) tensor")
        if self.detach:
            probs = probs.detach()
        b, h_total, n_q, n_k = probs.shape
        meta, heads, rows, cols = self._prepare(name, n_q, n_k, h_total, tokens, key_tokens)
        p = probs
        if heads is not None:
            p = p.index_select(1, heads.to(p.device))
        if self.weighting == "lambda2":   # weights from the full square maps, then rows/cols
            p = self._reduce_full(name, p.to(self.compute_dtype), rows, cols)
            self._store_value(name, p, meta)
            return
        if rows is not None:
            p = p.index_select(2, rows.to(p.device))
        if cols is not None:
            p = p.index_select(3, cols.to(p.device))
        if self.weighting == "uniform":
            p = p.to(self.compute_dtype).mean(1)
        elif self.weighting is not None:
            p = self._reduce_full(name, p.to(self.compute_dtype), None, None)
        self._store_value(name, p.to(self.dtype), meta)

    # ------------------------------------------------------------------ results
    def _finished(self, name):
        v = self._store[name]
        if self.step_reduce != "stack":
            return v
        return _stack_qk(v) if self.keep == "qk" else _stack(v)

    def _recorded(self, values: dict) -> OrderedDict:
        return OrderedDict((n, values[n]) for n in self.selected if n in values)

    def _records(self, keep: str) -> OrderedDict:
        names = [n for n in self.selected if n in self._store] if self.keep == keep else []
        return OrderedDict((n, self._finished(n)) for n in names)

    @property
    def attentions(self) -> "OrderedDict[str, Tensor]":
        """``{layer: map}`` in model order; the shape is that of :func:`attnchain.capture`'s
        contract: ``([S,] B, [H,] N_q, N_k)``. Empty under ``keep="qk"`` (see :attr:`qk`)."""
        return self._records("probs")

    @property
    def qk(self) -> "OrderedDict[str, QK]":
        """``{layer: QK}`` under ``keep="qk"`` (empty otherwise)."""
        return self._records("qk")

    @property
    def operators(self) -> "OrderedDict[str, AttentionChain]":
        """``{layer: AttentionChain}`` under ``keep="qk"``: each self-attention layer's chains as
        matrix-free operators (:meth:`QK.operator`), batch shape ``([S,] B, H)``; cross-attention
        layers and records restricted by ``rows=``/``cols=`` are left out. Each access builds the
        operators anew (one pass over each layer's blocks for the row log-sum-exp)."""
        return OrderedDict((n, qk.operator()) for n, qk in self.qk.items()
                           if qk.rows is None and qk.cols is None
                           and qk.q.shape[-2] == qk.k.shape[-2])

    @property
    def tokens(self) -> "OrderedDict[str, TokenLayout]":
        """``{layer: TokenLayout}`` of each recorded layer's full (query) sequence."""
        return self._recorded(self._layouts)

    @property
    def key_tokens(self) -> "OrderedDict[str, TokenLayout]":
        """``{layer: TokenLayout}`` of each recorded layer's key sequence (cross-attention)."""
        return self._recorded(self._key_layouts)

    @property
    def layout(self) -> TokenLayout:
        """The one token layout shared by all recorded layers (ViTs, BERT).

        Raises
        ------
        ValueError
            Nothing was recorded, or the layers' layouts differ (UNet resolutions): use
            :attr:`tokens` then.
        """
        lays = list(self.tokens.values())
        if not lays:
            raise ValueError("nothing recorded yet: run the model inside the capture context")
        if any(lay != lays[0] for lay in lays[1:]):
            raise ValueError("recorded layers have different token layouts; use rec.tokens[name]")
        return lays[0]

    @property
    def rows(self) -> "OrderedDict[str, Tensor | None]":
        """Query positions kept per layer (None = all), indices into ``tokens[name]``."""
        return OrderedDict((n, self._rows.get(n)) for n in self.selected if n in self._store)

    @property
    def cols(self) -> "OrderedDict[str, Tensor | None]":
        """Key positions kept per layer (None = all), indices into ``key_tokens[name]``."""
        return OrderedDict((n, self._cols.get(n)) for n in self.selected if n in self._store)

    def __getitem__(self, name: str) -> Tensor:
        return self.attentions[name]

    def __repr__(self) -> str:
        return (f"Recorder(adapters={self.adapters}, layers={len(self.selected)}/"
                f"{len(self.layer_names)}, recorded={len(self._store)}, steps={self.steps}, "
                f"keep={self.keep!r}, weighting={self.weighting!r}, "
                f"step_reduce={self.step_reduce!r})")

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Recorder":
        if self._entered:
            raise ValueError("a capture context can be entered once; call attnchain.capture() "
                             "again")
        self._entered = True
        self._undo = install(self, self.model)
        self.active = True
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove every hook (idempotent; also runs when the ``with`` block raises).

        Raises
        ------
        RuntimeError
            A hook could not be removed (after trying all of them).
        """
        self.active = False
        undo_all(self._undo)
