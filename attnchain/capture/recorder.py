"""The capture core: what a ``capture`` context records, and how adapters hand it attention.

The :class:`Recorder` is the object ``with attnchain.capture(model) as rec`` yields. Adapters
(``timm_vit``, ``hf_transformers``, ``probe_adapter``, ``diffusers_unet``, ``diffusers_flux``)
observe a model's attention modules with hooks and pass each call's queries and keys
(:meth:`Recorder.record_qk`) or post-softmax probabilities (:meth:`Recorder.record_probs`) here.
The recorder applies every memory option in one place: layer, head and step selection,
row/column (token) selection, head reductions, the storage dtype, and ``keep="qk"``.

The probabilities are recomputed from the observed queries and keys,

.. math::

    A_h = \\operatorname{softmax}\\!\\left(s\\, Q_h K_h^\\top + M\\right) \\in \\mathbb{R}^{N_q \\times N_k},

with ``s`` the layer's scale (usually ``d^{-1/2}``) and ``M`` the additive form of the
attention mask (``-inf`` on removed keys). The model's own attention kernel (fused SDPA,
flash, ...) is left untouched, so its outputs do not change; the recomputation runs in float32
(float64 when ``dtype=torch.float64``), head block by head block so that at most one block of
``N_q × N_k`` maps exists at a time beyond what is stored.

References
----------
Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025, arXiv:2507.17657.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["TokenLayout", "QK", "Recorder", "ROLES"]

#: token roles a :class:`TokenLayout` knows; ``"prefix"`` is ``cls`` + ``registers``.
ROLES = ("cls", "registers", "text", "image", "prefix")

# at most this many float32 elements per head block in the recomputation (~64 MiB)
_BLOCK_ELEMENTS = 1 << 24


def _as_indices(value: Any, what: str) -> tuple[int, ...]:
    """Positions from a ``range``/``slice``-like ``(start, stop)`` tuple, a list or a tensor."""
    if value is None:
        return ()
    if isinstance(value, range):
        return tuple(value)
    if isinstance(value, slice):
        if value.stop is None:
            raise ValueError(f"token role {what!r}: a slice needs an explicit stop")
        return tuple(range(*value.indices(value.stop)))
    if isinstance(value, Tensor):
        return tuple(int(i) for i in value.flatten().tolist())
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        # documented convention: a 2-tuple is a half-open range (start, stop)
        return tuple(range(value[0], value[1]))
    try:
        return tuple(int(i) for i in value)
    except TypeError as err:
        raise ValueError(f"token role {what!r}: cannot read positions from {value!r}") from err


@dataclass(frozen=True)
class TokenLayout:
    """Which positions of a layer's token sequence are CLS, registers, text and image tokens.

    Parameters
    ----------
    n : int
        Sequence length ``N``.
    cls, registers, text, image : tuple of int
        Positions of each role (disjoint; not every position needs a role).
    grid : (int, int) or None
        ``(rows, cols)`` of the image tokens: ``image[r * cols + c]`` is patch ``(r, c)``
        (raster order). None when the image tokens do not form a known grid.
    kind : str
        Free-form description (``"timm-vit"``, ``"bert"``, ``"flux-joint"``, ...).

    Notes
    -----
    ``layout["grid"]`` and ``layout["image"]`` work as well as attribute access, so adapters and
    readers can treat a layout like a small dict.
    """

    n: int
    cls: tuple[int, ...] = ()
    registers: tuple[int, ...] = ()
    text: tuple[int, ...] = ()
    image: tuple[int, ...] = ()
    grid: tuple[int, int] | None = None
    kind: str = ""

    def __post_init__(self):
        seen: set[int] = set()
        for role in ("cls", "registers", "text", "image"):
            idx = getattr(self, role)
            for i in idx:
                if not 0 <= i < self.n:
                    raise ValueError(f"TokenLayout: {role} position {i} outside 0..{self.n - 1}")
                if i in seen:
                    raise ValueError(f"TokenLayout: position {i} has two roles")
                seen.add(i)
        if self.grid is not None:
            if len(self.grid) != 2 or self.grid[0] * self.grid[1] != len(self.image):
                raise ValueError(
                    f"TokenLayout: grid {self.grid} does not hold the {len(self.image)} image tokens")

    @property
    def prefix(self) -> tuple[int, ...]:
        """CLS and register positions, sorted."""
        return tuple(sorted(self.cls + self.registers))

    def role(self, name: str) -> tuple[int, ...]:
        """Positions of role ``name`` (one of :data:`ROLES`)."""
        if name not in ROLES:
            raise ValueError(f"unknown token role {name!r}; expected one of {ROLES}")
        return getattr(self, name)

    def __getitem__(self, key: str) -> Any:
        if key in ("n", "grid", "kind") or key in ROLES:
            return getattr(self, key)
        raise KeyError(key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def select(self, positions: Sequence[int]) -> "TokenLayout":
        """The layout of the sub-sequence ``positions`` (in that order).

        The grid survives only if all image tokens are kept in their original order.
        """
        where = {p: i for i, p in enumerate(positions)}
        new = {role: tuple(where[p] for p in getattr(self, role) if p in where)
               for role in ("cls", "registers", "text", "image")}
        kept_image = [p for p in positions if p in set(self.image)]
        grid = self.grid if kept_image == list(self.image) else None
        return TokenLayout(n=len(positions), grid=grid, kind=self.kind, **new)

    @classmethod
    def from_spec(cls, spec: Any, n: int) -> "TokenLayout":
        """Build from a dict ``{"cls": ..., "registers": ..., "text": ..., "image": ...,
        "grid": (h, w), "kind": str}`` (a 2-tuple is a half-open range ``(start, stop)``, a list
        or tensor explicit positions), from a layout (returned as is), or None (no roles)."""
        if spec is None:
            return cls(n=n)
        if isinstance(spec, TokenLayout):
            if spec.n != n:
                raise ValueError(f"token layout has n={spec.n} but the layer has {n} tokens")
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError(f"tokens must be a TokenLayout, a dict or None, not {type(spec).__name__}")
        unknown = set(spec) - {"cls", "registers", "text", "image", "grid", "kind", "n"}
        if unknown:
            raise ValueError(f"unknown token layout keys {sorted(unknown)}")
        grid = spec.get("grid")
        return cls(n=n,
                   cls=_as_indices(spec.get("cls"), "cls"),
                   registers=_as_indices(spec.get("registers"), "registers"),
                   text=_as_indices(spec.get("text"), "text"),
                   image=_as_indices(spec.get("image"), "image"),
                   grid=None if grid is None else (int(grid[0]), int(grid[1])),
                   kind=str(spec.get("kind", "")))


@dataclass
class QK:
    """Queries and keys of one layer kept by ``keep="qk"``; :meth:`probs` forms the map.

    Attributes
    ----------
    q : Tensor ``(B, H, N_q, d)`` (``(S, B, H, N_q, d)`` with ``step_reduce="stack"``)
    k : Tensor ``(B, H, N_k, d)`` (likewise)
    scale : float
    mask : Tensor or None
        Additive mask broadcastable to ``(B, H, N_q, N_k)`` (``-inf`` = removed key), already
        restricted to the kept heads and rows.
    cols : LongTensor or None
        Key positions to keep after the softmax (the ``cols=`` option).
    """

    q: Tensor
    k: Tensor
    scale: float
    mask: Tensor | None = None
    cols: Tensor | None = None

    def logits(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scale · q kᵀ + mask``, ``(..., N_q, N_k)``."""
        s = (self.q.to(dtype) @ self.k.to(dtype).transpose(-1, -2)) * self.scale
        if self.mask is not None:
            s = s + self.mask.to(dtype)
        return s

    def probs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Post-softmax attention ``(..., N_q, N_k)`` (columns restricted when ``cols`` is set)."""
        p = torch.softmax(self.logits(dtype), dim=-1)
        if self.cols is not None:
            p = p.index_select(-1, self.cols.to(p.device))
        return p


def _mask_to_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Boolean keep-mask (True = attend) or additive float mask -> additive float bias."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise ValueError(f"attention mask must be a tensor, not {type(mask).__name__}")
    if mask.dtype == torch.bool:
        bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


def _bias_4d(bias: Tensor) -> Tensor:
    while bias.ndim < 4:
        bias = bias.unsqueeze(0)
    if bias.ndim != 4:
        raise ValueError(f"attention mask must broadcast to (B, H, N_q, N_k), got {tuple(bias.shape)}")
    return bias


class Recorder:
    """Attention recorded inside one ``attnchain.capture`` context.

    Built by :func:`attnchain.capture`; see its docstring for the options. Readers use
    :attr:`attentions`, :attr:`qk`, :attr:`tokens`, :attr:`layout`, :attr:`layer_names`,
    :attr:`steps`; adapters use :meth:`wants_layer`, :meth:`wants_step`, :meth:`wants`,
    :meth:`begin_step`, :meth:`record_qk` and :meth:`record_probs`.
    """

    def __init__(self, *, layers=None, heads=None, steps=None, reduce=None, rows=None, cols=None,
                 dtype=None, keep="probs", step_reduce=None, detach=True):
        if keep not in ("probs", "qk"):
            raise ValueError(f"keep must be 'probs' or 'qk', not {keep!r}")
        if step_reduce is None:
            step_reduce = "mean" if keep == "probs" else "stack"
        if step_reduce not in ("mean", "stack", "last"):
            raise ValueError(f"step_reduce must be 'mean', 'stack' or 'last', not {step_reduce!r}")
        if keep == "qk" and step_reduce == "mean":
            raise ValueError("keep='qk' cannot average queries/keys over steps; use step_reduce="
                             "'stack' or 'last'")
        if keep == "qk" and reduce is not None:
            raise ValueError("keep='qk' stores queries and keys; reduce= applies to maps only")
        if reduce is not None and reduce not in ("mean", "lambda2") and not callable(reduce):
            raise ValueError(f"reduce must be None, 'mean', 'lambda2' or a callable, not {reduce!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, not {dtype!r}")
        self.layers_arg = layers
        self.heads_arg = heads
        self.steps_arg = steps
        self.reduce = reduce
        self.rows_arg = rows
        self.cols_arg = cols
        self.dtype = dtype if dtype is not None else torch.float32
        self.compute_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.keep = keep
        self.step_reduce = step_reduce
        self.detach = detach

        self.layer_names: list[str] = []      # every capturable layer, model order
        self.selected: list[str] = []         # the selected ones, model order
        self._selected_set: set[str] = set()
        self.step = -1                        # index of the current forward call (step)
        self.steps: list[int] = []            # steps at which something was recorded
        self.core_counts_steps = False        # set by capture() for nn.Module roots
        self._store: dict[str, Any] = {}      # name -> tensor / QK / list (stack)
        self._count: dict[str, int] = {}
        self._layouts: dict[str, TokenLayout] = {}
        self._key_layouts: dict[str, TokenLayout] = {}
        self._rows: dict[str, Tensor | None] = {}
        self._cols: dict[str, Tensor | None] = {}
        self._undo: list[Callable[[], None]] = []
        self._model = None
        self._adapters: list[str] = []
        self.active = False
        self._entered = False

    # ------------------------------------------------------------------ selection
    def _resolve_layers(self, names: list[str]) -> None:
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
            items = [sel] if isinstance(sel, (str, int)) else list(sel)
            chosen = set()
            for it in items:
                if isinstance(it, bool):
                    raise ValueError(f"layers: {it!r} is not a layer name or index")
                if isinstance(it, int):
                    if not -len(names) <= it < len(names):
                        raise ValueError(f"layers: index {it} out of range for {len(names)} "
                                         "capturable layers")
                    chosen.add(names[it])
                elif isinstance(it, str):
                    hit = [n for n in names if n == it or fnmatch.fnmatchcase(n, it)]
                    if not hit:
                        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                        raise ValueError(f"layers: {it!r} matches no capturable layer "
                                         f"(available: {shown})")
                    chosen.update(hit)
                else:
                    raise ValueError(f"layers: {it!r} is not a layer name, pattern or index")
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
        """``wants_layer(name) and wants_step()``: call before doing any per-call work."""
        return self.active and self.wants_layer(name) and self.wants_step()

    def begin_step(self) -> None:
        """A new forward call of the captured model (a denoising step) begins.

        When the captured object is an ``nn.Module`` the core counts its forward calls itself
        and this is a no-op, so adapters may call it unconditionally.
        """
        if not self.core_counts_steps:
            self.step += 1

    def _core_step(self, *_args, **_kwargs) -> None:
        self.step += 1

    # ------------------------------------------------------------------ helpers
    def _positions(self, spec, layout: TokenLayout, n: int, what: str) -> Tensor | None:
        if spec is None:
            return None
        if callable(spec) and not isinstance(spec, (str, Tensor)):
            spec = spec(layout)
        if isinstance(spec, str):
            spec = [spec]
        if isinstance(spec, Tensor):
            idx = [int(i) for i in spec.flatten().tolist()]
        else:
            idx = []
            for it in spec:
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
        self._layouts[name] = layout
        self._key_layouts[name] = key_layout
        rows = self._positions(self.rows_arg, layout, n_q, "rows")
        cols = self._positions(self.cols_arg, key_layout, n_k, "cols")
        self._rows[name], self._cols[name] = rows, cols
        heads = None
        if self.heads_arg is not None:
            hs = [self.heads_arg] if isinstance(self.heads_arg, int) else list(self.heads_arg)
            for h in hs:
                if not -heads_total <= int(h) < heads_total:
                    raise ValueError(f"heads: head {h} out of range for {heads_total} heads in {name}")
            heads = torch.tensor([int(h) % heads_total for h in hs], dtype=torch.long)
        return heads, rows, cols

    def _store_value(self, name: str, value: Any) -> None:
        step = max(self.step, 0)
        if step not in self.steps:
            self.steps.append(step)
        c = self._count.get(name, 0) + 1
        self._count[name] = c
        if c == 1 or self.step_reduce == "last":
            self._store[name] = [value] if self.step_reduce == "stack" else value
        elif self.step_reduce == "stack":
            self._store[name].append(value)
        else:  # running mean of maps, in the storage dtype
            old = self._store[name]
            self._store[name] = (old.to(self.compute_dtype) * ((c - 1) / c)
                                 + value.to(self.compute_dtype) / c).to(old.dtype)

    # ------------------------------------------------------------------ adapter entry points
    def record_qk(self, name: str, q: Tensor, k: Tensor, *, scale: float | None = None,
                  mask: Tensor | None = None, bias: Tensor | None = None, is_causal: bool = False,
                  tokens: Any = None, key_tokens: Any = None) -> None:
        """Hand one call's queries ``(B, H, N_q, d)`` and keys ``(B, H, N_k, d)`` to the recorder.

        Parameters
        ----------
        name : str
            The layer's name (as listed by the adapter's ``attention_layers``).
        q, k : Tensor
            Exactly what the model's attention kernel multiplies (after any QK-norm / RoPE),
            before the scale is applied.
        scale : float, optional
            Logit scale; ``d ** -0.5`` when None.
        mask : Tensor, optional
            Boolean keep-mask (True = may attend) or additive float mask, broadcastable to
            ``(B, H, N_q, N_k)``. ``bias`` is an alias (additive form).
        is_causal : bool
            Add a causal mask (as SDPA's ``is_causal``).
        tokens, key_tokens
            :class:`TokenLayout` or dict spec of the query (and, for cross-attention, key)
            sequence; see :meth:`TokenLayout.from_spec`.
        """
        if not self.wants(name):
            return
        if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
            raise ValueError(f"{name}: q and k must be (B, H, N, d) with matching B, H, d; got "
                             f"{tuple(q.shape)} and {tuple(k.shape)}")
        if mask is not None and bias is not None:
            raise ValueError(f"{name}: pass mask or bias, not both")
        mask = bias if mask is None else mask
        if self.detach:
            q, k = q.detach(), k.detach()
            mask = mask.detach() if isinstance(mask, Tensor) else mask
        b, h_total, n_q, d = q.shape
        n_k = k.shape[-2]
        if scale is None:
            scale = d ** -0.5
        heads, rows, cols = self._prepare(name, n_q, n_k, h_total, tokens, key_tokens)
        cd = self.compute_dtype
        bias4 = _mask_to_bias(mask, cd)
        if bias4 is not None:
            bias4 = _bias_4d(bias4)
        if is_causal:
            causal = torch.full((n_q, n_k), float("-inf"), dtype=cd, device=q.device).triu_(1)
            causal = causal[None, None]
            bias4 = causal if bias4 is None else bias4 + causal
        if heads is not None:
            q = q.index_select(1, heads.to(q.device))
            k = k.index_select(1, heads.to(k.device))
            if bias4 is not None and bias4.shape[1] == h_total and h_total > 1:
                bias4 = bias4.index_select(1, heads.to(bias4.device))
        lam = self.reduce == "lambda2"
        if rows is not None and not lam:
            q = q.index_select(2, rows.to(q.device))
            if bias4 is not None and bias4.shape[2] == n_q and n_q > 1:
                bias4 = bias4.index_select(2, rows.to(bias4.device))
        if self.keep == "qk":
            store_dt = self.dtype
            self._store_value(name, QK(q=q.to(store_dt), k=k.to(store_dt), scale=float(scale),
                                       mask=bias4, cols=cols))
            return
        self._store_value(name, self._maps_from_qk(name, q, k, float(scale), bias4, rows, cols))

    def _maps_from_qk(self, name, q, k, scale, bias4, rows, cols):
        cd = self.compute_dtype
        b, h, n_q, _ = q.shape
        n_k_out = k.shape[-2] if cols is None else len(cols)
        block = max(1, _BLOCK_ELEMENTS // max(1, b * n_q * k.shape[-2]))

        def head_block(h0, h1):
            s = (q[:, h0:h1].to(cd) @ k[:, h0:h1].to(cd).transpose(-1, -2)) * scale
            if bias4 is not None:
                bb = bias4[:, h0:h1] if bias4.shape[1] == h and h > 1 else bias4
                s = s + bb
            p = torch.softmax(s, dim=-1)
            if cols is not None and self.reduce != "lambda2":
                p = p.index_select(-1, cols.to(p.device))
            return p

        if self.reduce == "mean":
            acc = torch.zeros((b, n_q, n_k_out), dtype=cd, device=q.device)
            for h0 in range(0, h, block):
                acc += head_block(h0, min(h, h0 + block)).sum(1)
            return (acc / h).to(self.dtype)
        if self.reduce is None:
            out = torch.empty((b, h, n_q, n_k_out), dtype=self.dtype, device=q.device)
            for h0 in range(0, h, block):
                out[:, h0:min(h, h0 + block)] = head_block(h0, min(h, h0 + block))
            return out
        full = head_block(0, h)   # lambda2 / callable: whole tensor
        return self._reduce_full(name, full, rows, cols)

    def _reduce_full(self, name, p, rows, cols):
        if self.reduce == "lambda2":
            if p.shape[-1] != p.shape[-2]:
                raise ValueError(f"{name}: reduce='lambda2' needs square maps (self-attention); "
                                 f"got {tuple(p.shape[-2:])}")
            from attnchain.spectral import weighted_head_mean  # lazy: optional sibling module
            p = weighted_head_mean(p, head_dim=-3)
            if rows is not None:
                p = p.index_select(-2, rows.to(p.device))
            if cols is not None:
                p = p.index_select(-1, cols.to(p.device))
        elif self.reduce is not None:
            p = self.reduce(p)
            if not isinstance(p, Tensor):
                raise ValueError(f"reduce callable must return a tensor, got {type(p).__name__}")
        return p.to(self.dtype)

    def record_probs(self, name: str, probs: Tensor, *, tokens: Any = None,
                     key_tokens: Any = None) -> None:
        """Hand one call's post-softmax attention ``(B, H, N_q, N_k)`` to the recorder."""
        if not self.wants(name):
            return
        if self.keep == "qk":
            raise ValueError(f"{name}: keep='qk' is not available for this layer: its adapter "
                             "sees only probabilities, not queries and keys")
        if not isinstance(probs, Tensor) or probs.ndim != 4:
            raise ValueError(f"{name}: attention probabilities must be a (B, H, N_q, N_k) tensor")
        if self.detach:
            probs = probs.detach()
        b, h_total, n_q, n_k = probs.shape
        heads, rows, cols = self._prepare(name, n_q, n_k, h_total, tokens, key_tokens)
        p = probs
        if heads is not None:
            p = p.index_select(1, heads.to(p.device))
        if self.reduce == "lambda2":   # weights from the full square maps, then rows/cols
            self._store_value(name, self._reduce_full(name, p.to(self.compute_dtype), rows, cols))
            return
        if rows is not None:
            p = p.index_select(2, rows.to(p.device))
        if cols is not None:
            p = p.index_select(3, cols.to(p.device))
        if self.reduce == "mean":
            p = p.to(self.compute_dtype).mean(1)
        elif self.reduce is not None:
            self._store_value(name, self._reduce_full(name, p.to(self.compute_dtype), None, None))
            return
        self._store_value(name, p.to(self.dtype))

    # aliases (adapter code may use either spelling)
    add_qk = record_qk
    add_probs = record_probs

    # ------------------------------------------------------------------ results
    def _finished(self, name):
        v = self._store[name]
        if self.step_reduce == "stack":
            if self.keep == "qk":
                if len(v) == 1:
                    return v[0]
                return QK(q=torch.stack([x.q for x in v]), k=torch.stack([x.k for x in v]),
                          scale=v[0].scale,
                          mask=None if v[0].mask is None else torch.stack([x.mask for x in v]),
                          cols=v[0].cols)
            return v[0] if len(v) == 1 else torch.stack(v)
        return v

    @property
    def attentions(self) -> "OrderedDict[str, Tensor]":
        """``{layer: (B, H, N_q, N_k)}`` in model order (``(B, N_q, N_k)`` with a head reduction;
        a leading step dim ``S`` with ``step_reduce="stack"`` and several recorded calls).
        Empty under ``keep="qk"`` (see :attr:`qk`)."""
        if self.keep == "qk":
            return OrderedDict()
        return OrderedDict((n, self._finished(n)) for n in self.selected if n in self._store)

    @property
    def qk(self) -> "OrderedDict[str, QK]":
        """``{layer: QK}`` under ``keep="qk"``; empty otherwise."""
        if self.keep != "qk":
            return OrderedDict()
        return OrderedDict((n, self._finished(n)) for n in self.selected if n in self._store)

    @property
    def tokens(self) -> "OrderedDict[str, TokenLayout]":
        """``{layer: TokenLayout}`` of each recorded layer's full (query) sequence."""
        return OrderedDict((n, self._layouts[n]) for n in self.selected if n in self._layouts)

    @property
    def key_tokens(self) -> "OrderedDict[str, TokenLayout]":
        """``{layer: TokenLayout}`` of each recorded layer's key sequence (differs for
        cross-attention)."""
        return OrderedDict((n, self._key_layouts[n]) for n in self.selected if n in self._key_layouts)

    @property
    def layout(self) -> TokenLayout:
        """The one token layout shared by all recorded layers (ViTs, BERT); ValueError when the
        layers differ (UNet resolutions) -- use :attr:`tokens` then."""
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
        return (f"Recorder(adapters={self._adapters}, layers={len(self.selected)}/"
                f"{len(self.layer_names)}, recorded={len(self._store)}, steps={self.steps}, "
                f"keep={self.keep!r}, reduce={self.reduce!r})")

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Recorder":
        from attnchain.capture import _install   # the dispatcher lives in the package init
        if self._entered:
            raise ValueError("a capture context can be entered once; call attnchain.capture() again")
        self._entered = True
        _install(self)
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Remove every hook / restore every processor (idempotent)."""
        self.active = False
        errors = []
        while self._undo:
            fn = self._undo.pop()
            try:
                fn()
            except Exception as err:  # keep undoing the rest
                errors.append(err)
        if errors:
            raise RuntimeError(f"attnchain capture: {len(errors)} hook(s) failed to undo: {errors[0]!r}")
