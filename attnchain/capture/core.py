r"""The capture core: the adapter interface, the adapter registry, and installing and undoing.

An *adapter* declares, for one architecture, where a layer's queries, keys, logit scale, mask
and token layout come from. This module does everything else once, for every adapter: it finds
the adapters that handle a model, resolves ``layers=``, registers the hooks, hands each call's
:class:`Observation` to the :class:`~attnchain.capture.recorder.Recorder` (which forms
:math:`\operatorname{softmax}(s\,QK^\top + M)` through :func:`attnchain.operators.attention_probs`)
and removes every hook again, in one loop, also after an exception.

**Writing an adapter**

An adapter is a module (or any object) with these functions; only the first three are required.

``matches(model) -> bool``
    True when the adapter handles ``model``. Must not raise, and must not import timm,
    transformers or diffusers just to say no (test ``sys.modules`` or class names instead,
    :func:`class_named`).
``sites(root) -> list[Site]``
    Every attention layer it can capture, in model order: the attention module, whose call is
    one attention call, and the *taps*, submodules whose outputs hold what the kernel multiplies.
``read(site, call) -> Observation | None``
    After each recorded call of ``site.module``: the queries and keys (from ``call.taps``), the
    scale, the mask (from ``call.args``, the module's arguments by name) and the token layout
    (from ``call.ctx``, what the observers saw), or the probabilities.
``root(model) -> nn.Module`` (default: ``model``)
    The module whose names the layer names are (``pipe.unet`` for a pipeline); when ``model`` is
    not an ``nn.Module``, each call of the root is one step.
``observers(root, sites) -> list[(module, fn)]`` (default: none)
    Model-wide facts a layer cannot see (the image size, position ids): before each call of
    ``module``, ``fn(ctx, args)`` stores them in ``ctx``, the dict every ``call.ctx`` is.
``accept(site, call) -> bool`` (default: True)
    Before a call: False leaves it unrecorded; raising refuses it (unsupported inputs).

Register it with :func:`register_adapter` (the built-in ones are :data:`BUILTIN_ADAPTERS`).
TransformerLens's hook points and architecture adapters, and diffusers' hook registry, are the
models of this split. An adapter for a toy attention module, declared in a few lines:

>>> import torch
>>> from torch import nn
>>> from attnchain.capture import capture, core
>>> class Toy(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
...     def forward(self, x):
...         a = torch.softmax(self.q(x)[:, None] @ self.k(x)[:, None].mT / 2, -1)
...         return a @ x[:, None]
>>> class ToyAdapter:
...     def matches(self, model):
...         return isinstance(model, Toy)
...     def sites(self, root):
...         return [core.Site("", root, taps=[("q", root.q), ("k", root.k)])]
...     def read(self, site, call):
...         q, k = call.tap("q")[:, None], call.tap("k")[:, None]
...         return core.Observation(q=q, k=k, scale=0.5, tokens={"text": (0, 3)})
>>> core.register_adapter(ToyAdapter(), name="toy")
'toy'
>>> model, x = Toy(), torch.randn(2, 3, 4)
>>> with capture(model) as rec:
...     _ = model(x)
>>> rec.attentions[""].shape
torch.Size([2, 1, 3, 3])
>>> core.unregister_adapter("toy")
"""
from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from torch import Tensor, nn

from attnchain.errors import AdapterError

__all__ = ["Site", "Call", "Observation", "Adapter", "BUILTIN_ADAPTERS", "register_adapter",
           "unregister_adapter", "registered_adapters", "matching_adapters", "available_layers",
           "install", "undo_all", "bind_args", "class_named", "find_denoiser",
           "denoiser_lookup"]

#: the adapters every capture tries, in this order (module paths, imported on first use).
BUILTIN_ADAPTERS = tuple(f"attnchain.capture.adapters.{name}" for name in
                         ("probe", "timm_vit", "hf_transformers", "diffusers_unet",
                          "diffusers_flux"))

_REQUIRED = ("matches", "sites", "read")


