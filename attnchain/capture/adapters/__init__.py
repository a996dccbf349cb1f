"""The built-in capture adapters, one module per architecture.

Each module declares, for its architecture, where a layer's queries, keys, scale, mask and token
layout come from (the interface is documented in :mod:`attnchain.capture.core`); the core installs
and removes the hooks. They are listed, in the order they are tried, in
:data:`attnchain.capture.core.BUILTIN_ADAPTERS`.
"""
