r"""CUDA's rules on a machine without a GPU: the project's device-strict mode.

A Colab reader with a GPU runtime meets errors that a CPU-only CI never sees: a tensor on the GPU
refuses ``.numpy()`` (and so NumPy, pandas, scikit-learn and matplotlib, which all convert through
``__array__``), and an operation that mixes a GPU tensor with a CPU tensor fails. This module makes
those mistakes fail on the CPU too, so that CI catches them.

:func:`enable` makes ``torch.cuda.is_available()`` true and switches on a torch function mode under
which every tensor placed on ``"cuda"`` (by a factory's ``device=``, ``.to("cuda")``, ``.cuda()``,
``model.to("cuda")``, or as the result of an operation on such tensors) is a :class:`StrictCudaTensor`:
its data stay in host memory and every computation runs on the CPU, but it reports
``device == cuda:0``, and it follows CUDA's rules:

- ``.numpy()`` and ``numpy.asarray`` raise ``TypeError`` (the message CUDA gives);
- an operation with a strict-CUDA tensor and a CPU tensor of one or more dimensions raises
  ``RuntimeError`` ("Expected all tensors to be on the same device"); zero-dimensional CPU tensors
  are allowed, as on CUDA, and so are CPU index tensors in ``x[idx]`` and values in ``x[idx] = v``;
- a CPU random generator used to draw on ``"cuda"`` raises, as on CUDA;
- ``.cpu()`` and ``.to("cpu")`` return ordinary CPU tensors (copies), and ``.item()``,
  ``.tolist()``, ``float(x)`` work, as they do on CUDA.

Device memory is accounted: :func:`memory_allocated` and :func:`max_memory_allocated` (also
reachable as ``torch.cuda.max_memory_allocated``) count the bytes of live strict-CUDA storages, so a
chapter's peak GPU memory can be measured here; ``torch.cuda.get_device_properties`` reports the
simulated GPU (:data:`GPUS`; a Colab T4 by default).

What it does not simulate: CUDA kernels' numerics (everything runs on the CPU), asynchronous
execution, and libraries that talk to the CUDA driver directly (bitsandbytes, flash-attention).

**Examples**

>>> import torch
>>> from attnchain.testing import strict_cuda
>>> with strict_cuda.enabled():
...     x = torch.ones(3, device="cuda")
...     print(x.device, float(x.sum()))
...     try:
...         x.numpy()
...     except TypeError as err:
...         print("TypeError:", str(err)[:39])
cuda:0 3.0
TypeError: can't convert cuda:0 device type tensor
"""
from __future__ import annotations

import contextlib
import threading
import types
import weakref
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["StrictCudaTensor", "GPUS", "enable", "disable", "enabled", "is_enabled",
           "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"]

CUDA = torch.device("cuda", 0)


@dataclass(frozen=True)
class GPU:
    """A simulated GPU: what ``torch.cuda.get_device_properties`` reports."""

    name: str
    total_memory: int
    major: int
    minor: int
    bf16: bool


_GIB = 2 ** 30
#: GPUs a chapter may be checked against (Colab's runtimes and a large one).
GPUS = {
    "T4": GPU("Tesla T4 (strict-cuda)", 15 * _GIB, 7, 5, False),
    "L4": GPU("NVIDIA L4 (strict-cuda)", 22 * _GIB, 8, 9, True),
    "A100": GPU("NVIDIA A100-SXM4-40GB (strict-cuda)", 40 * _GIB, 8, 0, True),
    "H100": GPU("NVIDIA H100 80GB (strict-cuda)", 80 * _GIB, 9, 0, True),
}

_MIXING_ALLOWED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.copy_,
                   torch.Tensor.to}
_TO_NUMPY = {torch.Tensor.numpy, torch.Tensor.__array__}


class StrictCudaTensor(torch.Tensor):
    """A tensor that lives in host memory but behaves, for its users, like one on ``cuda:0``."""

    @property
    def device(self) -> torch.device:  # noqa: D102 - reports the simulated device
        return CUDA

    @property
    def is_cuda(self) -> bool:  # noqa: D102
        return True

    def get_device(self) -> int:  # noqa: D102
        return 0

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"{_plain(self).__repr__()[:-1]}, device='cuda:0')"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return _dispatch(func, args, kwargs or {})


