r"""DiffSeg as an evaluation (chapter 11): self-attention from a model, data sets, the task.

The algorithm is :mod:`attnchain.tasks.diffseg`; this module feeds it and scores it on the task
runner (:class:`attnchain.tasks.Runner`), in both profiles with one code path.

**Attention** (:func:`self_attention`). For a diffusers Stable Diffusion pipeline (``sd14``, or
its stand-in) DiffSeg's protocol: the image (``[0, 1]``, scaled to ``[-1, 1]``) is encoded by the
VAE, the latent is the posterior *mean* times the scaling factor (no noise is added; a
pixel-space pipeline without a VAE, ``scene-unet``, takes its preprocessed image), and one
UNet pass at timestep :data:`~attnchain.tasks.diffseg.TIMESTEP` (300) with the empty prompt's
text embedding (unconditional) is captured; every ``attn1`` self-attention map is kept, head
mean, with its grid. A bare ``UNet2DConditionModel`` with a preprocess that takes ``timestep``
(the ``tiny-unet`` twin) gets the same pass on its preprocess's inputs, and any other model
that :func:`attnchain.capture` reads (``feature-attention``) one forward pass.

**Data** (:class:`Source`). ``"coco-stuff-27"``: :mod:`attnchain.data.coco_stuff` (27 classes,
images at 512²). ``"scenes-<level>"``: the held-out synthetic scenes
(:func:`attnchain.data.scenes.benchmark`), whose semantic ground truth has 5 classes
(background and the 4 shapes, :data:`attnchain.data.scenes.CLASSES`), plus per-image instance
metrics against the instance masks.

**The locality control** (:func:`distance_kernel`, ``control=True``). The same anchors and
merging on a kernel of grid distance alone on the same grid (a mixture of the uniform kernel and
a Gaussian of distance), matched per image to the aggregated attention's mean attention distance
(as :mod:`attnchain.tasks.locality` does for retention) and mean row entropy, with its own
threshold: segments that only reflect *where* tokens are. Attention that beats its kernel groups
tokens by content.

**Table** (one row per image, chain, sampler and metric): ``chain`` is ``"attention"`` or
``"kernel"``; ``method`` the anchor sampler; metrics ``tp/c``, ``fp/c``, ``fn/c`` (class
``c``), ``total`` (labelled pixels), ``segments``, the image's own ``acc`` and ``miou``, and
for the scenes ``inst_acc`` and ``inst_miou`` (Hungarian-matched against the instance masks).
:func:`summarise` sums the counts over images as DiffSeg does and bootstraps over images;
:func:`versus` gives paired differences.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from . import diffseg as ds
from ._runner import Runner

__all__ = ["TASK", "VERSION", "DATASETS", "VALIDATION_SEED", "THRESHOLDS", "OFFLINE_POINTS",
           "KERNEL_MATCHES",
           "Source", "self_attention", "distance_kernel", "kernel_mean_distance", "evaluate",
           "tune_threshold", "summarise", "versus", "paper_table", "ours_table", "beside_paper",
           "settings_line"]

TASK = "diffseg"
VERSION = 2
#: Data sets of :class:`Source`.
DATASETS = ("coco-stuff-27", "scenes-easy", "scenes-medium", "scenes-hard")
#: Seed of the validation scenes on which the offline thresholds are chosen (never the
#: benchmark's :data:`attnchain.data.scenes.BENCHMARK_SEED`).
VALIDATION_SEED = 5
#: The thresholds :func:`tune_threshold` tries.
THRESHOLDS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.1, 1.5)
#: Anchor grid of the offline profile: 8 x 8 = 64 anchors on the 16 x 16 token grids (DiffSeg's
#: 16 x 16 on 64 x 64 tokens would take every token, leaving nothing for the samplers to choose).
OFFLINE_POINTS = 8


# ----------------------------------------------------------------------------------------------
# attention
def _is_pipeline(model) -> bool:
    return all(hasattr(model, a) for a in ("unet", "encode_prompt"))


@torch.no_grad()
def self_attention(model, preprocess, images: Tensor, timestep: int = ds.TIMESTEP) -> tuple:
    """Head-mean self-attention maps of every layer, DiffSeg's way (see the module docstring).

    Parameters
    ----------
    model : a diffusers Stable Diffusion pipeline, a ``UNet2DConditionModel`` or a model that
        :func:`attnchain.capture` reads
    preprocess : callable
        The model's preprocess from :func:`attnchain.zoo.load` (unused for pipelines).
    images : Tensor, shape (B, 3, H, W)
        float in ``[0, 1]``.
    timestep : int
        Diffusion timestep (diffusion models only).

    Returns
    -------
    maps : list of Tensor
        ``(B, n, n)`` per layer, float32, on the model's device.
    grids : list of (int, int)
    """
    from .. import capture

    if _is_pipeline(model):
        unet, vae = model.unet, getattr(model, "vae", None)
        dev, dt = unet.device, unet.dtype
        if vae is None:  # a pixel-space pipeline: its preprocess gives the "latents"
            latent = preprocess(images).to(dev, dt)
        else:
            pix = (images.to(dev, torch.float32) * 2 - 1).to(vae.dtype)
            latent = (vae.encode(pix).latent_dist.mean * vae.config.scaling_factor).to(dt)
        text = model.encode_prompt("", dev, 1, False)[0].to(dt)
        text = text.expand(images.shape[0], -1, -1)
        with capture(unet, weighting="uniform") as rec:
            unet(latent, torch.tensor(timestep, device=dev), encoder_hidden_states=text)
    else:
        kw = {"timestep": timestep} if "timestep" in inspect.signature(preprocess).parameters \
            else {}
        inputs = preprocess(images, **kw)
        with capture(model, weighting="uniform") as rec:
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    names = list(rec.attentions)
    return ([rec.attentions[n].float() for n in names],
            [tuple(rec.tokens[n].grid) for n in names])


# ----------------------------------------------------------------------------------------------
# the locality control
def kernel_mean_distance(grid, sigma: Tensor) -> Tensor:
    r"""Mean attention distance of the row-normalised Gaussian kernels of widths ``sigma``.

    The kernel factorises over the two axes of the grid, so
    :math:`\frac1N\sum_{ij} K_{ij} d_{ij} = \frac1N \sum_{\Delta_r, \Delta_c} W_r(\Delta_r)
    W_c(\Delta_c) \sqrt{\Delta_r^2 + \Delta_c^2}`, with :math:`W_r(\Delta)` the summed 1-D
    kernel weight of row offsets :math:`\Delta` (likewise columns): :math:`O(h^2 + w^2)` per
    width instead of :math:`O(N^2)`. Equals :func:`attnchain.tasks.locality.kernel_mean_distance`.

    Parameters
    ----------
    grid : (int, int)
    sigma : Tensor, shape (S,)

    Returns
    -------
    Tensor, shape (S,)
        float64, on ``sigma``'s device.

    Examples
    --------
    >>> import torch
    >>> from attnchain.tasks import locality
    >>> s = torch.tensor([0.5, 2.0, 9.0], dtype=torch.float64)
    >>> bool(torch.allclose(kernel_mean_distance((5, 7), s),
    ...                     locality.kernel_mean_distance((5, 7), s)))
    True
    """
    h, w = grid
    sigma = sigma.double().reshape(-1)

    def axis(n):
        x = torch.arange(n, dtype=torch.float64, device=sigma.device)
        d = x[:, None] - x[None, :]                                         # (n, n)
        k = torch.exp(-0.5 * d[None] ** 2 / sigma[:, None, None] ** 2)       # (S, n, n)
        k = k / k.sum(-1, keepdim=True)
        off = (d + n - 1).long().flatten()                                   # offset index
        W = torch.zeros(len(sigma), 2 * n - 1, dtype=torch.float64, device=sigma.device)
        return W.index_add_(1, off, k.flatten(1)), torch.arange(1 - n, n, device=sigma.device)

    Wr, dr = axis(h)
    Wc, dc = axis(w)
    D = torch.sqrt(dr.double()[:, None] ** 2 + dc.double()[None, :] ** 2)
    return torch.einsum("sa,sb,ab->s", Wr, Wc, D) / (h * w)


_KERNEL_ROWS = 64  # rows (strided) on which distance_kernel searches its width

#: How :func:`distance_kernel` matches the attention.
KERNEL_MATCHES = ("distance+entropy", "distance")


def _entropy(P: Tensor) -> Tensor:
    """Mean row entropy (nats) of ``(..., N, N)`` row-stochastic maps."""
    return -(P * torch.log(P.clamp_min(torch.finfo(P.dtype).tiny))).sum(-1).mean(-1)


def distance_kernel(A: Tensor, grid, match: str = "distance+entropy", n_sigma: int = 48) -> tuple:
    r"""The distance-only control of ``A``: a kernel of grid distance alone, one per image.

    ``match="distance"``: the Gaussian :math:`G_\sigma`
    (:func:`attnchain.tasks.locality.gaussian_kernel`) whose mean attention distance :math:`\frac1N\sum_{ij} K_{ij} d_{ij}` equals that of ``A``
    (the control of :mod:`attnchain.tasks.locality`).

    ``match="distance+entropy"`` (default): the mixture
    :math:`K = (1 - w)\,\tfrac1N \mathbf 1\mathbf 1^\top + w\, G_\sigma` with the same mean
    distance as ``A`` *and* the same mean row entropy. DiffSeg thresholds KL distances between
    maps, which scale with how far the maps are from flat: attention of a weakly trained model
    is nearly uniform with a small local bump, and the pure Gaussian of its mean distance is
    then nearly uniform everywhere, a control too flat to split anything. The mixture keeps
    both the reach and the contrast of the attention; only *what* it attends to is replaced by
    distance. For each :math:`\sigma` on a log grid from 0.3 up to the pure Gaussian's width,
    :math:`w` follows from the mean distance, and the :math:`\sigma` whose mixture's entropy is
    closest to the attention's (both measured on 64 evenly strided rows) is kept; :math:`w` is
    then set from the exact mean distance. Attention farther-reaching than uniform gets the
    uniform kernel (:math:`w = 0`).

    Parameters
    ----------
    A : Tensor, shape (B, N, N)
        Row-stochastic maps on ``grid``.
    grid : (int, int)
    match : {"distance+entropy", "distance"}
    n_sigma : int
        Widths tried per image for ``"distance+entropy"``.

    Returns
    -------
    K : Tensor, shape (B, N, N)
        Row-stochastic, ``A``'s dtype and device.
    sigma, weight : Tensor, shape (B,)
        float64: the Gaussian's width (grid units; at most 100, the widest tabulated) and its
        weight :math:`w` (1 for ``"distance"``).

    Examples
    --------
    >>> import torch
    >>> from attnchain.tasks import locality
    >>> A = locality.gaussian_kernel((6, 6), torch.tensor([1.3])).float()
    >>> K, sigma, w = distance_kernel(A, (6, 6), match="distance")
    >>> round(float(sigma[0]), 2)
    1.3
    >>> G = locality.gaussian_kernel((16, 16), torch.tensor([1.3])).float()
    >>> K, sigma, w = distance_kernel(0.5 * G + 0.5 / 256, (16, 16))   # recovers the mixture
    >>> round(float(sigma[0]), 1), round(float(w[0]), 2)
    (1.3, 0.5)
    """
    from .locality import gaussian_kernel, grid_distances

    if match not in KERNEL_MATCHES:
        raise ValueError(f"match must be one of {KERNEL_MATCHES}, got {match!r}")
    d = grid_distances(grid, device=A.device).to(A.dtype)
    mean = ((A * d).sum(-1).mean(-1)).double()                               # (B,)
    table = torch.logspace(-2, 2, 801, dtype=torch.float64, device=A.device)
    md = kernel_mean_distance(grid, table)
    x = mean.clamp(float(md[0]), float(md[-1]))
    pos = torch.searchsorted(md.contiguous(), x.contiguous()).clamp(1, len(md) - 1)
    t = ((x - md[pos - 1]) / (md[pos] - md[pos - 1])).clamp(0, 1)
    sigma = torch.exp(torch.log(table[pos - 1]) * (1 - t) + torch.log(table[pos]) * t)
    if match == "distance":
        return (gaussian_kernel(tuple(grid), sigma).to(A.dtype), sigma,
                torch.ones_like(sigma))
    N = A.shape[-1]
    d64 = d.double()
    far = float(d64.mean())
    rows = torch.arange(0, N, max(1, N // _KERNEL_ROWS), device=A.device)  # the search's rows
    dsub = d64[rows]
    target = _entropy(A.double()[:, rows])
    Ks, sig, wts = [], [], []
    for b in range(A.shape[0]):
        if float(mean[b]) >= far:                        # no locality at all: uniform
            Ks.append(torch.full((N, N), 1.0 / N, dtype=A.dtype, device=A.device))
            sig.append(float(table[-1]))
            wts.append(0.0)
            continue
        top = max(float(sigma[b]), 0.31)
        cand = torch.logspace(math.log10(0.3), math.log10(top), n_sigma, dtype=torch.float64,
                              device=A.device)
        G = torch.exp(-0.5 * dsub[None] ** 2 / cand[:, None, None] ** 2)      # (S, R, N)
        G = G / G.sum(-1, keepdim=True)
        w = ((far - mean[b]) / (far - (G * dsub).sum(-1).mean(-1)).clamp_min(1e-12)).clamp(0, 1)
        gap = (_entropy((1 - w[:, None, None]) / N + w[:, None, None] * G) - target[b]).abs()
        s_ = cand[int(gap.argmin())]
        G = gaussian_kernel(tuple(grid), s_[None])[0]                       # exact, all rows
        w = min(max((far - float(mean[b])) / max(far - float((G * d64).sum(-1).mean()), 1e-12),
                    0.0), 1.0)
        Ks.append(((1 - w) / N + w * G).to(A.dtype))
        sig.append(float(s_))
        wts.append(w)
    return (torch.stack(Ks), torch.tensor(sig, dtype=torch.float64),
            torch.tensor(wts, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# data
class Source:
    """Images and ground truth of a DiffSeg run.

    Parameters
    ----------
    dataset : str
        ``"coco-stuff-27"`` or ``"scenes-easy"`` / ``"scenes-medium"`` / ``"scenes-hard"``.
    n : int, optional
        Number of images (default all: 2,175 COCO-Stuff images; 500 scenes).
    root : str or Path, optional
        COCO-Stuff folder (:func:`attnchain.data.coco_stuff.download` fills it; default
        :func:`attnchain.data.coco_stuff.default_root`).
    size : int, optional
        COCO-Stuff side after the centre crop (default 512, DiffSeg's).
    seed : int, optional
        Scenes only: ``scenes.generate(n, seed, level)`` instead of the held-out benchmark
        (for choosing thresholds, :data:`VALIDATION_SEED`).

    Attributes
    ----------
    n, n_class, classes, size
    """

    def __init__(self, dataset: str = "scenes-easy", n: Optional[int] = None, root=None,
                 size: Optional[int] = None, seed: Optional[int] = None):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.dataset = dataset
        if dataset == "coco-stuff-27":
            from ..data import coco_stuff as cs
            root = cs.default_root() if root is None else root
            self._coco = cs.CocoStuff27(root, size=size or cs.RESOLUTION)
            if n is not None:
                self._coco.ids = self._coco.ids[:n]
            self.n, self.classes, self.size = len(self._coco), cs.COARSE, self._coco.size
        else:
            from ..data import scenes
            level = dataset.split("-", 1)[1]
            n = scenes.BENCHMARK_SIZE if n is None else n
            self._scenes = scenes.benchmark(level, n=n) if seed is None else \
                scenes.generate(n, seed, level)
            self.n, self.size = len(self._scenes), self._scenes.images.shape[-1]
            self.classes = ("background",) + tuple(scenes.CLASSES)
        self.n_class = len(self.classes)

    def batch(self, items: Sequence[int]) -> tuple:
        """``(images (B, 3, S, S) in [0, 1], labels (B, S, S), instances or None)`` on the CPU;
        labels are class indices with -1 ignored."""
        if self.dataset == "coco-stuff-27":
            pairs = [self._coco[i] for i in items]
            return (torch.stack([p[0] for p in pairs]) / 255.0,
                    torch.stack([p[1] for p in pairs]), None)
        idx = torch.as_tensor(list(items))
        masks = self._scenes.masks[idx]
        lab = self._scenes.labels[idx]                                   # (B, MAX_OBJECTS)
        cls = torch.cat([torch.zeros(len(idx), 1, dtype=torch.long), lab + 1], 1).clamp_min(0)
        semantic = torch.gather(cls, 1, masks.flatten(1)).reshape(masks.shape)
        return self._scenes.images[idx], semantic, masks

    def raw(self, i: int):
        """Image ``i`` as stored (PIL for COCO-Stuff, a tensor for the scenes)."""
        return self._coco.raw(i) if self.dataset == "coco-stuff-27" else self._scenes.images[i]


# ----------------------------------------------------------------------------------------------
# the task
def _rows(item, chain, sampler, counts, b, n_class, extra) -> list:
    out = []
    for key in ("tp", "fp", "fn"):
        out += [(item, chain, sampler, "-", f"{key}/{c}", float(counts[key][b, c]))
                for c in range(n_class)]
    out.append((item, chain, sampler, "-", "total", float(counts["total"][b])))
    acc, miou = ds.scores(counts["tp"][b], counts["fp"][b], counts["fn"][b], counts["total"][b])
    out += [(item, chain, sampler, "-", "acc", acc), (item, chain, sampler, "-", "miou", miou)]
    out += [(item, chain, sampler, "-", k, float(v[b])) for k, v in extra.items()]
    return out


def _instance_scores(labels: Tensor, masks: Tensor) -> dict:
    n = int(masks.max()) + 1
    c = ds.hungarian_counts(labels, masks.to(labels.device), n)
    present = np.stack([(masks == k).flatten(1).any(1).numpy() for k in range(n)], 1)
    den = c["tp"] + c["fp"] + c["fn"]
    iou = np.where(present, c["tp"] / np.maximum(den, 1), np.nan)
    return {"inst_acc": c["tp"].sum(1) / c["total"], "inst_miou": np.nanmean(iou, 1)}


def _thresholds(threshold, control: bool, iterations: int) -> dict:
    """``{chain: τ}`` from a number (every chain) or a mapping."""
    chains = ("attention", "kernel") if control else ("attention",)
    if isinstance(threshold, dict):
        missing = [c for c in chains if c not in threshold]
        if missing:
            raise ValueError(f"threshold has no value for chain(s) {missing}")
        out = {c: threshold[c] for c in chains}
    else:
        out = {c: threshold for c in chains}
    for t in out.values():
        ds._check_threshold(t, iterations)
    return {c: float(t) for c, t in out.items()}


def evaluate(model_name: str = "feature-attention", dataset: str = "scenes-easy",
             n: Optional[int] = None, results_dir=None,
             samplers: Sequence[str] = ("grid", "tokenrank"), threshold=ds.KL_THRESHOLD,
             iterations: int = ds.ITERATIONS, points: int = ds.POINTS, k: Optional[int] = None,
             timestep: int = ds.TIMESTEP, alpha: float = ds.ALPHA, control: bool = False,
             radius: Optional[float] = None, batch_size: int = 8, model=None, data_root=None,
             size: Optional[int] = None, progress: bool = True,
             shard: Optional[tuple] = None) -> pd.DataFrame:
    """DiffSeg with every sampler on ``n`` images, resumably (see the module docstring).

    Parameters
    ----------
    model_name : str
        A model of :func:`attnchain.zoo.load`: ``"sd14"`` (full), ``"feature-attention"``,
        ``"tiny-unet"``, the project's diffusion model.
    dataset : str
        One of :data:`DATASETS`.
    n : int, optional
        Number of images (default all).
    results_dir : str or Path, optional
        Folder of the resumable results file.
    samplers : sequence of str
        Anchor samplers (:data:`attnchain.tasks.diffseg.SAMPLERS`).
    threshold : float or dict
        :math:`\\tau`, for every chain or ``{"attention": ..., "kernel": ...}``.
    iterations, points, k, alpha, radius
        DiffSeg's settings and the samplers' (:func:`attnchain.tasks.diffseg.segment`).
    timestep : int
        Diffusion timestep of the UNet pass.
    control : bool
        Also segment the distance-matched kernel (chain ``"kernel"``).
    batch_size : int
        Images per forward pass.
    model : (model, preprocess), optional
        Already loaded.
    data_root : str or Path, optional
        COCO-Stuff folder.
    size : int, optional
        COCO-Stuff side (default 512).
    progress : bool
    shard : (int, int), optional
        One shard only.

    Returns
    -------
    pandas.DataFrame
        Columns ``model, dataset, item, chain, method, weighting, metric, value``.

    Examples
    --------
    >>> t = evaluate("feature-attention", "scenes-easy", n=2, points=4, threshold=0.3,
    ...              progress=False)
    >>> sorted(t.method.unique()), sorted(t.chain.unique())
    (['grid', 'tokenrank'], ['attention'])
    """
    samplers = list(samplers)
    bad = [s for s in samplers if s not in ds.SAMPLERS]
    if bad or not samplers:
        raise ValueError(f"samplers must be some of {ds.SAMPLERS}, got {samplers}")
    thresholds = _thresholds(threshold, control, iterations)
    source = Source(dataset, n, data_root, size)
    settings = dict(model=model_name, dataset=dataset, samplers=samplers, threshold=thresholds,
                    iterations=iterations, points=points, k=k, timestep=timestep, alpha=alpha,
                    radius=radius, control=bool(control), size=source.size,
                    n_class=source.n_class)
    runner = Runner(TASK, VERSION, settings, results_dir, labels=("model", "dataset"),
                    columns=("chain",))
    state = {}

    def compute(items):
        if not state:
            from .. import zoo
            net, pre = zoo.load(model_name, device=runner.device) if model is None else model
            state.update(net=net, pre=pre)
        return _batch_rows(state["net"], state["pre"], source, items, settings)

    return runner.run(range(source.n), compute, batch_size=batch_size, progress=progress,
                      shard=shard, desc=f"diffseg {model_name}/{dataset}")


def _distances(C: Tensor, uses: int, points: int, grid) -> Optional[Tensor]:
    """All pairwise map distances of ``C`` when that is cheaper than ``uses`` anchor sets."""
    anchors = len(ds.grid_anchors(grid, points))
    return ds.symmetric_kl(C, C) if uses * anchors >= C.shape[-1] else None


def _chains(net, pre, images, timestep: int, control: bool) -> tuple:
    maps, grids = self_attention(net, pre, images, timestep)
    A, grid = ds.aggregate(maps, grids)
    chains = {"attention": A}
    if control:
        chains["kernel"] = distance_kernel(A, grid)[0]
    return chains, grid


def _batch_rows(net, pre, source, items, st) -> list:
    from ..stationary import token_rank

    images, labels, masks = source.batch(items)
    chains, grid = _chains(net, pre, images, st["timestep"], st["control"])
    labels = labels.to(chains["attention"].device)
    out = []
    for chain, C in chains.items():
        pi = token_rank(C, alpha=st["alpha"]) if any(s.startswith("tokenrank")
                                                      for s in st["samplers"]) else None
        D = _distances(C, len(st["samplers"]), st["points"], grid)
        for sampler in st["samplers"]:
            anchors = ds.sample_anchors(C, grid, sampler, points=st["points"], k=st["k"],
                                        alpha=st["alpha"], seeds=list(items), pi=pi,
                                        radius=st["radius"])
            merged = ds.merge(C, anchors, st["threshold"][chain], st["iterations"], D)
            pred = ds.label_map(merged, grid, source.size)
            counts = ds.hungarian_counts(pred, labels, source.n_class)
            extra = {"segments": np.array([m.shape[0] for m in merged], dtype=np.float64)}
            if masks is not None:
                extra.update(_instance_scores(pred.cpu(), masks))
            for b, item in enumerate(items):
                out += _rows(item, chain, sampler, counts, b, source.n_class, extra)
    return out


def tune_threshold(model_name: str = "feature-attention", level: str = "easy", n: int = 100,
                   thresholds: Sequence[float] = THRESHOLDS, points: int = OFFLINE_POINTS,
                   iterations: int = ds.ITERATIONS, timestep: int = ds.TIMESTEP,
                   control: bool = True, seed: int = VALIDATION_SEED, batch_size: int = 50,
                   model=None) -> tuple:
    """Choose :math:`\\tau` per chain on validation scenes, as DiffSeg chose it per data set.

    DiffSeg's 1.1 was set for Stable Diffusion's 64 × 64 maps; a model with other maps needs its
    own. For each chain, DiffSeg with the uniform grid (the original method) runs on ``n``
    scenes of ``scenes.generate(n, seed, level)`` (not the benchmark) at every threshold, and the
    one with the highest mIoU (ties: the smaller) is chosen. Every sampler then uses it.

    Returns
    -------
    best : dict
        ``{chain: τ}``.
    sweep : pandas.DataFrame
        Columns ``chain, threshold, acc, miou, segments``.
    """
    from .. import zoo

    source = Source(f"scenes-{level}", n, seed=seed)
    net, pre = zoo.load(model_name) if model is None else model
    rows = []
    counts: dict = {}
    for s0 in range(0, source.n, batch_size):
        items = list(range(s0, min(source.n, s0 + batch_size)))
        images, labels, _ = source.batch(items)
        chains, grid = _chains(net, pre, images, timestep, control)
        anchors = ds.grid_anchors(grid, points, device=chains["attention"].device)
        anchors = anchors.expand(len(items), -1)
        for chain, C in chains.items():
            D = _distances(C, len(thresholds), points, grid)
            for t in thresholds:
                merged = ds.merge(C, anchors, t, iterations, D)
                pred = ds.label_map(merged, grid, source.size)
                c = ds.hungarian_counts(pred, labels.to(pred.device), source.n_class)
                acc = counts.setdefault((chain, t), {"tp": 0, "fp": 0, "fn": 0, "total": 0,
                                                     "segments": 0})
                for key in ("tp", "fp", "fn", "total"):
                    acc[key] = acc[key] + c[key].sum(0)
                acc["segments"] += sum(m.shape[0] for m in merged)
    for (chain, t), c in counts.items():
        acc, miou = ds.scores(c["tp"], c["fp"], c["fn"], c["total"])
        rows.append((chain, t, acc, miou, c["segments"] / source.n))
    sweep = pd.DataFrame(rows, columns=["chain", "threshold", "acc", "miou", "segments"])
    best = {chain: float(g.sort_values(["miou", "threshold"], ascending=[False, True])
                         .threshold.iloc[0]) for chain, g in sweep.groupby("chain", sort=False)}
    return best, sweep


# ----------------------------------------------------------------------------------------------
# summaries
def _counts(table: pd.DataFrame) -> tuple:
    """``{(chain, method): (tp, fp, fn, total)}`` as arrays over items, and the items."""
    t = table[table.metric.str.contains("/") | (table.metric == "total")]
    items = list(dict.fromkeys(t.item))
    out = {}
    for (chain, method), g in t.groupby(["chain", "method"], sort=False):
        w = g.pivot(index="item", columns="metric", values="value").loc[items]
        n_class = sum(c.startswith("tp/") for c in w.columns)
        arr = [w[[f"{key}/{c}" for c in range(n_class)]].to_numpy() for key in ("tp", "fp", "fn")]
        out[(chain, method)] = (*arr, w["total"].to_numpy())
    return out, items


def _weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resample counts ``(n_boot, n)``: how often each image is drawn."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def _resampled(c, W) -> tuple:
    tp, fp, fn, total = c
    return ds.scores(W @ tp, W @ fp, W @ fn, W @ total)


def summarise(table: pd.DataFrame, n_boot: int = 2000, level: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """ACC and mIoU per chain and sampler, DiffSeg's way, with bootstrap intervals over images.

    Counts are summed over the images (:func:`attnchain.tasks.diffseg.scores`); the interval is
    the percentile interval of the same statistic over ``n_boot`` resamples of the images.

    Returns
    -------
    pandas.DataFrame
        Index ``(chain, method)``; columns ``n``, ``acc``, ``acc_low``, ``acc_high``, ``miou``,
        ``miou_low``, ``miou_high`` (fractions, not percent), ``segments`` (mean per image)
        and, for the scenes, the per-image means ``inst_acc`` and ``inst_miou``.
    """
    counts, items = _counts(table)
    W = _weights(len(items), n_boot, seed)
    q = [(1 - level) / 2, (1 + level) / 2]
    rows, index = [], []
    for key, c in counts.items():
        acc, miou = ds.scores(c[0].sum(0), c[1].sum(0), c[2].sum(0), c[3].sum())
        ba, bm = _resampled(c, W)
        sub = table[(table.chain == key[0]) & (table.method == key[1])]
        row = dict(n=len(items), acc=acc, acc_low=np.quantile(ba, q[0]),
                   acc_high=np.quantile(ba, q[1]), miou=miou, miou_low=np.nanquantile(bm, q[0]),
                   miou_high=np.nanquantile(bm, q[1]),
                   segments=sub[sub.metric == "segments"].value.mean())
        for m in ("inst_acc", "inst_miou"):
            if (sub.metric == m).any():
                row[m] = sub[sub.metric == m].value.mean()
        rows.append(row)
        index.append(key)
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["chain", "method"]))


def versus(table: pd.DataFrame, a=("attention", "tokenrank"), b=("attention", "grid"),
           n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Paired differences ``a − b`` of ACC and mIoU (``(chain, sampler)`` pairs), resampling
    the same images for both, and of the per-image instance metrics where present.

    Returns
    -------
    pandas.DataFrame
        Index ``metric``; columns ``a``, ``b``, ``diff``, ``low``, ``high``.
    """
    counts, items = _counts(table)
    if a not in counts or b not in counts:
        raise ValueError(f"{a} or {b} is not in the table: {list(counts)}")
    W = _weights(len(items), n_boot, seed)
    q = [(1 - level) / 2, (1 + level) / 2]
    full = {k: ds.scores(c[0].sum(0), c[1].sum(0), c[2].sum(0), c[3].sum())
            for k, c in ((a, counts[a]), (b, counts[b]))}
    ra, rb = _resampled(counts[a], W), _resampled(counts[b], W)
    rows = {}
    for j, m in enumerate(("acc", "miou")):
        d = ra[j] - rb[j]
        rows[m] = (full[a][j], full[b][j], full[a][j] - full[b][j], np.nanquantile(d, q[0]),
                   np.nanquantile(d, q[1]))
    for m in ("inst_acc", "inst_miou"):
        sel = [table[(table.chain == x[0]) & (table.method == x[1]) & (table.metric == m)]
               .set_index("item").value for x in (a, b)]
        if len(sel[0]) and len(sel[1]):
            from ..metrics import paired_bootstrap_ci
            pa, pb = sel[0].loc[items].to_numpy(), sel[1].loc[items].to_numpy()
            ok = np.isfinite(pa) & np.isfinite(pb)
            diff = paired_bootstrap_ci(pa[ok], pb[ok], n_boot, level, seed)
            rows[m] = (pa[ok].mean(), pb[ok].mean(), *diff)
    out = pd.DataFrame(rows, index=["a", "b", "diff", "low", "high"]).T
    out.index.name = f"{'/'.join(a)} vs {'/'.join(b)}"
    return out


def paper_table() -> pd.DataFrame:
    """The paper's DiffSeg table (COCO-Stuff-27, SD1.4), in percent.

    Examples
    --------
    >>> float(paper_table().loc["tokenrank", "mACC"])
    84.97
    """
    return pd.DataFrame({s: {"mACC": v[0], "mIoU": v[1]} for s, v in ds.PAPER.items()}).T \
        .rename_axis("paper: anchors")


def ours_table(summary: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarise` in the paper's layout: percent, intervals as ``[low, high]`` columns.

    Returns
    -------
    pandas.DataFrame
        Index ``(chain, method)``; columns ``mACC``, ``mACC 95% CI``, ``mIoU``, ``mIoU 95% CI``,
        ``segments`` and ``n``.
    """
    def ci(lo, hi):
        return [f"[{100 * a:.2f}, {100 * b:.2f}]" for a, b in zip(lo, hi)]

    return pd.DataFrame({
        "mACC": (100 * summary.acc).round(2), "mACC 95% CI": ci(summary.acc_low, summary.acc_high),
        "mIoU": (100 * summary.miou).round(2),
        "mIoU 95% CI": ci(summary.miou_low, summary.miou_high),
        "segments": summary.segments.round(2), "n": summary.n}, index=summary.index)


def beside_paper(summary: pd.DataFrame, chain: str = "attention") -> pd.DataFrame:
    """The paper's table and ours side by side, one row per sampler (percent).

    Parameters
    ----------
    summary : pandas.DataFrame
        :func:`summarise` of a run.
    chain : str
        ``"attention"`` (or ``"kernel"``, the control).

    Returns
    -------
    pandas.DataFrame
        Index ``anchors``; columns ``paper mACC``, ``paper mIoU`` (NaN for samplers the paper
        does not have), ``ours mACC``, ``mACC 95% CI``, ``ours mIoU``, ``mIoU 95% CI``.
    """
    ours = ours_table(summary).xs(chain, level="chain")
    paper = paper_table()
    out = pd.DataFrame({
        "paper mACC": [paper["mACC"].get(m, np.nan) for m in ours.index],
        "paper mIoU": [paper["mIoU"].get(m, np.nan) for m in ours.index],
        "ours mACC": ours["mACC"].to_numpy(), "mACC 95% CI": ours["mACC 95% CI"].to_numpy(),
        "ours mIoU": ours["mIoU"].to_numpy(), "mIoU 95% CI": ours["mIoU 95% CI"].to_numpy()},
        index=pd.Index(ours.index, name="anchors"))
    return out


def settings_line(model: str, dataset: str, n: int, threshold, points: int,
                  k: Optional[int] = None, iterations: int = ds.ITERATIONS,
                  timestep: int = ds.TIMESTEP, alpha: float = ds.ALPHA) -> str:
    """One line naming every setting of a run (printed beside its table)."""
    tau = ", ".join(f"{c} {t}" for c, t in threshold.items()) if isinstance(threshold, dict) \
        else str(threshold)
    return (f"{model} on {dataset} ({n} images): one unconditional UNet pass at t = {timestep} "
            f"on the clean latent (diffusion models), self-attention head mean, levels weighted "
            f"by resolution, keys upsampled bilinearly and renormalised, queries tiled; "
            f"symmetric KL threshold {tau}, {iterations} iterations; grid {points} x {points} "
            f"points, {'as many' if k is None else k} sampled anchors; TokenRank alpha {alpha}; "
            f"bilinear label upsampling + argmax; per-image Hungarian matching, counts summed "
            f"over images")
