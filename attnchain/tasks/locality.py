r"""Locality: how much of a chain's in-object retention distance alone explains.

A chain on the image patches that attends only to nearby patches keeps mass inside an object just
because objects are contiguous. :func:`retention` compares the in-object retention of a chain with
that of a Gaussian kernel on the patch grid whose *mean attention distance* is the same
(:func:`kernel_mean_distance`): a chain that retains more than its distance-matched kernel groups
patches by content, not only by position.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["grid_distances", "gaussian_kernel", "kernel_mean_distance", "retention"]

#: float64 bytes of Gaussian kernels built at once by :func:`kernel_mean_distance`.
KERNEL_CHUNK_BYTES = 64 * 2 ** 20


def grid_distances(grid, device=None) -> Tensor:
    """Euclidean distances between the patch centres of a ``(rows, cols)`` grid, in patch units.

    Parameters
    ----------
    grid : (int, int)
        The patch grid.
    device : torch.device, optional
        Where to build it (default CPU).

    Returns
    -------
    Tensor, shape (rows * cols, rows * cols)
        float64, patches in row-major order.

    Examples
    --------
    >>> grid_distances((1, 3))
    tensor([[0., 1., 2.],
            [1., 0., 1.],
            [2., 1., 0.]], dtype=torch.float64)

    See Also
    --------
    gaussian_kernel
    """
    r, c = grid
    yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float64, device=device),
                            torch.arange(c, dtype=torch.float64, device=device), indexing="ij")
    p = torch.stack([yy.flatten(), xx.flatten()], -1)
    return torch.cdist(p, p)


def gaussian_kernel(grid, sigma: Tensor) -> Tensor:
    r"""Row-stochastic Gaussian kernels on the grid, :math:`K_{ij} \propto \exp(-d_{ij}^2 / 2\sigma^2)`.

    Parameters
    ----------
    grid : (int, int)
        The patch grid.
    sigma : Tensor, shape (S,)
        Widths in patch units (the kernels are built on ``sigma``'s device).

    Returns
    -------
    Tensor, shape (S, n, n)
        float64, one chain per width, ``n = rows * cols``.

    Examples
    --------
    >>> import torch
    >>> K = gaussian_kernel((2, 2), torch.tensor([1.0]))
    >>> K.shape, bool(torch.allclose(K.sum(-1), torch.ones(1, 4, dtype=torch.float64)))
    (torch.Size([1, 4, 4]), True)

    See Also
    --------
    grid_distances, kernel_mean_distance
    """
    d = grid_distances(grid, device=sigma.device)
    K = torch.exp(-0.5 * d[None] ** 2 / sigma.double()[:, None, None] ** 2)
    return K / K.sum(-1, keepdim=True)


def kernel_mean_distance(grid, sigma) -> Tensor:
    r"""Mean attention distance of Gaussian kernel chains, :math:`\frac1n \sum_i \sum_j K_{ij} d_{ij}`.

    Parameters
    ----------
    grid : (int, int)
        The patch grid.
    sigma : float or Tensor, shape (S,)
        Kernel widths in patch units.

    Returns
    -------
    Tensor, shape (S,)
        float64 mean distance in patch units, increasing in ``sigma``; kernels are built in
        chunks of ``KERNEL_CHUNK_BYTES``.

    Examples
    --------
    >>> kernel_mean_distance((1, 2), [0.01, 100.0]).round(decimals=3)
    tensor([0.0000, 0.5000], dtype=torch.float64)

    See Also
    --------
    gaussian_kernel, retention
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    d = grid_distances(grid, device=sigma.device)
    step = max(1, KERNEL_CHUNK_BYTES // (d.numel() * d.element_size()))
    return torch.cat([(gaussian_kernel(grid, s) * d).sum(-1).mean(-1) for s in sigma.split(step)])


@functools.lru_cache(maxsize=8)
def _distance_table(grid, device: str):
    sig = torch.logspace(-2, 2, 2000, dtype=torch.float64, device=device)
    return sig, kernel_mean_distance(grid, sig)


def retention(M_img: Tensor, objects: Tensor, grid) -> dict:
    r"""In-object retention of an image-token chain and of its distance-matched Gaussian kernel.

    Parameters
    ----------
    M_img : Tensor, shape (B, n, n)
        Row-stochastic chain on the ``n = rows * cols`` image tokens (e.g.
        :func:`attnchain.restrict` of a head mean to the patches).
    objects : LongTensor, shape (B, rows, cols)
        Object id of each patch (:func:`attnchain.data.scenes.patch_objects`), 0 = background.
    grid : (int, int)
        The patch grid.

    Returns
    -------
    dict of ndarray, shape (B,)
        ``retention``: mean over in-object patches :math:`i` of :math:`\sum_{j \in o(i)} M_{ij}`,
        the mass a one-bounce walk from :math:`i` keeps inside its object; ``kernel_retention``:
        the same for the row-normalised Gaussian kernel
        :math:`K_{ij} \propto \exp(-d_{ij}^2 / 2\sigma^2)` whose mean attention distance
        :math:`\frac1n\sum_i\sum_j K_{ij} d_{ij}` equals that of ``M_img`` for that scene;
        ``distance`` (the matched mean distance, patch units) and ``sigma``. NaN for scenes without
        in-object patches. A chain whose mean distance exceeds that of the uniform kernel (the
        limit :math:`\sigma \to \infty`) is matched with :math:`\sigma = 100` (practically uniform).

    Examples
    --------
    >>> import torch
    >>> objects = torch.tensor([[[1, 1], [0, 0]]])
    >>> stay = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]])
    >>> r = retention(stay, objects, (2, 2))
    >>> float(r["retention"][0]), bool(r["kernel_retention"][0] < 1)
    (1.0, True)

    See Also
    --------
    kernel_mean_distance, gaussian_kernel
    """
    d = grid_distances(grid, device=M_img.device)
    M = M_img.double()
    dist = (M * d).sum(-1).mean(-1)  # (B,)
    sig_grid, md = _distance_table(tuple(grid), str(M_img.device))  # md increasing in sigma
    pos = torch.searchsorted(md.contiguous(), dist.clamp(md[0], md[-1]).contiguous()).clamp(1, len(md) - 1)
    t = (dist - md[pos - 1]) / (md[pos] - md[pos - 1])
    sigma = torch.exp(torch.log(sig_grid[pos - 1]) + t.clamp(0, 1) * (torch.log(sig_grid[pos])
                                                                     - torch.log(sig_grid[pos - 1])))
    K = gaussian_kernel(grid, sigma)
    obj = objects.to(M.device).flatten(1)
    same = (obj[:, :, None] == obj[:, None, :]) & (obj[:, :, None] > 0)
    inside = obj > 0
    cnt = inside.sum(-1).double()

    def keep(P):
        r = (P * same).sum(-1)
        return torch.where(cnt > 0, (r * inside).sum(-1) / cnt.clamp_min(1),
                           torch.full_like(cnt, float("nan")))

    out = {"retention": keep(M), "kernel_retention": keep(K), "distance": dist, "sigma": sigma}
    return {k: v.detach().cpu().numpy() for k, v in out.items()}