# ----------------------------------------------------------------------------------------------
# wrapping, unwrapping and memory accounting
# ----------------------------------------------------------------------------------------------
class _Memory:
    def __init__(self):
        self.lock = threading.Lock()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if key == 0:
            return
        with self.lock:
            if key not in self.refs:
                self.refs[key], self.sizes[key] = 0, size
                self.current += size
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
        weakref.finalize(t, self.release, key)

    def release(self, key: int) -> None:
        with self.lock:
            self.refs[key] -= 1
            if self.refs[key] == 0:
                del self.refs[key]
                self.current -= self.sizes.pop(key)


_memory = _Memory()


def _plain(x: StrictCudaTensor) -> torch.Tensor:
    with torch._C.DisableTorchFunctionSubclass():
        return x.as_subclass(torch.Tensor)


def _wrap(x):
    if isinstance(x, torch.Tensor) and not isinstance(x, StrictCudaTensor):
        with torch._C.DisableTorchFunctionSubclass():
            out = x.as_subclass(StrictCudaTensor)
        _memory.add(out)
        return out
    return x


def _unwrap(x):
    return _plain(x) if isinstance(x, StrictCudaTensor) else x


def _is_cuda(device) -> bool:
    if device is None or isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, (str, torch.device)):
        return torch.device(device).type == "cuda"
    return False


def _on_cpu(device):
    return "cpu" if _is_cuda(device) else device


def _target(func, args, kwargs):
    """The device an operation moves its result to: "cuda", "cpu" or None (unchanged)."""
    dev = kwargs.get("device")
    if func is torch.Tensor.cuda:
        return "cuda"
    if func is torch.Tensor.cpu:
        return "cpu"
    if func is torch.Tensor.to and dev is None:
        for a in args[1:]:
            if isinstance(a, StrictCudaTensor):
                return "cuda"
            if isinstance(a, torch.Tensor):
                return "cpu"
            if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                dev = a
                break
    if dev is None:
        return None
    return "cuda" if _is_cuda(dev) else "cpu"


def _name(func) -> str:
    return getattr(func, "__qualname__", getattr(func, "__name__", repr(func)))


def _dispatch(func, args, kwargs):
    flat, _ = tree_flatten((args, kwargs))
    strict = any(isinstance(x, StrictCudaTensor) for x in flat)
    target = _target(func, args, kwargs)
    if strict and func in _TO_NUMPY:
        raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to "
                        "copy the tensor to host memory first. [attnchain strict-cuda]")
    name = _name(func)
    if strict and func not in _MIXING_ALLOWED and not name.split(".")[-1].startswith("_"):
        cpu = [x for x in flat if isinstance(x, torch.Tensor)
               and not isinstance(x, StrictCudaTensor) and x.ndim > 0]
        if cpu:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"cuda:0 and cpu! (in {name}: a CPU tensor of shape {tuple(cpu[0].shape)} meets a "
                "CUDA tensor) [attnchain strict-cuda]")
    if target == "cuda":
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type == "cpu":
            raise RuntimeError("Expected a 'cuda' device type for generator but found 'cpu' "
                               f"(in {name}) [attnchain strict-cuda]")
    if func is torch.Tensor.cuda:
        out = _unwrap(args[0]).clone() if not isinstance(args[0], StrictCudaTensor) else args[0]
        return _wrap(out)
    if func is torch.Tensor.cpu:
        src = args[0]
        return _plain(src).clone() if isinstance(src, StrictCudaTensor) else src
    if "device" in kwargs:
        kwargs = dict(kwargs, device=_on_cpu(kwargs["device"]))
    if func is torch.Tensor.to:
        args = (args[0],) + tuple(
            _unwrap(a).dtype if isinstance(a, torch.Tensor) else _on_cpu(a) for a in args[1:])
        if target is not None and isinstance(args[0], StrictCudaTensor) and target == "cpu":
            kwargs = dict(kwargs, copy=True)
    uargs, ukwargs = tree_map(_unwrap, (args, kwargs))
    with torch._C.DisableTorchFunctionSubclass():
        out = func(*uargs, **ukwargs)
    if target == "cpu" or not (strict or target == "cuda"):
        return out
    if uargs and out is uargs[0] and isinstance(args[0], StrictCudaTensor):
        return args[0]  # an in-place method returns its own input: the caller's tensor
    return tree_map(_wrap, out)


