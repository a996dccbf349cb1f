"""Iterative solvers of the Markov core, written once against chain operators.

Every solver multiplies only through :class:`~attnchain.operators.ChainOperator`.

- :mod:`.gmres`: the stationary distribution of a damped chain (restarted GMRES, verified by one
  damped step, with power iteration as the fallback), :mod:`.power`: power iteration.
- :mod:`.block_krylov`: :math:`|\\lambda_2|` by Krylov-Schur iteration, certified on the magnitude.

Each solver takes a flattened operator (batch shape ``(B,)``) and works on cache-sized groups of
its chains (:func:`cache_groups`); an optional ``check(s, rows=None)`` callback validates group
``s`` just before it is first read. What they do and why is on the book's Numerics page.
"""
from __future__ import annotations

import glob
import os

from ..operators import ChainOperator


def last_level_cache_bytes(default: int = 32 * 2 ** 20) -> int:
    """Size of the CPU's largest cache in bytes, read from Linux's sysfs
    (``/sys/devices/system/cpu/cpu0/cache``), or ``default`` where it cannot be read."""
    sizes = []
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(d, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(d, "size")) as f:
                text = f.read().strip().upper()
            unit = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return max(sizes) if sizes else default


def cache_groups(op: ChainOperator, group_bytes: int) -> list:
    """Slices of the flat batch of ``op`` to iterate on one after the other: on CPU as many
    chains as fit in ``group_bytes`` (at least one), so that repeated passes over a group find
    it in cache; on other devices, or for an operator that does not say how much it reads
    (``member_bytes is None``), the whole batch."""
    B = op.batch_shape[0]
    if op.device.type != "cpu" or not op.member_bytes:
        g = B
    else:
        g = max(1, group_bytes // op.member_bytes)
    return [slice(s, s + g) for s in range(0, B, max(g, 1))]
