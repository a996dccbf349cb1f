"""Every input check of the Markov core, in one private module.

Public modules call these helpers and nothing else checks arguments: a bad input gets a
:class:`ValueError` that names what is wrong. The helpers take the public name of the argument
(``name=``) and an optional prefix naming the public function (``where=``), so that messages read
the same whichever function raised them.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch

HALF = (torch.float16, torch.bfloat16)


def first_bad(mask: torch.Tensor) -> tuple:
    """Index (tuple) of the first True entry of a bool tensor."""
    return tuple(torch.nonzero(mask)[0].tolist())


def broadcast_batch(a: torch.Size, b: torch.Size, name_a: str, name_b: str) -> torch.Size:
    """The broadcast of two batch shapes, or a ValueError naming both arguments."""
    try:
        return torch.broadcast_shapes(a, b)
    except RuntimeError:
        raise ValueError(f"the batch shape {tuple(b)} of {name_b} does not broadcast with the "
                         f"batch shape {tuple(a)} of {name_a}") from None


def as_tensor(x, name: str) -> torch.Tensor:
    """``x`` itself if it is a tensor, else ``torch.as_tensor(x)``."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except Exception as exc:  # pragma: no cover - message only
        raise ValueError(f"{name} must be a tensor or array-like, got {type(x).__name__}") from exc


def compute_dtype(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """float32 by default, float64 if the input is float64 or it is asked for; halves upcast."""
    if dtype is not None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        return dtype
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32


def check_real(A: torch.Tensor, name: str = "A") -> None:
    if A.is_complex():
        raise ValueError(f"{name} must be real, got dtype {A.dtype}")
    if A.dtype == torch.bool:
        raise ValueError(f"{name} must be a real floating tensor, got dtype {A.dtype}")


def check_square(A: torch.Tensor, name: str = "A") -> int:
    """``N`` of a real ``(..., N, N)`` tensor with ``N >= 1``."""
    check_real(A, name)
    if A.ndim < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be square in its last two dims (..., N, N), got shape "
                         f"{tuple(A.shape)}")
    if A.shape[-1] == 0:
        raise ValueError(f"{name} is empty: N = 0 tokens")
    return A.shape[-1]


def check_rows(A: torch.Tensor, atol: float, name: str = "A",
               rows: Optional[torch.Tensor] = None) -> None:
    """The row checks of ``check_stochastic`` for ``(..., M, N)`` (square or not); ``rows``: the
    row sums, when a caller already has them (from a product with ones). A finite row sum
    proves the row has no NaN or Inf, so the checks cost two passes (sums, minimum)."""
    if isinstance(atol, bool) or not isinstance(atol, Real) or not 0 <= atol < math.inf:
        # a NaN tolerance would make every comparison below False and accept anything
        raise ValueError(f"atol must be a finite number >= 0, got {atol!r}")
    if A.numel() == 0:  # an empty batch: nothing to check
        return
    if A.dtype in HALF:
        atol = max(atol, torch.finfo(A.dtype).eps)
    if not A.is_floating_point():
        A = A.to(torch.float64)
    if rows is None:
        rows = A.sum(-1, dtype=torch.float64 if A.dtype == torch.float64 else torch.float32)
    if not torch.isfinite(rows).all():
        bad = ~torch.isfinite(A)
        if bad.any():
            raise ValueError(f"{name} contains NaN or Inf entries (first at index "
                             f"{first_bad(bad)})")
        raise ValueError(f"{name} has rows whose sum overflows to Inf")
    amin = A.amin()
    if amin < 0:
        raise ValueError(f"{name} has negative entries (min {amin.item():.3g}, first at index "
                         f"{first_bad(A < 0)}); a transition matrix must be non-negative")
    zero = rows == 0
    if zero.any():
        raise ValueError(f"{name} has zero rows (first at batch/row index {first_bad(zero)}): "
                         "every row must be a probability distribution")
    dev = (rows - 1).abs()
    if (dev > atol).any():
        worst = dev.max().item()
        raise ValueError(f"{name} has rows not summing to 1 (max |row sum - 1| = {worst:.3g} > "
                         f"atol = {atol:g}, first at batch/row index {first_bad(dev > atol)}); "
                         "use to_stochastic(x, kind='weights') to normalise")


def prepare(A, dtype=None, atol: float = 1e-4, check: bool = True, name: str = "A"
            ) -> torch.Tensor:
    """``A`` as a square tensor in the compute dtype, checked (``check``) to be row-stochastic;
    half-precision input is checked with ``atol`` raised to its machine epsilon (rounding to half
    precision moves row sums by up to eps / 2) and renormalised after the upcast."""
    A = as_tensor(A, name)
    check_square(A, name)
    low = A.dtype in HALF
    if low:
        atol = max(atol, torch.finfo(A.dtype).eps)
    A = A.to(compute_dtype(A, dtype))
    if check:
        check_rows(A, atol, name)
    if low:
        A = A / A.sum(-1, keepdim=True)
    return A


def late_row_check(A3: torch.Tensor, atol: float, whole: torch.Tensor):
    """A check of the members ``s`` (a slice) of a flattened batch ``A3`` (B, N, N), run group
    by group by the solvers just before a group is first read: ``check(s, rows=None)``. A bad
    group is re-checked as the caller's tensor ``whole`` (``A3`` before flattening), so that the
    error names indices in the caller's shape."""
    def check(s: slice, rows: Optional[torch.Tensor] = None) -> None:
        try:
            check_rows(A3[s], atol, rows=rows)
        except ValueError:
            check_rows(whole, atol)
            raise
    return check


