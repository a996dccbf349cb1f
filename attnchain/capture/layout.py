"""Token layouts: which positions of a captured layer's sequence are CLS, registers, text, image.

Every record of :func:`attnchain.capture` comes with the :class:`TokenLayout` of its query (and
key) sequence, so that read-outs can restrict a chain to the image tokens or start a bounce at the
CLS token without knowing the architecture.

**Examples**

>>> from attnchain.capture import TokenLayout
>>> lay = TokenLayout.from_spec({"cls": (0, 1), "image": (1, 5), "grid": (2, 2)}, n=5)
>>> lay.cls, lay.image, lay.grid
((0,), (1, 2, 3, 4), (2, 2))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from torch import Tensor

__all__ = ["TokenLayout", "ROLES"]

#: token roles a :class:`TokenLayout` knows; ``"prefix"`` is ``cls`` + ``registers``.
ROLES = ("cls", "registers", "text", "image", "prefix")


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

    Raises
    ------
    ValueError
        A position outside ``0 .. n - 1``, a position with two roles, or a grid that does not
        hold the image tokens.

    Notes
    -----
    ``layout["grid"]`` and ``layout["image"]`` work as well as attribute access, so adapters and
    readers can treat a layout like a small dict.

    Examples
    --------
    >>> lay = TokenLayout(n=7, cls=(0,), registers=(1, 2), image=(3, 4, 5, 6), grid=(2, 2))
    >>> lay.prefix, lay["grid"], lay.role("image")
    ((0, 1, 2), (2, 2), (3, 4, 5, 6))
    >>> TokenLayout(n=3, cls=(0,), image=(0, 1))
    Traceback (most recent call last):
    ...
    ValueError: TokenLayout: position 0 has two roles

    See Also
    --------
    TokenLayout.from_spec : the dict form adapters declare.
    attnchain.capture : records a layout per layer (``rec.tokens``, ``rec.layout``).
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
                raise ValueError(f"TokenLayout: grid {self.grid} does not hold the "
                                 f"{len(self.image)} image tokens")

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

        Examples
        --------
        >>> lay = TokenLayout(n=5, cls=(0,), image=(1, 2, 3, 4), grid=(2, 2))
        >>> lay.select([0, 2, 3]).image, lay.select([0, 2, 3]).grid
        ((1, 2), None)
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
        or tensor explicit positions), from a layout (returned as is), or None (no roles).

        Parameters
        ----------
        spec : dict, TokenLayout or None
            The layout; the form adapters return in :class:`attnchain.capture.core.Observation`.
        n : int
            Sequence length.

        Returns
        -------
        TokenLayout

        Raises
        ------
        ValueError
            Unknown keys, unreadable positions, or a layout whose ``n`` differs.

        Examples
        --------
        >>> TokenLayout.from_spec({"text": [1, 2], "kind": "bert-text"}, 3).text
        (1, 2)
        """
        if spec is None:
            return cls(n=n)
        if isinstance(spec, TokenLayout):
            if spec.n != n:
                raise ValueError(f"token layout has n={spec.n} but the layer has {n} tokens")
            return spec
        if not isinstance(spec, Mapping):
            raise ValueError("tokens must be a TokenLayout, a dict or None, not "
                             f"{type(spec).__name__}")
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


