r"""DiffSeg in PyTorch: unsupervised segmentation by merging self-attention maps.

DiffSeg :cite:`tian2024diffseg` segments an image without labels from the self-attention of a
Stable Diffusion UNet, in three steps. This module is the algorithm (batched, on the input's
device, no model and no data): :func:`aggregate`, the anchor samplers (:func:`sample_anchors`),
:func:`merge` and :func:`label_map`, composed by :func:`segment`; and the metrics DiffSeg reports,
:func:`hungarian_counts` and :func:`scores`. The model and data side lives in
:mod:`attnchain.tasks.diffseg_eval`.

**1. Aggregation** (:func:`aggregate`). A UNet pass gives self-attention maps at several
resolutions (Stable Diffusion at 512 px: 64², 32², 16² and 8² tokens; 5, 5, 5 and 1 layers). The
maps of one resolution are averaged over layers and heads. Row :math:`i` of a level's map
:math:`A^{(l)}`, a distribution over that level's :math:`h_l \times w_l` keys, is upsampled
bilinearly to the largest grid :math:`H \times W` and renormalised to sum to one (*key axis*);
the query axis is tiled, each of the :math:`(H/h_l)(W/w_l)` fine queries inside a coarse query
taking its map (*query axis*). The levels are summed with weights proportional to their
resolution, :math:`w_l = \sqrt{h_l w_l} / \sum_m \sqrt{h_m w_m}` (64:32:16:8 for SD):

.. math:: \bar A = \sum_l w_l\, \mathrm{tile}_q\big(\mathrm{norm}_k(\mathrm{up}_k(A^{(l)}))\big)
          \in \mathbb{R}^{HW \times HW},

itself a row-stochastic matrix: **a Markov chain on the fine tokens**, whose TokenRank the
paper's anchors read.

**2. Iterative merging** (:func:`merge`). Attention maps are compared by the symmetric
Kullback-Leibler distance

.. math:: D(p, q) = \tfrac12 \textstyle\sum_j p_j \log\frac{p_j}{q_j}
                  + \tfrac12 \sum_j q_j \log\frac{q_j}{p_j}.

In the first iteration each *anchor* token :math:`a` (DiffSeg: a uniform :math:`16\times 16`
grid) collects every token whose map is within the threshold :math:`\tau` of its own,
:math:`S_a = \{i : D(\bar A_a, \bar A_i) < \tau\}`, and becomes the mean map of :math:`S_a`. In
each further iteration the maps are visited in order; a map not yet taken takes every map (taken
or not) within :math:`\tau` of it, and the group's mean becomes one new map. DiffSeg uses
:math:`\tau = 1.1` (COCO-Stuff; 0.9 for Cityscapes) and 3 iterations (:data:`KL_THRESHOLD`,
:data:`ITERATIONS`).

**3. Labels** (:func:`label_map`). The merged maps, one per segment, are upsampled bilinearly to
the output size (64² → 512² for SD) and every pixel takes the index of the largest
("non-maximum suppression" in DiffSeg's words).

**Anchors** (:data:`SAMPLERS`; the paper replaces DiffSeg's grid by TokenRank
:cite:`erel2025attention` without giving the rule, so three rules are offered)

``grid``
    DiffSeg's: ``points`` per side, evenly spaced with DiffSeg's spacing
    :math:`\lfloor (S-1)/(p-1) \rfloor` and centred (:func:`grid_anchors`).
``tokenrank``
    ``k`` distinct tokens (default: as many as the grid) sampled without replacement with
    probability proportional to TokenRank :math:`\pi` of :math:`\bar A`
    (:func:`attnchain.token_rank`, :math:`\alpha = 0.99`), by the Gumbel-top-k trick
    :cite:`kool2019gumbel`. This is the rule we judge the paper meant: it *samples* anchors from
    the stationary distribution instead of placing them uniformly, with the same budget.
``tokenrank_nms``
    Deterministic: the tokens in decreasing order of :math:`\pi`, each kept only if no kept token
    lies closer than ``radius`` (grid units; default three quarters of the grid spacing, so that
    about as many anchors fit as the grid has), up to ``k``.
``random``
    The control: ``k`` tokens uniformly at random without replacement (same generator).

Random samplers are seeded per image (``seeds``), with uniforms drawn on the CPU and moved to the
device, so an image gets the same anchors on every device and in every batch.

**Metrics** (:func:`hungarian_counts`, :func:`scores`), as DiffSeg's evaluation (which follows
PiCIE :cite:`cho2021picie`): per image, the confusion matrix of ground-truth classes (rows;
ignored pixels left out) against predicted segments is matched one-to-one by the Hungarian
algorithm maximising the matched pixel count; each class's true positives, false positives and
false negatives are summed over the data set, and

.. math:: \mathrm{ACC} = \frac{\sum_c \mathrm{TP}_c}{\#\text{labelled pixels}},\qquad
          \mathrm{mIoU} = \operatorname{mean}_c \frac{\mathrm{TP}_c}
                          {\mathrm{TP}_c + \mathrm{FP}_c + \mathrm{FN}_c}

(classes with a zero denominator left out). The paper's "mACC" is this pixel accuracy.

**Deviations from the TensorFlow original**, none of which changes the algorithm: the first
iteration's distances are computed in float32 with two matrix products (the original evaluates
them in float16, in 16 chunks, to fit a GPU), probabilities are clamped at the smallest normal
float before the logarithm (no :math:`\log 0`), and a token's own map always joins its anchor's
group (its distance is 0 up to rounding). DiffSeg's optional K-means refinement (off in its
benchmarks) is not implemented.

**References**

:cite:`tian2024diffseg`, :cite:`erel2025attention`, :cite:`cho2021picie`,
:cite:`kool2019gumbel`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TIMESTEP", "KL_THRESHOLD", "ITERATIONS", "POINTS", "ALPHA", "SAMPLERS", "PAPER",
           "resolution_weights", "aggregate", "grid_anchors", "sample_anchors",
           "symmetric_kl", "merge", "label_map", "segment", "Segmentation", "confusion",
           "hungarian_counts", "relabel", "scores", "planted_attention"]

#: DiffSeg's diffusion timestep (of 1,000) for the single UNet pass on the clean latent.
TIMESTEP = 300
#: DiffSeg's merging threshold on COCO-Stuff-27 (0.9 on Cityscapes), every iteration.
KL_THRESHOLD = 1.1
#: DiffSeg's number of merging iterations.
ITERATIONS = 3
#: DiffSeg's anchor grid: points per side (16 × 16 = 256 anchors on the 64 × 64 grid).
POINTS = 16
#: TokenRank damping (the paper's).
ALPHA = 0.99
#: The anchor samplers of :func:`sample_anchors`.
SAMPLERS = ("grid", "tokenrank", "tokenrank_nms", "random")
#: The paper's table (COCO-Stuff-27, SD1.4): anchors -> (mACC, mIoU), in percent
#: :cite:`erel2025attention`.
PAPER = {"grid": (72.50, 43.60), "tokenrank": (84.97, 44.87)}


# ----------------------------------------------------------------------------------------------
# 1. aggregation
def _grid(g) -> tuple:
    if not (isinstance(g, (tuple, list)) and len(g) == 2
            and all(isinstance(v, (int, np.integer)) and v >= 1 for v in g)):
        raise ValueError(f"a grid must be (rows, cols) of positive ints, got {g!r}")
    return int(g[0]), int(g[1])


def resolution_weights(grids: Sequence) -> Tensor:
    r"""DiffSeg's level weights :math:`w_l = \sqrt{h_l w_l} / \sum_m \sqrt{h_m w_m}`.

    Parameters
    ----------
    grids : sequence of (int, int)
        The distinct grids of the levels.

    Returns
    -------
    Tensor, shape (len(grids),)
        float64 weights summing to one.

    Examples
    --------
    >>> resolution_weights([(64, 64), (32, 32), (16, 16), (8, 8)]) * 120
    tensor([64., 32., 16.,  8.], dtype=torch.float64)
    """
    sizes = torch.tensor([math.sqrt(h * w) for h, w in map(_grid, grids)], dtype=torch.float64)
    if len(sizes) == 0:
        raise ValueError("no grids given")
    return sizes / sizes.sum()


def aggregate(maps: Sequence[Tensor], grids: Sequence, weights: Optional[Sequence[float]] = None
              ) -> tuple:
    r"""DiffSeg's aggregation of self-attention maps of several resolutions into one chain.

    Parameters
    ----------
    maps : sequence of Tensor
        One per layer, ``(B, H, n, n)`` (per head) or ``(B, n, n)`` (head mean), row-stochastic,
        ``n = h · w`` tokens of that layer's grid in raster order.
    grids : sequence of (int, int)
        The ``(h, w)`` of each layer. Every grid must divide the largest one.
    weights : sequence of float, optional
        One weight per distinct grid, in order of decreasing size (default
        :func:`resolution_weights`); normalised to sum to one.

    Returns
    -------
    A : Tensor, shape (B, N, N)
        The aggregated row-stochastic map on the largest grid, ``N = H · W``, float32 (float64
        if the maps are), on the maps' device.
    grid : (int, int)
        The largest grid ``(H, W)``.

    Raises
    ------
    ValueError
        No maps, maps and grids of different lengths, a map whose token count is not its grid's,
        batch sizes that differ, or a grid that does not divide the largest.

    Examples
    --------
    >>> import torch
    >>> fine = torch.softmax(torch.randn(2, 16, 16), -1)          # a 4 x 4 level
    >>> coarse = torch.softmax(torch.randn(2, 3, 4, 4), -1)       # 3 heads on a 2 x 2 level
    >>> A, grid = aggregate([fine, coarse], [(4, 4), (2, 2)])
    >>> tuple(A.shape), grid, bool(torch.allclose(A.sum(-1), torch.ones(2, 16)))
    ((2, 16, 16), (4, 4), True)

    See Also
    --------
    resolution_weights, merge, segment
    """
    if len(maps) == 0:
        raise ValueError("no attention maps given")
    if len(maps) != len(grids):
        raise ValueError(f"{len(maps)} maps but {len(grids)} grids")
    grids = [_grid(g) for g in grids]
    batch = None
    levels: dict = {}
    for m, (h, w) in zip(maps, grids):
        if m.ndim not in (3, 4) or m.shape[-1] != m.shape[-2] or m.shape[-1] != h * w:
            raise ValueError(f"a map of grid {(h, w)} must be (B, [H,] {h * w}, {h * w}), got "
                             f"{tuple(m.shape)}")
        if batch is not None and m.shape[0] != batch:
            raise ValueError(f"maps have batch sizes {batch} and {m.shape[0]}")
        batch = m.shape[0]
        dt = torch.float64 if m.dtype == torch.float64 else torch.float32
        m = m.to(dt)
        levels.setdefault((h, w), []).append(m.mean(1) if m.ndim == 4 else m)
    order = sorted(levels, key=lambda g: -g[0] * g[1])
    H, W = order[0]
    for h, w in order:
        if H % h or W % w:
            raise ValueError(f"grid {(h, w)} does not divide the largest grid {(H, W)}")
    if weights is None:
        wts = resolution_weights(order)
    else:
        wts = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if len(wts) != len(order) or bool((wts < 0).any()) or float(wts.sum()) <= 0:
            raise ValueError(f"weights must be {len(order)} nonnegative numbers (one per grid, "
                             f"largest first), got {weights!r}")
        wts = wts / wts.sum()
    first = levels[order[0]][0]
    out = torch.zeros(batch, H * W, H * W, dtype=first.dtype, device=first.device)
    for (h, w), wt in zip(order, wts.tolist()):
        m = torch.stack(levels[(h, w)]).mean(0)                    # layer mean (B, n, n)
        if (h, w) != (H, W):
            up = F.interpolate(m.reshape(batch * h * w, 1, h, w), size=(H, W), mode="bilinear",
                               align_corners=False)
            m = up.reshape(batch, h, w, H * W)
            m = m.repeat_interleave(H // h, 1).repeat_interleave(W // w, 2)
            m = m.reshape(batch, H * W, H * W)
        out += wt * (m / m.sum(-1, keepdim=True))
    return out, (H, W)


# ----------------------------------------------------------------------------------------------
# anchors
def _axis_points(side: int, points: int) -> Tensor:
    points = min(points, side)
    if points == 1:
        return torch.tensor([(side - 1) // 2])
    step = (side - 1) // (points - 1)
    start = (side - 1 - step * (points - 1)) // 2
    return start + step * torch.arange(points)


def grid_anchors(grid, points: int = POINTS, device=None) -> Tensor:
    r"""DiffSeg's uniform anchor grid: ``points`` per side, evenly spaced and centred.

    On an axis of ``S`` tokens the spacing is :math:`\lfloor (S-1)/(p-1) \rfloor` and the first
    point :math:`\lfloor (S-1-\text{spacing}\,(p-1))/2 \rfloor` (DiffSeg's rule; on 64 tokens and
    16 points: 1, 5, ..., 61). More points than tokens take every token.

    Parameters
    ----------
    grid : (int, int)
    points : int
    device : torch.device, optional

    Returns
    -------
    LongTensor, shape (K,)
        Token indices (raster order), rows outer.

    Examples
    --------
    >>> grid_anchors((64, 64))[:3].tolist(), len(grid_anchors((64, 64)))
    ([65, 69, 73], 256)
    >>> grid_anchors((5, 5), points=2).tolist()
    [0, 4, 20, 24]
    """
    h, w = _grid(grid)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive int, got {points!r}")
    r, c = _axis_points(h, points), _axis_points(w, points)
    return (r[:, None] * w + c[None, :]).reshape(-1).to(device)


def _gumbel(n: int, seeds: Sequence[int], device) -> Tensor:
    """Standard Gumbel noise ``(B, n)``, one seeded CPU generator per image, moved to device."""
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-300, 1 - 1e-16)
        rows.append(-torch.log(-torch.log(u)))
    return torch.stack(rows).to(device)


def sample_anchors(A: Tensor, grid, sampler: str = "grid", points: int = POINTS,
                   k: Optional[int] = None, alpha: float = ALPHA,
                   seeds: Optional[Sequence[int]] = None, radius: Optional[float] = None,
                   pi: Optional[Tensor] = None) -> Tensor:
    r"""Anchor tokens of each image by one of :data:`SAMPLERS` (see the module docstring).

    Parameters
    ----------
    A : Tensor, shape (B, N, N)
        The aggregated chain (:func:`aggregate`).
    grid : (int, int)
        Its token grid.
    sampler : str
        ``"grid"``, ``"tokenrank"``, ``"tokenrank_nms"`` or ``"random"``.
    points : int
        Points per side of the grid (and so the default ``k``).
    k : int, optional
        Anchors per image for the other samplers (default: as many as the grid has).
    alpha : float
        TokenRank damping.
    seeds : sequence of int, optional
        One seed per image for the random samplers (default ``0 .. B-1``).
    radius : float, optional
        ``tokenrank_nms``: suppression radius in grid units (default three quarters of the grid
        spacing, at least 1).
    pi : Tensor, shape (B, N), optional
        TokenRank of ``A`` if already computed.

    Returns
    -------
    LongTensor, shape (B, K)
        Anchor tokens in merging order (grid: raster order; sampled: order of sampling;
        nms: decreasing :math:`\pi`). ``tokenrank_nms`` pads with its first anchor when fewer
        than ``k`` tokens survive the suppression (a repeated anchor adds no segment).

    Examples
    --------
    >>> import torch
    >>> A = torch.full((2, 16, 16), 1 / 16)
    >>> sample_anchors(A, (4, 4), "grid", points=2).tolist()
    [[0, 3, 12, 15], [0, 3, 12, 15]]
    >>> a = sample_anchors(A, (4, 4), "tokenrank", points=2, seeds=[7, 8])
    >>> a.shape, len(set(a[0].tolist()))
    (torch.Size([2, 4]), 4)

    See Also
    --------
    grid_anchors, attnchain.token_rank
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (B, N, N), got {tuple(A.shape)}")
    h, w = _grid(grid)
    B, N = A.shape[0], A.shape[-1]
    if N != h * w:
        raise ValueError(f"A has {N} tokens but grid {grid} has {h * w}")
    base = grid_anchors((h, w), points, device=A.device)
    if sampler == "grid":
        return base.expand(B, -1).clone()
    k = len(base) if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int in [1, {N}], got {k!r}")
    seeds = list(range(B)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != B:
        raise ValueError(f"{len(seeds)} seeds for {B} images")
    if sampler == "random":
        return _gumbel(N, seeds, A.device).topk(k, -1).indices
    if pi is None:
        from ..stationary import token_rank
        pi = token_rank(A, alpha=alpha)
    if pi.shape != (B, N):
        raise ValueError(f"pi must be (B, N) = {(B, N)}, got {tuple(pi.shape)}")
    if sampler == "tokenrank":
        logp = torch.log(pi.double().clamp_min(1e-300))
        return (logp + _gumbel(N, seeds, A.device)).topk(k, -1).indices
    step = max((h - 1) // max(min(points, h) - 1, 1), (w - 1) // max(min(points, w) - 1, 1), 1)
    radius = max(0.75 * step, 1.0) if radius is None else float(radius)
    rr, cc = torch.meshgrid(torch.arange(h, device=A.device), torch.arange(w, device=A.device),
                            indexing="ij")
    pos = torch.stack([rr.reshape(-1), cc.reshape(-1)], -1).double()
    score = pi.double().clone()
    out = torch.empty(B, k, dtype=torch.long, device=A.device)
    rows = torch.arange(B, device=A.device)
    for j in range(k):
        best = score.argmax(-1)
        alive = score[rows, best] > -math.inf
        out[:, j] = torch.where(alive, best, out[:, 0] if j else best)
        near = torch.cdist(pos[best][:, None], pos[None].expand(B, -1, -1))[:, 0] < radius
        score = score.masked_fill(near & alive[:, None], -math.inf)
    return out


# ----------------------------------------------------------------------------------------------
# 2. merging
def symmetric_kl(P: Tensor, Q: Tensor) -> Tensor:
    r"""Pairwise symmetric KL distance :math:`D(p, q)` between the rows of ``P`` and ``Q``.

    .. math:: D(p, q) = \tfrac12 \big(\textstyle\sum_j p_j \log p_j + \sum_j q_j \log q_j
              - \sum_j p_j \log q_j - \sum_j q_j \log p_j\big),

    computed with two matrix products; probabilities are clamped at the smallest normal float
    before the logarithm.

    Parameters
    ----------
    P : Tensor, shape (..., K, N)
    Q : Tensor, shape (..., M, N)
        Distributions in the rows.

    Returns
    -------
    Tensor, shape (..., K, M)

    Examples
    --------
    >>> import torch
    >>> p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    >>> d = 0.5 * (0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(5.0))
    ...            + 0.9 * torch.log(torch.tensor(1.8)) + 0.1 * torch.log(torch.tensor(0.2)))
    >>> bool(torch.isclose(symmetric_kl(p, q)[0, 0], d))
    True
    """
    tiny = torch.finfo(P.dtype).tiny
    lp, lq = torch.log(P.clamp_min(tiny)), torch.log(Q.clamp_min(tiny))
    self_p, self_q = (P * lp).sum(-1), (Q * lq).sum(-1)
    cross = P @ lq.transpose(-1, -2) + lp @ Q.transpose(-1, -2)
    return 0.5 * (self_p[..., :, None] + self_q[..., None, :] - cross)


def _check_threshold(threshold, iterations) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or threshold <= 0:
        raise ValueError(f"threshold must be a positive number, got {threshold!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")


def merge(A: Tensor, anchors: Tensor, threshold: float = KL_THRESHOLD,
          iterations: int = ITERATIONS, distances: Optional[Tensor] = None) -> list:
    r"""DiffSeg's iterative merging of attention maps (see the module docstring).

    Parameters
    ----------
    A : Tensor, shape (B, N, N)
        The aggregated maps, row ``i`` = token ``i``'s map.
    anchors : LongTensor, shape (B, K)
        Anchor tokens (:func:`sample_anchors`), in merging order.
    threshold : float
        :math:`\tau` (DiffSeg: 1.1 on COCO-Stuff).
    iterations : int
        The anchor iteration plus ``iterations - 1`` greedy ones (DiffSeg: 3).
    distances : Tensor, shape (B, N, N), optional
        ``symmetric_kl(A, A)`` if already computed: the first iteration then reads its anchor
        rows instead of computing them (worth it when one chain is merged from several anchor
        sets or at several thresholds).

    Returns
    -------
    list of Tensor
        Per image, the merged maps ``(S_b, N)`` (one per segment), on ``A``'s device.

    Examples
    --------
    >>> import torch
    >>> A = torch.tensor([[[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]]])
    >>> [m.shape for m in merge(A, torch.tensor([[0, 1, 2, 3]]))]
    [torch.Size([2, 4])]

    See Also
    --------
    symmetric_kl, sample_anchors, label_map
    """
    _check_threshold(threshold, iterations)
    if A.ndim != 3 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must be (B, N, N), got {tuple(A.shape)}")
    B, N = A.shape[0], A.shape[-1]
    anchors = torch.as_tensor(anchors, device=A.device).long()
    if anchors.ndim != 2 or anchors.shape[0] != B or anchors.shape[1] < 1:
        raise ValueError(f"anchors must be (B={B}, K >= 1), got {tuple(anchors.shape)}")
    if bool(((anchors < 0) | (anchors >= N)).any()):
        raise ValueError(f"anchors must be token indices in [0, {N})")
    rows = torch.arange(B, device=A.device)[:, None]
    if distances is None:
        member = symmetric_kl(A[rows, anchors], A) < threshold          # (B, K, N)
    else:
        if distances.shape != A.shape:
            raise ValueError(f"distances must be (B, N, N) = {tuple(A.shape)}, got "
                             f"{tuple(distances.shape)}")
        member = distances[rows, anchors] < threshold
    member[rows, torch.arange(anchors.shape[1], device=A.device)[None], anchors] = True
    m = member.to(A.dtype)
    maps = (m @ A) / m.sum(-1, keepdim=True)
    out = []
    for b in range(B):
        M = maps[b]
        for _ in range(iterations - 1):
            close = (symmetric_kl(M, M) < threshold).cpu()
            close.fill_diagonal_(True)
            rows = close.tolist()
            taken = [False] * len(rows)
            groups = []
            for i, row in enumerate(rows):          # the greedy visit, in map order
                if taken[i]:
                    continue
                groups.append(i)
                taken = [t or c for t, c in zip(taken, row)]
            G = close[groups].to(device=M.device, dtype=M.dtype)
            M = (G @ M) / G.sum(-1, keepdim=True)
        out.append(M)
    return out


# ----------------------------------------------------------------------------------------------
# 3. labels
def label_map(maps: Sequence[Tensor], grid, size=None) -> Tensor:
    """Upsample each image's merged maps bilinearly to ``size`` and take the argmax.

    Parameters
    ----------
    maps : sequence of Tensor
        Per image, ``(S_b, N)`` merged maps (:func:`merge`).
    grid : (int, int)
        Their token grid.
    size : int or (int, int), optional
        Output size (default the grid: token-level labels).

    Returns
    -------
    LongTensor, shape (B, H, W)
        ``(H, W)`` = ``size``: the segment index ``0 .. S_b - 1`` per pixel, on the maps' device.

    Examples
    --------
    >>> import torch
    >>> maps = [torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]])]
    >>> label_map(maps, (2, 2), size=4)[0]
    tensor([[0, 0, 0, 0],
            [0, 0, 0, 0],
            [1, 1, 1, 1],
            [1, 1, 1, 1]])
    """
    h, w = _grid(grid)
    size = (h, w) if size is None else (size, size) if isinstance(size, int) else tuple(size)
    S = max(m.shape[0] for m in maps)
    pad = torch.stack([F.pad(m, (0, 0, 0, S - m.shape[0])) for m in maps])
    pad = pad.reshape(len(maps), S, h, w)
    if size != (h, w):
        pad = F.interpolate(pad, size=size, mode="bilinear", align_corners=False)
    return pad.argmax(1)


@dataclass
class Segmentation:
    """The result of :func:`segment`.

    Attributes
    ----------
    labels : LongTensor, shape (B, H, W)
    maps : list of Tensor
        Per image, the merged maps ``(S_b, N)``.
    anchors : LongTensor, shape (B, K)
    grid : (int, int)
    pi : Tensor (B, N) or None
        TokenRank of the aggregated chain (for the TokenRank samplers).
    """

    labels: Tensor
    maps: list
    anchors: Tensor
    grid: tuple
    pi: Optional[Tensor] = None

    @property
    def segments(self) -> list:
        """Number of merged maps per image."""
        return [int(m.shape[0]) for m in self.maps]


def segment(A: Tensor, grid, sampler: str = "grid", size=None, threshold: float = KL_THRESHOLD,
            iterations: int = ITERATIONS, points: int = POINTS, k: Optional[int] = None,
            alpha: float = ALPHA, seeds: Optional[Sequence[int]] = None,
            radius: Optional[float] = None, anchors: Optional[Tensor] = None) -> Segmentation:
    r"""DiffSeg on an aggregated chain: anchors, merging, labels.

    Parameters
    ----------
    A : Tensor, shape (B, N, N)
        Row-stochastic aggregated maps (:func:`aggregate`).
    grid : (int, int)
        Token grid of ``A``.
    sampler, points, k, alpha, seeds, radius
        As :func:`sample_anchors` (ignored when ``anchors`` is given).
    size : int or (int, int), optional
        Output size of the labels (default the token grid).
    threshold, iterations
        As :func:`merge`.
    anchors : LongTensor (B, K), optional
        Given anchors.

    Returns
    -------
    Segmentation

    Examples
    --------
    A chain with two planted blocks is cut into exactly those two segments:

    >>> A, truth = planted_attention((8, 8), [24, 40], seed=0)
    >>> seg = segment(A[None], (8, 8), points=4)
    >>> seg.segments, bool((seg.labels[0].flatten() == seg.labels[0].flatten()[truth == 0][0])
    ...                    .eq(truth == 0).all())
    ([2], True)

    See Also
    --------
    aggregate, sample_anchors, merge, label_map
    """
    pi = None
    if anchors is None:
        if sampler.startswith("tokenrank"):
            from ..stationary import token_rank
            pi = token_rank(A, alpha=alpha)
        anchors = sample_anchors(A, grid, sampler, points=points, k=k, alpha=alpha, seeds=seeds,
                                 radius=radius, pi=pi)
    maps = merge(A, anchors, threshold, iterations)
    return Segmentation(label_map(maps, grid, size), maps, anchors, tuple(grid), pi)


def planted_attention(grid, sizes: Sequence[int], leak: float = 0.05, noise: float = 0.2,
                      seed: int = 0, shuffle: bool = False) -> tuple:
    r"""A row-stochastic map with planted blocks of tokens (the known-answer input of DiffSeg).

    Row :math:`i` in block :math:`b` is :math:`(1-\ell)\,u_b \odot (1 + \epsilon_i)` inside the
    block and :math:`\ell\,u_{\bar b} \odot (1 + \epsilon_i)` outside, renormalised, with
    :math:`u` uniform over the tokens concerned and :math:`\epsilon_{ij}` i.i.d. uniform on
    :math:`[-\text{noise}, \text{noise}]`: every row of a block is a noisy copy of the same
    profile, so the maps of one block are close in KL and those of different blocks far apart.

    Parameters
    ----------
    grid : (int, int)
        Token grid; ``sum(sizes)`` must equal its size.
    sizes : sequence of int
        Block sizes, blocks contiguous in raster order (unless ``shuffle``).
    leak, noise : float
        Mass outside the block, relative noise.
    seed : int
        NumPy seed.
    shuffle : bool
        Permute the tokens at random.

    Returns
    -------
    A : Tensor, shape (N, N)
        float32.
    blocks : LongTensor, shape (N,)
        Block of each token.
    """
    h, w = _grid(grid)
    sizes = [int(s) for s in sizes]
    if sum(sizes) != h * w or min(sizes) < 1:
        raise ValueError(f"block sizes {sizes} must be positive and sum to {h * w}")
    rng = np.random.default_rng(seed)
    blocks = np.repeat(np.arange(len(sizes)), sizes)
    if shuffle:
        blocks = rng.permutation(blocks)
    same = blocks[:, None] == blocks[None, :]
    inside = same / same.sum(1, keepdims=True)
    outside = (~same) / np.maximum((~same).sum(1, keepdims=True), 1)
    A = ((1 - leak) * inside + leak * outside) * (1 + rng.uniform(-noise, noise, same.shape))
    A = A / A.sum(1, keepdims=True)
    return torch.tensor(A, dtype=torch.float32), torch.tensor(blocks)


# ----------------------------------------------------------------------------------------------
# metrics
def confusion(pred: Tensor, target: Tensor, n_class: int) -> Tensor:
    """Per-image confusion matrices ``(B, n_class, P)``: ground-truth class × predicted label.

    Pixels whose target is outside ``[0, n_class)`` (ignored, -1) are left out; ``P`` is
    ``max(n_class, max(pred) + 1)`` (DiffSeg's rule). Counts are int64 on the inputs' device.

    Examples
    --------
    >>> import torch
    >>> confusion(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 0, 1, -1]]), 2)
    tensor([[[1, 1, 0],
             [0, 1, 0]]])
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if isinstance(n_class, bool) or not isinstance(n_class, int) or n_class < 1:
        raise ValueError(f"n_class must be a positive int, got {n_class!r}")
    pred = pred.reshape(pred.shape[0], -1).long()
    target = target.reshape(target.shape[0], -1).long()
    if bool((pred < 0).any()):
        raise ValueError("predicted labels must be nonnegative")
    P = max(n_class, int(pred.max()) + 1 if pred.numel() else n_class)
    keep = (target >= 0) & (target < n_class)
    b = torch.arange(pred.shape[0], device=pred.device)[:, None].expand_as(pred)
    flat = (b * n_class + target.clamp(0, n_class - 1)) * P + pred
    counts = torch.bincount(flat[keep], minlength=pred.shape[0] * n_class * P)
    return counts.reshape(pred.shape[0], n_class, P)


def hungarian_counts(pred: Tensor, target: Tensor, n_class: int) -> dict:
    r"""Per-image Hungarian matching and each class's TP, FP and FN, as DiffSeg counts them.

    For each image the confusion matrix (:func:`confusion`) is matched one-to-one, class to
    predicted label, maximising the matched pixel count
    (:func:`scipy.optimize.linear_sum_assignment`);
    ``TP_c`` is the count of class ``c`` with its label, ``FN_c`` the rest of class ``c``,
    ``FP_c`` the pixels of ``c``'s label that belong to other classes. Labels matched to no class
    count for no class.

    Parameters
    ----------
    pred : LongTensor, shape (B, ...)
        Segment labels.
    target : LongTensor, shape (B, ...)
        Class labels, -1 (or anything outside ``[0, n_class)``) ignored.
    n_class : int

    Returns
    -------
    dict of ndarray
        ``tp``, ``fp``, ``fn`` of shape ``(B, n_class)`` and ``total`` ``(B,)`` (labelled
        pixels), int64; ``match`` ``(B, n_class)``, the label matched to each class.

    Examples
    --------
    >>> import torch
    >>> c = hungarian_counts(torch.tensor([[5, 5, 2, 2]]), torch.tensor([[0, 0, 1, 0]]), 2)
    >>> c["tp"].tolist(), c["fp"].tolist(), c["fn"].tolist(), c["total"].tolist()
    ([[2, 1]], [[0, 1]], [[1, 0]], [4])

    See Also
    --------
    scores
    """
    from scipy.optimize import linear_sum_assignment

    hist = confusion(pred, target, n_class).cpu().numpy()
    B = hist.shape[0]
    out = {k: np.zeros((B, n_class), dtype=np.int64) for k in ("tp", "fp", "fn", "match")}
    out["total"] = hist.sum((1, 2))
    for b in range(B):
        rows, cols = linear_sum_assignment(hist[b], maximize=True)
        tp = hist[b, rows, cols]
        out["tp"][b, rows] = tp
        out["fn"][b, rows] = hist[b].sum(1)[rows] - tp
        out["fp"][b, rows] = hist[b][:, cols].sum(0) - tp
        out["match"][b, rows] = cols
    return out


def relabel(pred: Tensor, target: Tensor, n_class: int) -> Tensor:
    """Rename each image's segments to the class the Hungarian matching gives them.

    A segment matched to class ``c`` becomes ``c``; unmatched segments become ``n_class,
    n_class + 1, ...`` (in order of their labels). For drawing a segmentation in the colours of
    its ground truth; the metrics do not need it.

    Examples
    --------
    >>> import torch
    >>> relabel(torch.tensor([[5, 5, 2, 7]]), torch.tensor([[0, 0, 1, 1]]), 2).tolist()
    [[0, 0, 1, 2]]
    """
    match = hungarian_counts(pred, target, n_class)["match"]
    flat = pred.reshape(pred.shape[0], -1).long()
    out = torch.empty_like(flat)
    for b in range(flat.shape[0]):
        size = max(int(flat[b].max()) + 1, int(match[b].max()) + 1)
        table = torch.full((size,), -1, dtype=torch.long)
        counts = torch.bincount(flat[b].cpu(), minlength=size)
        for c in range(n_class):
            if counts[match[b, c]] > 0:
                table[match[b, c]] = c
        rest = [j for j in range(size) if table[j] < 0 and counts[j] > 0]
        table[rest] = torch.arange(n_class, n_class + len(rest))
        out[b] = table.to(flat.device)[flat[b]]
    return out.reshape(pred.shape)


def scores(tp, fp, fn, total) -> tuple:
    r"""DiffSeg's ACC and mIoU from counts summed over images.

    Parameters
    ----------
    tp, fp, fn : array_like, shape (..., n_class)
        Summed counts (sum over the image axis first).
    total : array_like, shape (...)
        Summed labelled pixels.

    Returns
    -------
    acc, miou : ndarray of shape (...) (floats for 1-D counts)
        :math:`\sum_c TP_c / \text{total}` and the mean over classes with a nonzero
        :math:`TP_c + FP_c + FN_c` of :math:`TP_c / (TP_c + FP_c + FN_c)` (NaN if none).

    Examples
    --------
    >>> scores([2, 1], [0, 1], [1, 0], 4)
    (0.75, 0.5833333333333333)
    """
    tp, fp, fn = (np.asarray(x, dtype=np.float64) for x in (tp, fp, fn))
    total = np.asarray(total, dtype=np.float64)
    den = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(den > 0, tp / np.where(den > 0, den, 1), np.nan)
        acc = tp.sum(-1) / total
        valid = np.isfinite(iou)
        miou = np.where(valid.any(-1), np.nansum(iou, -1) / np.maximum(valid.sum(-1), 1), np.nan)
    if acc.ndim == 0:
        return float(acc), float(miou)
    return acc, miou