def check_choice(value, name: str, choices) -> str:
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        listed = [repr(c) for c in choices]
        listed = ", ".join(listed[:-1]) + " or " + listed[-1] if len(listed) > 1 else listed[0]
        raise ValueError(f"{name} must be {listed}, got {value!r}")
    return value


def check_int(value, name: str, low: int = 1, high: Optional[int] = None, where: str = ""
              ) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``."""
    ok = not isinstance(value, bool) and isinstance(value, int) and value >= low \
        and (high is None or value <= high)
    if not ok:
        what = (f"an int in [{low}, {high}]" if high is not None else
                "a non-negative int" if low == 0 else
                "a positive int" if low == 1 else f"an int >= {low}")
        raise ValueError(f"{where}{name} must be {what}, got {value!r}")
    return value


def check_positive(value, name: str, finite: bool = False) -> float:
    """``value`` if it is a positive real number (a tolerance), finite if asked."""
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0 \
            or (finite and not value < math.inf):
        what = "a finite positive number" if finite else "a positive number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def check_fraction(value, name: str, closed: bool = True, where: str = "") -> float:
    """``float(value)`` if it lies in [0, 1] (``closed``) or in (0, 1)."""
    try:
        x = math.nan if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        x = math.nan
    inside = (0.0 <= x <= 1.0) if closed else (0.0 < x < 1.0)
    if not inside:
        span = "[0, 1]" if closed else "(0, 1)"
        raise ValueError(f"{where}{name} must lie in {span}, got {value!r}")
    return x


def _nonnegative_rows(x: torch.Tensor, N: int, name: str) -> torch.Tensor:
    """``x`` if it is ``(..., N)``, finite and nonnegative; else a ValueError naming ``name``."""
    if x.ndim == 0 or x.shape[-1] != N:
        raise ValueError(f"{name} must have last dim N = {N}, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf entries")
    if (x < 0).any():
        raise ValueError(f"{name} has negative entries; it must be a probability distribution")
    return x


def check_personalization(p, N: int, dtype, device) -> torch.Tensor:
    """The teleport distribution ``(..., N)`` (uniform for ``None``), normalised to sum 1."""
    if p is None:
        return torch.full((N,), 1.0 / N, dtype=dtype, device=device)
    p = _nonnegative_rows(as_tensor(p, "personalization").to(device=device, dtype=dtype), N,
                          "personalization")
    s = p.sum(-1, keepdim=True)
    if (s == 0).any():
        raise ValueError("personalization sums to 0; it must put mass on some token")
    return p / s


def start_distribution(start, N: int, dtype, device, atol: float) -> torch.Tensor:
    """An int / index tensor / one-hot / distribution as ``(..., N)`` row vectors."""
    if isinstance(start, bool):
        raise ValueError("start must be a token index, a one-hot or a distribution, not a bool")
    if isinstance(start, int):
        if not -N <= start < N:
            raise ValueError(f"start index {start} out of range for N = {N} tokens")
        v = torch.zeros(N, dtype=dtype, device=device)
        v[start] = 1.0
        return v
    s = as_tensor(start, "start").to(device)
    if s.dtype == torch.bool or s.is_complex():
        raise ValueError(f"start must be integer indices or a real distribution, got {s.dtype}")
    if not s.is_floating_point():  # integer index tensor (...,) -> one-hot (..., N)
        s = s.long()  # before comparing: -N wraps around in unsigned dtypes
        if ((s < -N) | (s >= N)).any():
            raise ValueError(f"start indices out of range for N = {N} tokens")
        return torch.nn.functional.one_hot(s % N, N).to(dtype)
    low = s.dtype in HALF
    if low:  # rounding to half precision moves the sum by up to N eps / 2
        atol = max(atol, N * torch.finfo(s.dtype).eps)
    s = _nonnegative_rows(s.to(dtype), N, "start")
    total = s.sum(-1, keepdim=True)
    dev = (total - 1).abs()
    if (dev > atol).any():
        raise ValueError(f"start does not sum to 1 (max |sum - 1| = {dev.max().item():.3g} > "
                         f"atol = {atol:g})")
    return s / total if low else s


def token_indices(tokens, N: int) -> torch.Tensor:
    """A token list, LongTensor or bool keep-mask of shape ``(N,)`` as a LongTensor of indices."""
    idx = as_tensor(tokens, "tokens")
    if idx.dtype == torch.bool:
        if idx.shape != (N,):
            raise ValueError(f"a boolean token mask must have shape ({N},), got {tuple(idx.shape)}")
        idx = torch.nonzero(idx)[:, 0]
    idx = idx.reshape(-1).long()
    if idx.numel() == 0:
        raise ValueError("restrict: no tokens to keep")
    if bool(((idx < -N) | (idx >= N)).any()):
        raise ValueError(f"restrict: token index out of range for N = {N} tokens")
    return idx


def check_mask(mask, x: torch.Tensor) -> torch.Tensor:
    """A bool keep-mask broadcastable to ``x``, on ``x``'s device."""
    mask = as_tensor(mask, "mask").to(x.device)
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = keep key), got {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError as exc:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x of "
                         f"shape {tuple(x.shape)}") from exc
    return mask
