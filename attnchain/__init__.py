"""attnchain: attention matrices as discrete-time Markov chains.

The public API: Markov operations (:mod:`attnchain.chain`), spectra and head weights
(:mod:`attnchain.spectral`), reading attention out of models (:mod:`attnchain.capture`, callable as
``attnchain.capture(model)``) and models by name for both profiles (:mod:`attnchain.zoo`).

Reference: Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
Chains". NeurIPS 2025, arXiv:2507.17657.
"""
from . import capture, zoo
from .chain import (
    ConvergenceError,
    ReducibleChainError,
    bounce,
    check_stochastic,
    damped,
    source_chain,
    stationary_dense,
    to_stochastic,
    token_rank,
)
from .spectral import eigenvalues, head_weights, lambda2, metastable_states, weighted_head_mean

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "ReducibleChainError",
    "bounce",
    "capture",
    "check_stochastic",
    "damped",
    "eigenvalues",
    "head_weights",
    "lambda2",
    "metastable_states",
    "source_chain",
    "stationary_dense",
    "to_stochastic",
    "token_rank",
    "weighted_head_mean",
    "zoo",
]
