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
    bipartite_chain,
    bounce,
    check_stochastic,
    damped,
    planted_chain,
    restrict,
    rollout,
    source_chain,
    stationary_dense,
    to_stochastic,
    token_rank,
)
from .spectral import (
    choose_bounces,
    eigenvalues,
    head_mean,
    head_weights,
    lambda2,
    metastable_states,
    weighted_head_mean,
)

__version__ = "0.1.0"

__all__ = [
    "ConvergenceError",
    "ReducibleChainError",
    "bipartite_chain",
    "bounce",
    "capture",
    "check_stochastic",
    "choose_bounces",
    "damped",
    "eigenvalues",
    "head_mean",
    "head_weights",
    "lambda2",
    "metastable_states",
    "planted_chain",
    "restrict",
    "rollout",
    "source_chain",
    "stationary_dense",
    "to_stochastic",
    "token_rank",
    "weighted_head_mean",
    "zoo",
]