@dataclass
class Site:
    """One attention layer an adapter can capture.

    Parameters
    ----------
    name : str
        The layer's name: normally its ``root.named_modules()`` name (``"blocks.3.attn"``).
    module : nn.Module
        The attention module; one call of it is one attention call.
    taps : sequence of ``(key, module)`` or ``(key, module, transform)``
        While a call is recorded, the output of ``module`` (or ``transform(output)``) is kept as
        ``call.taps[key]``. Several taps may share a key (the one that ran last wins).
    info : any
        Whatever the adapter wants back in :func:`read` (an owner module, a block kind, ...).
    """

    name: str
    module: nn.Module
    taps: Sequence[tuple] = ()
    info: Any = None


@dataclass
class Call:
    """What one recorded call of a :class:`Site` made observable.

    Attributes
    ----------
    args : dict
        The attention module's arguments by parameter name (:func:`bind_args`).
    ctx : dict
        The adapter's shared dict, filled by its observers (one per capture context).
    taps : dict
        The tapped outputs of this call, by key.
    output : any
        The attention module's output.
    """

    args: dict
    ctx: dict
    taps: dict = field(default_factory=dict)
    output: Any = None
    name: str = ""

    def tap(self, *keys: str) -> Any:
        """The first tapped output among ``keys``.

        Raises
        ------
        RuntimeError
            None of them was observed (the module's forward did not call the tapped modules).
        """
        for key in keys:
            if self.taps.get(key) is not None:
                return self.taps[key]
        raise RuntimeError(f"attnchain capture: {self.name}: {' or '.join(keys)} was not observed "
                           "during the call (the attention forward did not call the module the "
                           "adapter taps)")


@dataclass
class Observation:
    """What an adapter's ``read`` returns for one call: queries and keys, or probabilities.

    Parameters
    ----------
    q, k : Tensor, shape (B, H, N_q, d) and (B, H, N_k, d)
        Exactly what the model's kernel multiplies (after QK-norm and RoPE, before the scale).
    scale : float, optional
        The logit scale ``s`` (``d ** -0.5`` when None).
    mask : Tensor, optional
        Boolean keep-mask (True = may attend) or additive float mask, broadcastable to
        ``(B, H, N_q, N_k)``.
    is_causal : bool
        Add a causal mask (as SDPA's ``is_causal``).
    probs : Tensor, shape (B, H, N_q, N_k), optional
        Post-softmax attention, for adapters that see only probabilities (instead of q, k).
    tokens, key_tokens : dict or TokenLayout, optional
        Layout of the query (and, for cross-attention, key) sequence
        (:meth:`attnchain.capture.TokenLayout.from_spec`).
    """

    q: Tensor | None = None
    k: Tensor | None = None
    scale: float | None = None
    mask: Tensor | None = None
    is_causal: bool = False
    probs: Tensor | None = None
    tokens: Any = None
    key_tokens: Any = None


def _model_itself(model: Any) -> Any:
    return model


def _no_observers(root: nn.Module, sites: list[Site]) -> list:
    return []


def _accept_all(site: Site, call: Call) -> bool:
    return True


@dataclass(frozen=True)
class Adapter:
    """An adapter as the core uses it: its functions, with the optional ones defaulted."""

    name: str
    matches: Callable[[Any], bool]
    sites: Callable[[nn.Module], list]
    read: Callable[[Site, Call], Any]
    root: Callable[[Any], nn.Module] = _model_itself
    observers: Callable[[nn.Module, list], list] = _no_observers
    accept: Callable[[Site, Call], bool] = _accept_all

    @classmethod
    def from_object(cls, obj: Any, name: str) -> "Adapter":
        """Read the interface off a module or object; AdapterError names what is missing."""
        missing = [fn for fn in _REQUIRED if not callable(getattr(obj, fn, None))]
        if missing:
            raise AdapterError(f"capture adapter {name!r} has no {', '.join(missing)}() (an "
                               f"adapter defines {', '.join(_REQUIRED)}; see "
                               "attnchain.capture.core)")
        optional = {fn: getattr(obj, fn) for fn in ("root", "observers", "accept")
                    if callable(getattr(obj, fn, None))}
        return cls(name, obj.matches, obj.sites, obj.read, **optional)


