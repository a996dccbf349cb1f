"""attnchain: attention matrices as discrete-time Markov chains.

The public API: building and checking chains and bounces (:mod:`attnchain.chain`), chain
operators (:mod:`attnchain.operators`), stationary distributions and TokenRank
(:mod:`attnchain.stationary`), spectra and head weights (:mod:`attnchain.spectral`), the exception
family (:mod:`attnchain.errors`), reading attention out of models (:mod:`attnchain.capture`,
callable as ``attnchain.capture(model)``) and models by name for both profiles
(:mod:`attnchain.zoo`).

Reference: Erel, Dünkel, Dabral, Golyanik, Theobalt, Bermano. "Attention (as Discrete-Time Markov)
Chains". NeurIPS 2025, arXiv:2507.17657.
"""
from . import capture, interventions, zoo
from .interventions import remove_tokens
from .chain import (
    bipartite_chain,
    bounce,
    check_stochastic,
    planted_chain,
    restrict,
    rollout,
    source_chain,
    to_stochastic,
)
from .errors import (
    AdapterError,
    AttnchainError,
    ConvergenceError,
    ReducibleChainError,
    UnavailableModelError,
)
from .operators import AttentionChain, ChainOperator, DampedChain, DenseChain, SourceChain
from .spectral import (
    choose_bounces,
    eigenvalues,
    head_mean,
    head_weights,
    lambda2,
    lambda2_sequence,
    metastable_states,
)
from .stationary import (closed_class_count, damped, stationary_dense, token_rank,
                         token_rank_sequence)

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AttentionChain",
    "AttnchainError",
    "ChainOperator",
    "ConvergenceError",
    "DampedChain",
    "DenseChain",
    "ReducibleChainError",
    "SourceChain",
    "UnavailableModelError",
    "bipartite_chain",
    "bounce",
    "capture",
    "check_stochastic",
    "choose_bounces",
    "closed_class_count",
    "damped",
    "eigenvalues",
    "head_mean",
    "head_weights",
    "interventions",
    "lambda2",
    "lambda2_sequence",
    "metastable_states",
    "planted_chain",
    "remove_tokens",
    "restrict",
    "rollout",
    "source_chain",
    "stationary_dense",
    "to_stochastic",
    "token_rank",
    "token_rank_sequence",
    "zoo",
]
