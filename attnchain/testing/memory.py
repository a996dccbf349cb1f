r"""Peak memory of a block of code, on the CPU or a GPU: what the book's scaling chapter and
``benchmarks/operators.py`` report.

:class:`PeakMemory` measures the largest amount of memory a ``with`` block held at once, above
what was held when it began:

- on CUDA (and under :mod:`attnchain.testing.strict_cuda`), from the allocator's own counters,
  :func:`torch.cuda.max_memory_allocated` after :func:`torch.cuda.reset_peak_memory_stats`;
- on the CPU (Linux), from the process's peak resident set ``VmHWM``, reset at the start by
  writing ``5`` to ``/proc/self/clear_refs``. glibc keeps freed blocks below its
  ``M_MMAP_THRESHOLD`` in the heap, where they would hide later allocations; the first
  :class:`PeakMemory` of a process therefore sets that threshold to 128 KiB (``mallopt``), so
  every larger block is mapped when allocated and returned when freed. The CPU figure counts
  everything the process touches, interpreter and libraries included: trust it for allocations
  of many MiB, not for small ones.

Examples
--------
>>> import torch
>>> from attnchain.testing.memory import PeakMemory
>>> with PeakMemory("cpu") as mem:
...     x = torch.ones(2 ** 25)            # 128 MiB
...     del x
>>> mem.peak > 2 ** 26
True
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import time

import torch

__all__ = ["PeakMemory", "measure_chain", "cpu_seconds", "warm_start_passes"]

_M_MMAP_THRESHOLD = -3
_tuned: list = []


def _tune_malloc() -> None:
    if _tuned:
        return
    _tuned.append(True)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: the measurement is an upper bound
        pass


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


class PeakMemory:
    """Context manager: ``peak``, the most bytes held at once inside the block above those held
    when it began (``device`` ``"cpu"`` or ``"cuda"``).

    Raises
    ------
    RuntimeError
        On a CPU without Linux's ``/proc/self/clear_refs``.
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        if not os.path.exists("/proc/self/clear_refs"):
            raise RuntimeError("PeakMemory on the CPU needs Linux (/proc/self/clear_refs)")
        _tune_malloc()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        self._base = _status("VmRSS")
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self._base
        else:
            self.peak = max(0, _status("VmHWM") - self._base)
        return False


def cpu_seconds() -> float:
    """CPU seconds of this process (all its threads), user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn, device: torch.device):
    """``fn()``, its wall-clock seconds and the process's CPU seconds during it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t, c = time.perf_counter(), cpu_seconds()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t, cpu_seconds() - c


def measure_chain(build, device="cpu", n_bounce: int = 10, start: int = 0) -> dict:
    r"""Time and peak memory of building a chain and running TokenRank, bounce and λ2 on it.

    Inside one :class:`PeakMemory`: ``chain = build()`` (a dense map or a chain operator), then
    :func:`attnchain.token_rank`, :func:`attnchain.bounce` from token ``start`` for
    ``n_bounce`` steps, and :func:`attnchain.lambda2` with ``method="krylov"``, each timed
    (CUDA synchronised). What ``benchmarks/operators.py`` and chapter 12 compare.

    Returns
    -------
    dict
        ``pi``, ``bounce``, ``lambda2`` (the results); ``build_s``, ``token_rank_s``,
        ``bounce_s``, ``lambda2_s`` (wall-clock seconds) and the same with ``_cpu_s`` (CPU
        seconds of the process, all threads: on a machine shared with other work the steadier
        measure of cost); ``token_rank_passes``, ``lambda2_passes``; ``peak_bytes``
        (everything the calls held at once, above what was held before).

    Examples
    --------
    >>> import torch
    >>> from attnchain.operators import AttentionChain
    >>> q, k = torch.randn(2, 50, 8), torch.randn(2, 50, 8)
    >>> out = measure_chain(lambda: AttentionChain(q, k), n_bounce=2)
    >>> tuple(out["pi"].shape), tuple(out["bounce"].shape), out["token_rank_passes"] > 0
    ((2, 50), (2, 3, 50), True)
    """
    import attnchain as ac

    device = torch.device(device)
    out = {}

    def record(name, timed):
        result, out[f"{name}_s"], out[f"{name}_cpu_s"] = timed
        return result

    with PeakMemory(device) as mem:
        chain = record("build", _timed(build, device))
        pi, tr = record("token_rank", _timed(
            lambda: ac.token_rank(chain, return_info=True), device))
        bounce = record("bounce", _timed(lambda: ac.bounce(chain, start, n_bounce), device))
        l2, l2i = record("lambda2", _timed(
            lambda: ac.lambda2(chain, method="krylov", return_info=True), device))
        del chain
    out.update(pi=pi, bounce=bounce, lambda2=l2, token_rank_passes=tr["passes"],
               lambda2_passes=l2i["passes"], peak_bytes=mem.peak)
    return out


def warm_start_passes(runs):
    r"""Passes a warm start saves along sequences of chains (chapter 12).

    Parameters
    ----------
    runs : iterable of (chains, method, solve, sequence)
        ``solve(sequence, warm_start=...)`` returns ``(values, passes)`` as
        :func:`attnchain.token_rank_sequence` and :func:`attnchain.lambda2_sequence` do (bind
        their keywords with :func:`functools.partial`); ``chains`` and ``method`` name the row.

    Returns
    -------
    table : pandas.DataFrame
        Indexed by (chains, method): the passes summed over steps 1 .. end (the first step has
        nothing to start from) cold and warm, and the fraction ``saved``.
    gap : float
        The largest difference between warm and cold values: the L1 distance of distributions
        (TokenRank), the absolute difference of numbers (:math:`|\lambda_2|`).
    """
    import pandas as pd

    rows, gap = [], 0.0
    for chains, method, solve, sequence in runs:
        (cold, cold_passes), (warm, warm_passes) = (solve(sequence, warm_start=w)
                                                    for w in (False, True))
        diff = (warm - cold).abs()
        batch = getattr(sequence, "batch_shape", None) or sequence.shape[:-2]
        per_chain = diff if diff.shape == batch else diff.sum(-1)  # a number or a distribution
        gap = max(gap, float(per_chain.max()))
        rows.append({"chains": chains, "method": method, "cold": sum(cold_passes[1:]),
                     "warm": sum(warm_passes[1:])})
    table = pd.DataFrame(rows).set_index(["chains", "method"]).sort_index()
    table["saved"] = 1 - table["warm"] / table["cold"]
    return table, gap