_registry: dict[str, str | Adapter] = {path: path for path in BUILTIN_ADAPTERS}


def _load(name: str) -> Adapter:
    entry = _registry[name]
    if isinstance(entry, Adapter):
        return entry
    try:
        module = importlib.import_module(entry)
    except Exception as err:
        raise AdapterError(f"capture adapter {entry!r} cannot be imported: {err!r}") from err
    _registry[name] = adapter = Adapter.from_object(module, name)
    return adapter


def register_adapter(adapter: Any, *, name: str | None = None) -> str:
    """Make ``capture`` try one more adapter (after those registered before it).

    Parameters
    ----------
    adapter : str, module or object
        A module path (imported now), a module, or an object with the adapter functions (see
        :mod:`attnchain.capture.core`).
    name : str, optional
        Registry key (default: the module path, or the object's class name).

    Returns
    -------
    str
        The key, for :func:`unregister_adapter`.

    Raises
    ------
    AdapterError
        The module cannot be imported (the message carries the import error) or the adapter lacks
        ``matches``, ``sites`` or ``read``.
    ValueError
        ``name`` is registered already.

    Examples
    --------
    >>> from attnchain.capture import core
    >>> core.register_adapter("attnchain.capture.no_such_adapter")
    Traceback (most recent call last):
    ...
    attnchain.errors.AdapterError: capture adapter 'attnchain.capture.no_such_adapter' cannot be \
imported: ModuleNotFoundError("No module named 'attnchain.capture.no_such_adapter'")

    See Also
    --------
    unregister_adapter, registered_adapters
    """
    if name is None:
        name = adapter if isinstance(adapter, str) else getattr(adapter, "__name__",
                                                                  type(adapter).__name__)
    if name in _registry:
        raise ValueError(f"a capture adapter named {name!r} is registered already")
    _registry[name] = adapter if isinstance(adapter, str) else Adapter.from_object(adapter, name)
    try:
        _load(name)
    except AdapterError:
        del _registry[name]
        raise
    return name


def unregister_adapter(name: str) -> None:
    """Remove the adapter registered as ``name``.

    Raises
    ------
    KeyError
        No adapter is registered as ``name``.

    See Also
    --------
    register_adapter
    """
    del _registry[name]


def registered_adapters() -> tuple[str, ...]:
    """The registry keys, in the order ``capture`` tries them.

    Examples
    --------
    >>> from attnchain.capture import core
    >>> core.registered_adapters() == core.BUILTIN_ADAPTERS
    True

    See Also
    --------
    register_adapter
    """
    return tuple(_registry)


def matching_adapters(model: Any) -> list[tuple[Adapter, nn.Module, list[Site]]]:
    """``(adapter, root, sites)`` for every registered adapter that handles ``model``.

    Raises
    ------
    AdapterError
        A registered adapter cannot be imported.
    ValueError
        No adapter handles ``model``, or those that do find no attention layer.

    Examples
    --------
    >>> import attnchain as ac
    >>> model, _ = ac.zoo.load("tiny-timm-vit")
    >>> [(a.name, [s.name for s in sites]) for a, _, sites in matching_adapters(model)]
    [('attnchain.capture.adapters.timm_vit', ['blocks.0.attn', 'blocks.1.attn'])]
    """
    found = []
    for name in list(_registry):
        adapter = _load(name)
        if adapter.matches(model):
            root = adapter.root(model)
            found.append((adapter, root, list(adapter.sites(root))))
    if not found:
        raise ValueError(f"attnchain.capture: no adapter handles {type(model).__name__} (tried "
                         f"{', '.join(n.rsplit('.', 1)[-1] for n in _registry)})")
    if not any(sites for _, _, sites in found):
        raise ValueError(f"attnchain.capture: {type(model).__name__} has no attention layer that "
                         f"{', '.join(a.name for a, _, _ in found)} can capture")
    return found


