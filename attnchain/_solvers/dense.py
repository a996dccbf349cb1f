"""Dense eigenvalues with a fallback for the matrices on which ``torch.linalg.eigvals`` fails."""
from __future__ import annotations

import numpy as np
import torch


def eigvals(A: torch.Tensor) -> torch.Tensor:
    """All eigenvalues of each matrix of ``A`` (..., N, N), complex, by ``torch.linalg.eigvals``.

    LAPACK's ``geev`` as torch calls it can fail to converge on exactly structured chains (a
    3-cycle of uniform blocks at N = 60 in float64) where :func:`scipy.linalg.eigvals` (``geev``
    after balancing) succeeds; those batches are solved matrix by matrix with scipy, in float64,
    and returned in torch's complex dtype on ``A``'s device."""
    try:
        return torch.linalg.eigvals(A)
    except torch.linalg.LinAlgError:
        from scipy.linalg import eigvals as scipy_eigvals

        flat = A.detach().reshape(-1, *A.shape[-2:]).cpu().to(torch.float64).numpy()
        ev = np.stack([scipy_eigvals(a) for a in flat]) if len(flat) else \
            np.zeros((0, A.shape[-1]), dtype=complex)
        dtype = torch.complex128 if A.dtype == torch.float64 else torch.complex64
        return torch.from_numpy(ev).reshape(*A.shape[:-1]).to(device=A.device, dtype=dtype)


def eig(A: torch.Tensor):
    """Eigenvalues and unit right eigenvectors (columns) of each matrix of ``A`` (..., m, m),
    complex, by ``torch.linalg.eig``, with the scipy fallback of :func:`eigvals` (float64)."""
    try:
        return torch.linalg.eig(A)
    except torch.linalg.LinAlgError:
        from scipy.linalg import eig as scipy_eig

        flat = A.detach().reshape(-1, *A.shape[-2:]).cpu().to(torch.float64).numpy()
        pairs = [scipy_eig(a) for a in flat]
        m = A.shape[-1]
        ev = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, m), dtype=complex)
        vec = np.stack([p[1] for p in pairs]) if pairs else np.zeros((0, m, m), dtype=complex)
        dtype = torch.complex128 if A.dtype == torch.float64 else torch.complex64
        return (torch.from_numpy(ev).reshape(*A.shape[:-1]).to(device=A.device, dtype=dtype),
                torch.from_numpy(vec).reshape(A.shape).to(device=A.device, dtype=dtype))
