"""The exceptions of attnchain: one family under :class:`AttnchainError`.

Every error the package raises on purpose is either a :class:`ValueError` that names the bad input
(raised by the validation layer) or one of the classes below. Each also derives from the built-in
class a caller would catch without knowing attnchain (``ValueError``, ``RuntimeError``,
``ImportError``), so ``except ValueError`` keeps working.

**Examples**

>>> import torch, attnchain as ac
>>> try:
...     ac.token_rank(torch.eye(3), alpha=1.0)
... except ac.ReducibleChainError as err:
...     print(type(err).__mro__[1].__name__, "|", str(err)[:40])
AttnchainError | reducible chain (batch index ()) has 3 c
"""
from __future__ import annotations

__all__ = ["AttnchainError", "ConvergenceError", "ReducibleChainError", "UnavailableModelError",
           "AdapterError"]


class AttnchainError(Exception):
    """Base class of every exception attnchain defines.

    Examples
    --------
    >>> import attnchain as ac
    >>> all(issubclass(e, ac.AttnchainError) for e in (ac.ConvergenceError,
    ...     ac.ReducibleChainError, ac.UnavailableModelError, ac.AdapterError))
    True

    See Also
    --------
    ConvergenceError, ReducibleChainError, UnavailableModelError, AdapterError
    """


class ConvergenceError(AttnchainError, RuntimeError):
    """An iterative method did not certify its answer within its budget.

    Raised instead of returning an unconverged answer.

    Parameters
    ----------
    message : str
        What did not converge, and what to try.
    passes : float, optional
        Passes over the chain (products with the whole batch) made before giving up.
    residual : float, optional
        The last value of the stopping quantity (largest over the batch).

    Examples
    --------
    >>> import torch, attnchain as ac
    >>> slow = 0.999 * torch.block_diag(torch.eye(2), torch.eye(2)) + 0.001 / 4
    >>> start = torch.tensor([1.0, 0.0, 0.0, 0.0])
    >>> try:
    ...     ac.token_rank(slow, personalization=start, method="power", max_iter=3)
    ... except ac.ConvergenceError as err:
    ...     print(err.passes, err.residual > 1e-6)
    3 True

    See Also
    --------
    attnchain.token_rank, attnchain.lambda2 : raise it.
    """

    def __init__(self, message: str, passes: float | None = None,
                 residual: float | None = None):
        super().__init__(message)
        self.passes = passes
        self.residual = residual


class ReducibleChainError(AttnchainError, ValueError):
    """The chain has more than one closed class, so its stationary distribution is not unique.

    Raised for ``alpha=1`` (no damping); damping (``alpha < 1``) always makes the answer unique.

    See Also
    --------
    attnchain.closed_class_count : the number of closed classes.
    attnchain.token_rank, attnchain.stationary_dense : raise it.
    """


class UnavailableModelError(AttnchainError, ValueError):
    """A model cannot be loaded in the current profile; the message says what to do."""


class AdapterError(AttnchainError, ImportError):
    """A registered capture adapter could not be imported or does not define its interface."""