class _StrictCudaMode(TorchFunctionMode):
    """Routes factories with ``device="cuda"`` and every ``.to``/``.cuda`` through the rules."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda) or _is_cuda(kwargs.get("device")):
            return _dispatch(func, args, kwargs)
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(x, StrictCudaTensor) for x in flat):
            return _dispatch(func, args, kwargs)
        return func(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# switching it on and off
# ----------------------------------------------------------------------------------------------
_state: dict = {}


def memory_allocated(device=None) -> int:
    """Bytes of strict-CUDA storages alive now."""
    return _memory.current


def max_memory_allocated(device=None) -> int:
    """Peak of :func:`memory_allocated` since enabling or the last :func:`reset_peak_memory_stats`."""
    return _memory.peak


def reset_peak_memory_stats(device=None) -> None:
    """Start a new peak measurement from the current allocation."""
    _memory.peak = _memory.current


def _cuda_patches(gpu: GPU) -> dict:
    props = types.SimpleNamespace(name=gpu.name, total_memory=gpu.total_memory, major=gpu.major,
                                  minor=gpu.minor, multi_processor_count=1)
    return {
        "is_available": lambda: True,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "get_device_name": lambda device=None: gpu.name,
        "get_device_properties": lambda device=None: props,
        "get_device_capability": lambda device=None: (gpu.major, gpu.minor),
        "is_bf16_supported": lambda *a, **k: gpu.bf16,
        "synchronize": lambda device=None: None,
        "empty_cache": lambda: None,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "memory_allocated": memory_allocated,
        "max_memory_allocated": max_memory_allocated,
        "reset_peak_memory_stats": reset_peak_memory_stats,
        "mem_get_info": lambda device=None: (gpu.total_memory - _memory.current,
                                             gpu.total_memory),
    }


def enable(gpu: str = "T4") -> None:
    """Switch the device-strict mode on for this process (idempotent).

    Parameters
    ----------
    gpu : str
        The simulated GPU, a key of :data:`GPUS` (``"T4"``: Colab's free runtime, 15 GiB).

    Raises
    ------
    ValueError
        Unknown ``gpu``.
    RuntimeError
        A real GPU is present: the mode would hide it.
    """
    if gpu not in GPUS:
        raise ValueError(f"gpu must be one of {sorted(GPUS)}, got {gpu!r}")
    if _state:
        return
    if torch.cuda.is_available():
        raise RuntimeError("strict-cuda simulates CUDA on machines without a GPU; this one has one")
    patches = _cuda_patches(GPUS[gpu])
    _state["saved"] = {k: getattr(torch.cuda, k) for k in patches}
    _state["overwrite"] = torch.__future__.get_overwrite_module_params_on_conversion()
    for k, v in patches.items():
        setattr(torch.cuda, k, v)
    # model.to("cuda") then replaces each parameter by a strict-CUDA parameter (as for DTensor)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    mode = _StrictCudaMode()
    mode.__enter__()
    _state["mode"] = mode
    _state["gpu"] = gpu
    _memory.current = _memory.peak = 0


def disable() -> None:
    """Switch the mode off and restore ``torch.cuda`` (idempotent)."""
    if not _state:
        return
    _state["mode"].__exit__(None, None, None)
    for k, v in _state["saved"].items():
        setattr(torch.cuda, k, v)
    torch.__future__.set_overwrite_module_params_on_conversion(_state["overwrite"])
    _state.clear()


def is_enabled() -> bool:
    """Whether the device-strict mode is on."""
    return bool(_state)


@contextlib.contextmanager
def enabled(gpu: str = "T4"):
    """Context manager form of :func:`enable` / :func:`disable`."""
    enable(gpu)
    try:
        yield
    finally:
        disable()