def _model_order(model: Any, found) -> list[str]:
    """Layer names in the order the model computes them: each adapter's own order of its sites
    (which may differ from module registration order: a UNet registers ``mid_block`` after its
    up blocks), adapters placed by where their first site stands in ``model.named_modules()``."""
    lists = [[s.name for s in sites] for _, _, sites in found if sites]
    if len(lists) > 1 and isinstance(model, nn.Module):
        order = {n: i for i, (n, _) in enumerate(model.named_modules())}
        lists.sort(key=lambda names: order.get(names[0], len(order)))
    return [n for names in lists for n in names]


def available_layers(model: Any) -> list[str]:
    """Names of every attention layer ``capture`` can record in ``model``, in model order.

    Examples
    --------
    >>> import attnchain as ac
    >>> model, _ = ac.zoo.load("tiny-timm-vit")
    >>> ac.capture.available_layers(model)
    ['blocks.0.attn', 'blocks.1.attn']

    See Also
    --------
    attnchain.capture.capture : ``layers=`` selects among these.
    matching_adapters : the adapters and sites behind the names.
    """
    found = matching_adapters(model)
    return _model_order(model, found)


def install(rec: Any, model: Any) -> list[Callable[[], None]]:
    """Register every hook recorder ``rec`` needs on ``model`` and return their removers.

    On any error the hooks registered so far are removed (:func:`undo_all`) before it propagates.
    Called by ``Recorder.__enter__``; the recorder's ``close`` removes the hooks again.

    Raises
    ------
    AdapterError, ValueError
        As :func:`matching_adapters`; ValueError also for a bad ``layers=`` or a pipeline with
        several denoisers.

    See Also
    --------
    undo_all, attnchain.capture.recorder.Recorder
    """
    found = matching_adapters(model)
    rec.select_layers(_model_order(model, found))
    rec.adapters = [a.name.rsplit(".", 1)[-1] for a, _, _ in found]
    undo: list[Callable[[], None]] = []
    try:
        roots = [model] if isinstance(model, nn.Module) else \
            list({id(r): r for _, r, _ in found}.values())
        if len(roots) != 1:
            raise ValueError(f"attnchain.capture: {type(model).__name__} holds {len(roots)} "
                             "denoisers; capture one of them")
        undo.append(roots[0].register_forward_pre_hook(lambda *_: rec.begin_step()).remove)
        for adapter, root, sites in found:
            chosen = [s for s in sites if rec.wants_layer(s.name)]
            ctx: dict = {}
            for module, fn in (adapter.observers(root, chosen) if chosen else []):
                undo.append(_observe(module, fn, ctx))
            for site in chosen:
                _watch(site, adapter, rec, ctx, undo)
    except BaseException as err:
        undo_all(undo, during=err)
        raise
    return undo


def undo_all(undo: list[Callable[[], None]], during: BaseException | None = None) -> None:
    """Call every remover in ``undo`` (last first) and empty it, even if some fail.

    Raises
    ------
    RuntimeError
        Some remover failed (after all were tried). With ``during`` (an exception already on its
        way) the failure is added to that exception's notes instead.

    Examples
    --------
    >>> done = []
    >>> undo = [lambda: done.append(1), lambda: done.append(2)]
    >>> undo_all(undo)
    >>> done, undo
    ([2, 1], [])
    """
    errors = []
    while undo:
        fn = undo.pop()
        try:
            fn()
        except Exception as err:  # keep undoing the rest
            errors.append(err)
    if errors:
        msg = f"attnchain capture: {len(errors)} hook(s) failed to undo: {errors[0]!r}"
        if during is None:
            raise RuntimeError(msg) from errors[0]
        during.add_note(msg)


def _observe(module: nn.Module, fn: Callable[[dict, dict], None], ctx: dict) -> Callable:
    def pre(mod, args, kwargs):
        fn(ctx, bind_args(mod.forward, args, kwargs))

    return module.register_forward_pre_hook(pre, with_kwargs=True).remove


