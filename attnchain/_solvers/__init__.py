"""Iterative solvers of the Markov core, written once against chain operators.

Every solver multiplies only through :class:`~attnchain.operators.ChainOperator`.

- :mod:`.gmres`: the stationary distribution of a damped chain (restarted GMRES, verified by one
  damped step, with power iteration as the fallback), :mod:`.power`: power iteration.
- :mod:`.block_krylov`: :math:`|\\lambda_2|` by Krylov-Schur iteration, certified on the magnitude.

Each solver takes a flattened operator (batch shape ``(B,)``) and works on groups of its chains
of a given size in bytes (:func:`cache_groups`); an optional ``check(s, rows=None)`` callback
validates group ``s`` just before it is first read. What they do and why is on the book's
Numerics page.
"""
from __future__ import annotations

from ..operators import ChainOperator


def cache_groups(op: ChainOperator, group_bytes: int) -> list:
    """Slices of the flat batch of ``op`` to iterate on one after the other: on CPU as many
    chains as fit in ``group_bytes`` (at least one), so that repeated passes over a small group
    can find it in cache, or so that a large batch is not processed all at once; on other
    devices, or for an operator that does not say how much it reads (``member_bytes is None``),
    the whole batch."""
    B = op.batch_shape[0]
    if op.device.type != "cpu" or not op.member_bytes:
        g = B
    else:
        g = max(1, group_bytes // op.member_bytes)
    return [slice(s, s + g) for s in range(0, B, max(g, 1))]
