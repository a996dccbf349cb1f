"""Models by name for both profiles: ``profile()``, ``load(name, device=None)``, ``available()``.

>>> import attnchain
>>> attnchain.zoo.profile()                       # doctest: +SKIP
'offline'
>>> model, preprocess = attnchain.zoo.load("minilm")   # doctest: +SKIP

See :mod:`attnchain.zoo.registry` for the list and :func:`available` for one-line descriptions.
"""
from attnchain.zoo.registry import (REGISTRY, ModelEntry, UnavailableModelError, available,
                                    describe, load, profile, weights)

__all__ = ["profile", "weights", "load", "available", "describe", "ModelEntry", "UnavailableModelError",
           "REGISTRY"]
