"""Tools for testing code that uses attnchain: :mod:`attnchain.testing.strict_cuda` makes CUDA's
device rules hold on a machine without a GPU."""