def _watch(site: Site, adapter: Adapter, rec: Any, ctx: dict, undo: list) -> None:
    """The per-call scratch protocol: a pre-hook opens a :class:`Call` (when the recorder wants
    this layer and step and the adapter accepts), the taps fill it, and the post-hook reads it,
    records, and drops it, so no tensor outlives the call."""
    state: dict[str, Call] = {}

    def pre(module, args, kwargs):
        state.clear()
        if rec.wants(site.name):
            call = Call(bind_args(module.forward, args, kwargs), ctx, name=site.name)
            if adapter.accept(site, call):
                state["call"] = call

    def tap(key, transform):
        def hook(module, args, output):
            if "call" in state:
                state["call"].taps[key] = output if transform is None else transform(output)
        return hook

    def post(module, args, kwargs, output):
        call = state.pop("call", None)
        if call is not None:
            call.output = output
            obs = adapter.read(site, call)
            if obs is not None:
                rec.record(site.name, obs)

    undo.append(site.module.register_forward_pre_hook(pre, with_kwargs=True).remove)
    for key, module, *transform in site.taps:
        undo.append(module.register_forward_hook(tap(key, (transform or [None])[0])).remove)
    undo.append(site.module.register_forward_hook(post, with_kwargs=True).remove)


# ----------------------------------------------------------------------------------------------
# helpers for adapters
# ----------------------------------------------------------------------------------------------
_SIGNATURES: dict[Any, inspect.Signature] = {}


def bind_args(fn: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A call's arguments by parameter name (positionals included, ``**kwargs`` flattened).

    Falls back to ``kwargs`` when the arguments do not bind to ``fn``'s signature.

    Examples
    --------
    >>> def forward(hidden_states, attention_mask=None, **extra): ...
    >>> bind_args(forward, (1,), {"attention_mask": 2, "rope": 3})
    {'hidden_states': 1, 'attention_mask': 2, 'rope': 3}
    """
    key = getattr(fn, "__func__", fn)
    sig = _SIGNATURES.get(key)
    if sig is None:
        sig = _SIGNATURES[key] = inspect.signature(fn)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError:
        return dict(kwargs)
    out = dict(bound.arguments)
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD and isinstance(out.get(p.name), dict):
            out.update(out.pop(p.name))
    return out


def class_named(obj: Any, cls_name: str, package: str) -> bool:
    """True if ``obj`` is an instance of a class ``cls_name`` defined in ``package`` (by name,
    through the MRO, so that ``matches`` never imports ``package``).

    Examples
    --------
    >>> from torch import nn
    >>> class MyLinear(nn.Linear):
    ...     pass
    >>> layer = MyLinear(1, 1)
    >>> class_named(layer, "Linear", "torch"), class_named(layer, "Linear", "timm")
    (True, False)
    """
    return any(c.__name__ == cls_name and c.__module__.split(".")[0] == package
               for c in type(obj).__mro__)


def find_denoiser(obj: Any, attr: str, cls_name: str) -> nn.Module | None:
    """``obj`` if it is a diffusers ``cls_name``, else ``obj.<attr>`` if that is one (a pipeline
    such as ``StableDiffusionPipeline``), else None. Never imports diffusers.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> find_denoiser(SimpleNamespace(unet=None), "unet", "UNet2DConditionModel") is None
    True

    See Also
    --------
    denoiser_lookup
    """
    if "diffusers" not in sys.modules:
        return None
    if class_named(obj, cls_name, "diffusers"):
        return obj
    inner = getattr(obj, attr, None) if not isinstance(obj, nn.Module) else None
    return inner if inner is not None and class_named(inner, cls_name, "diffusers") else None


def denoiser_lookup(attr: str, cls_name: str) -> tuple[Callable, Callable]:
    """The ``root`` and ``matches`` of an adapter for a diffusers denoiser class ``cls_name``.

    ``root(model)`` is :func:`find_denoiser` (the model itself, or a pipeline's ``.<attr>``);
    ``matches(model)`` says whether there is one.

    Examples
    --------
    >>> root, matches = denoiser_lookup("unet", "UNet2DConditionModel")
    >>> matches(object())
    False
    """
    def root(model: Any) -> nn.Module | None:
        return find_denoiser(model, attr, cls_name)

    def matches(model: Any) -> bool:
        return root(model) is not None

    root.__doc__ = f"The {cls_name}: ``model`` itself, or a pipeline's ``model.{attr}``."
    matches.__doc__ = f"True for a diffusers {cls_name} (or subclass), or a pipeline holding one."
    return root, matches
