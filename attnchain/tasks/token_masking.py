r"""Token masking (chapter 9): does TokenRank find the tokens a classifier needs?

Rank a classifier's image tokens by importance, remove the top-ranked fraction :math:`f`
(:func:`attnchain.interventions.remove_tokens`), and record whether the prediction is still
right. A ranking that finds what matters makes accuracy fall fast: a low area under the
accuracy-vs-fraction curve (the deletion metric of :cite:`petsiuk2018rise`, used by the paper
:cite:`erel2025attention`).

**Protocol** (each setting a parameter of :func:`evaluate`; the paper does not state them, so
the defaults are named here and in chapter 9)

- Rankings are computed once, on the unmasked image, from the head-mean attention
  ``M = mean_h A_h`` of one layer (default the last, ``layer=-1``): the image tokens are then
  removed in order of the ranking (ties in grid order), so every fraction removes a superset of
  the tokens of the smaller ones.
- Schedule: :data:`FRACTIONS` ``f = 0, 0.1, ..., 0.9`` of the ``n`` image tokens
  (``round(f · n)`` tokens). CLS and register tokens are never removed; kept tokens keep their
  position embeddings (``mode="remove"``; ``mode="mask"`` hides them as keys instead).
- AUC: :func:`auc`, the trapezoid rule over :math:`f` rescaled to :math:`[0, 1]`, of the
  per-image 0/1 correctness; its mean over images is the AUC of the mean accuracy curve.
- Correct: top-1 for ImageNet classifiers; for the multi-label scene ViT, *exact match* (every
  class's sigmoid on the right side of 0.5).

**Rankings** (:data:`METHODS`; higher score = removed first)

``random``
    A uniform random order, seeded per image (``seed · 1000003 + item``), averaged over
    ``seeds`` seeds (so its per-image values are fractions).
``centre``
    Distance from the centre of the patch grid, nearest first.
``column_sum``
    :math:`\sum_i M_{ij}`: how much attention patch :math:`j` receives.
``cls``
    :math:`M_{\mathrm{cls}, j}`: row select of the CLS token.
``tokenrank``
    :math:`\pi_j` of the damped chain :math:`\alpha M + (1-\alpha) \mathbf 1 u^\top`,
    :math:`\alpha = 0.99` (the paper's damping; :func:`attnchain.token_rank`).
``oracle``
    Where ground truth exists (the scenes): the fraction of object pixels in each patch. The
    bound of what a ranking could do by removing the objects.

**Table** (:class:`attnchain.tasks.Runner`): per image, ``method, weighting, metric, value``
with metrics ``acc@0.00`` ... ``acc@0.90`` and ``auc``; weighting ``"uniform"`` for the
attention read-outs, ``"-"`` otherwise.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

import attnchain as ac

from ..interventions import remove_tokens
from . import readouts
from ._runner import Runner, compare
from ._runner import summarise as _summarise

__all__ = ["TASK", "VERSION", "FRACTIONS", "METHODS", "PAPER_AUC", "BACKBONES", "Source",
           "rankings", "rank_scores", "removal_order", "accuracy_curves", "auc", "evaluate", "summarise", "versus"]

TASK = "token_masking"
VERSION = 1
#: The fractions of image tokens removed.
FRACTIONS = tuple(round(0.1 * k, 2) for k in range(10))
#: The rankings, in table order.
METHODS = ("random", "centre", "column_sum", "cls", "tokenrank", "oracle")
#: The paper's table (AUC, lower is better), :cite:`erel2025attention`, by backbone.
PAPER_AUC = {
    "ViT": {"random": 0.79, "centre": 0.33, "column_sum": 0.27, "cls": 0.33, "tokenrank": 0.26},
    "CLIP": {"random": 0.80, "centre": 0.47, "column_sum": 0.49, "cls": 0.53, "tokenrank": 0.46},
    "DINOv1": {"random": 0.88, "centre": 0.45, "column_sum": 0.47, "cls": 0.56, "tokenrank": 0.44},
    "DINOv2": {"random": 0.89, "centre": 0.70, "column_sum": 0.71, "cls": 0.70, "tokenrank": 0.64},
}
#: The paper's column of each full-profile classifier.
BACKBONES = {"vit-b16": "ViT", "clip-vitb16-zeroshot": "CLIP", "dino-vitb16-linear": "DINOv1",
             "dinov2-reg-vitb14-linear": "DINOv2"}
_WEIGHTING = {"column_sum": "uniform", "cls": "uniform", "tokenrank": "uniform"}


def rank_scores(M: Tensor, layout, items: Sequence[int], seeds: int = 3, alpha: float = 0.99,
                foreground: Optional[Tensor] = None) -> dict:
    """Importance scores of the image tokens by every ranking (higher = removed first).

    Parameters
    ----------
    M : Tensor, shape (B, N, N)
        Row-stochastic head-mean attention of the chosen layer.
    layout : attnchain.capture.recorder.TokenLayout
        Its token layout (``cls``, ``image`` and ``grid``).
    items : sequence of int
        The items of the batch (they seed the random rankings).
    seeds : int
        Number of random rankings per image.
    alpha : float
        TokenRank damping.
    foreground : Tensor (B, rows, cols), optional
        Object fraction per patch: adds the ``oracle`` ranking.

    Returns
    -------
    dict
        ``{method: Tensor (B, n)}``; ``"random"`` is ``(seeds, B, n)``. ``cls`` only where the
        layout has a CLS token.

    Examples
    --------
    >>> import torch
    >>> from attnchain.capture.recorder import TokenLayout
    >>> layout = TokenLayout(n=5, cls=(0,), image=(1, 2, 3, 4), grid=(2, 2))
    >>> M = torch.softmax(torch.randn(1, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    >>> s = rank_scores(M, layout, items=[7], seeds=2)
    >>> sorted(s), tuple(s["random"].shape)
    (['centre', 'cls', 'column_sum', 'random', 'tokenrank'], (2, 1, 4))
    >>> torch.equal(s["random"], rank_scores(M, layout, items=[7], seeds=2)["random"])
    True
    """
    img = list(layout.image)
    rows, cols = layout.grid
    B, dev = M.shape[0], M.device
    out = {}
    g = torch.Generator()
    rand = []
    for s in range(seeds):
        per = []
        for i in items:
            g.manual_seed(s * 1000003 + int(i))
            per.append(torch.rand(len(img), generator=g))
        rand.append(torch.stack(per))
    out["random"] = torch.stack(rand).to(dev) if seeds else torch.empty(0, B, len(img), device=dev)
    r, c = torch.meshgrid(torch.arange(rows, device=dev), torch.arange(cols, device=dev),
                          indexing="ij")
    d = torch.hypot(r - (rows - 1) / 2, c - (cols - 1) / 2).flatten().float()
    out["centre"] = (-d).expand(B, -1)
    out["column_sum"] = readouts.column_sum(M, img)
    if layout.cls:
        out["cls"] = readouts.row_select(M, int(layout.cls[0]), img)
    out["tokenrank"] = readouts.token_rank_map(M, img, alpha=alpha)
    if foreground is not None:
        out["oracle"] = foreground.reshape(B, -1).to(dev).float()
    return out


def removal_order(scores: Tensor) -> Tensor:
    """Token indices from most to least important (stable: ties in index order)."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


@torch.no_grad()
def accuracy_curves(model, x: Tensor, correct: Callable[[Tensor], Tensor], orders: Tensor,
                    fractions: Sequence[float] = FRACTIONS, mode: str = "remove",
                    baseline: Optional[Tensor] = None) -> Tensor:
    """Correctness after removing the top ``round(f · n)`` tokens of each order, per fraction.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier on a timm ViT (see :func:`attnchain.interventions.remove_tokens`).
    x : Tensor (B, 3, H, W)
        Preprocessed images.
    correct : callable
        ``correct(logits) -> (B,)`` 0/1 for the images of ``x`` (in order).
    orders : LongTensor (R, B, n)
        ``R`` removal orders per image (:func:`removal_order`).
    fractions : sequence of float
        In ``[0, 1]``.
    mode : {"remove", "mask"}
        As :func:`attnchain.interventions.remove_tokens`.
    baseline : Tensor (B,), optional
        Correctness of the unmasked images (reused for ``f = 0``).

    Returns
    -------
    Tensor, shape (R, B, len(fractions))
        Float 0/1, on ``x``'s device. All ``R`` orders of a fraction run as one batch.
    """
    R, B, n = orders.shape
    cols = []
    xr = x.repeat(R, *([1] * (x.ndim - 1)))
    for f in fractions:
        k = int(round(float(f) * n))
        if k == 0 and baseline is not None:
            cols.append(baseline.float().expand(R, B))
            continue
        with remove_tokens(model, orders.reshape(R * B, n)[:, :k], mode=mode):
            logits = model(xr)
        cols.append(torch.stack([correct(l).float() for l in logits.split(B)]))
    return torch.stack(cols, -1)


def auc(curve, fractions: Sequence[float] = FRACTIONS):
    r"""Area under an accuracy curve, :math:`\frac{1}{f_K - f_0}\int_{f_0}^{f_K} a(f)\,df`.

    The trapezoid rule over the (increasing) ``fractions``, rescaled so that the fraction axis
    is :math:`[0, 1]`; ``curve`` has the fractions on its last axis.

    Examples
    --------
    >>> float(auc(torch.tensor([1.0, 1.0, 0.0]), [0.0, 0.5, 1.0]))
    0.75
    """
    f = torch.as_tensor(fractions, dtype=torch.float64)
    if f.ndim != 1 or len(f) < 2 or bool((f.diff() <= 0).any()):
        raise ValueError(f"fractions must increase and have at least two values, got {fractions}")
    c = torch.as_tensor(curve).double()
    if c.shape[-1] != len(f):
        raise ValueError(f"curve has {c.shape[-1]} values on its last axis, fractions {len(f)}")
    w = f.diff().to(c.device)
    return ((c[..., 1:] + c[..., :-1]) / 2 * w).sum(-1) / float(f[-1] - f[0])


# ----------------------------------------------------------------------------------------------
class Source:
    """The images of a token-masking run: the held-out scenes, or an ImageNet-class test set.

    Parameters
    ----------
    dataset : str
        ``"scenes"`` (:func:`attnchain.data.scenes.benchmark` ``("easy")``, with masks: the
        oracle ranking, and *exact match* as correctness) or a name of
        :data:`attnchain.data.imagenet.DATASETS` (top-1 correctness).
    n : int, optional
        Number of images (default all: 500 scenes, the whole test set).
    root : str or Path, optional
        Data root of :func:`attnchain.data.imagenet.load`.

    Attributes
    ----------
    n : int
    correctness : {"exact_match", "top1"}
    """

    def __init__(self, dataset: str = "scenes", n: Optional[int] = None, root=None):
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.dataset = dataset
        if dataset == "scenes":
            from ..data import scenes
            self._scenes = scenes.benchmark("easy", n=scenes.BENCHMARK_SIZE if n is None else n)
            self.n, self.correctness = len(self._scenes), "exact_match"
        else:
            from ..data import imagenet
            self._images = imagenet.load(dataset, root=root, limit=n)
            self.n, self.correctness = len(self._images), "top1"

    def raw(self, items: Sequence[int]) -> list:
        """The images as stored (``(3, H, W)`` tensors for scenes, PIL images otherwise)."""
        if self.dataset == "scenes":
            return [self._scenes.images[i] for i in items]
        return [self._images[i][0] for i in items]

    def batch(self, items: Sequence[int], pre) -> tuple:
        """``(x, correct, masks)``: preprocessed images, ``correct(logits) -> (B,)`` bool and the
        instance masks (None without ground truth)."""
        if self.dataset == "scenes":
            idx = torch.tensor(list(items))
            x = pre(self._scenes.images[idx])
            y = self._scenes.presence[idx].to(x.device) > 0.5
            return x, (lambda logits: ((logits > 0) == y).all(-1)), self._scenes.masks[idx]
        pairs = [self._images[i] for i in items]
        x = pre([p[0] for p in pairs])
        y = torch.tensor([p[1] for p in pairs], device=x.device)
        return x, (lambda logits: logits.argmax(-1) == y), None


@torch.no_grad()
def rankings(model, x: Tensor, items: Sequence[int], masks: Optional[Tensor] = None,
             layer: int = -1, seeds: int = 3, alpha: float = 0.99) -> tuple:
    """Capture one layer on the unmasked images and rank their tokens by every method.

    Returns
    -------
    scores : dict
        :func:`rank_scores` of the head-mean attention of ``layer``.
    layout : attnchain.capture.recorder.TokenLayout
    logits : Tensor
        The model's output on the unmasked images.
    """
    with ac.capture(model, layers=[layer], weighting="uniform") as rec:
        logits = model(x)
    name = list(rec.attentions)[-1]
    layout = rec.tokens[name]
    M = rec.attentions[name].float().reshape(x.shape[0], layout.n, layout.n)
    M = ac.to_stochastic(torch.where(M < 1e-30, torch.zeros_like(M), M), kind="weights")
    fg = None
    if masks is not None:
        from ..data import scenes
        fg = scenes.patch_foreground(masks.to(M.device), grid=tuple(layout.grid))
    return rank_scores(M, layout, items, seeds=seeds, alpha=alpha, foreground=fg), layout, logits


def evaluate(model_name: str = "scene-vit", dataset: str = "scenes", n: Optional[int] = None,
             results_dir=None, batch_size: int = 50, layer: int = -1,
             fractions: Sequence[float] = FRACTIONS, seeds: int = 3, alpha: float = 0.99,
             mode: str = "remove", model=None, data_root=None, progress: bool = True,
             shard: Optional[tuple] = None) -> pd.DataFrame:
    """Token masking of every ranking on ``n`` images, resumably (see the module docstring).

    Parameters
    ----------
    model_name : str
        A classifier of :func:`attnchain.zoo.load`: ``"scene-vit"`` (offline), a full-profile
        classifier of :data:`BACKBONES`, or a toy twin (``"tiny-vit-in1k"``, ...).
    dataset : str
        ``"scenes"`` (the held-out easy scenes, with the oracle) or a name of
        :data:`attnchain.data.imagenet.DATASETS` (``"imagenetv2-matched-frequency"``, ...).
    n : int, optional
        Number of images (default: the whole set; 500 scenes); see :class:`Source`.
    results_dir : str or Path, optional
        Folder of the resumable results file (:class:`attnchain.tasks.Runner`).
    batch_size : int
        Images per batch (each fraction runs ``batch_size × rankings`` images at once).
    layer : int
        The attention layer the rankings read (index into the captured layers).
    fractions, seeds, alpha, mode
        See the module docstring.
    model : (model, preprocess), optional
        Already loaded; default ``attnchain.zoo.load(model_name)``.
    data_root : str or Path, optional
        Root folder of the ImageNet-class data (:func:`attnchain.data.imagenet.load`).
    progress : bool
        Show a tqdm bar.
    shard : (int, int), optional
        One shard only (:meth:`attnchain.tasks.Runner.run`).

    Returns
    -------
    pandas.DataFrame
        Columns ``model, dataset, item, method, weighting, metric, value``.

    Examples
    --------
    >>> t = evaluate("scene-vit", n=4, batch_size=4, seeds=1, progress=False)
    >>> sorted(t.method.unique())
    ['centre', 'cls', 'column_sum', 'oracle', 'random', 'tokenrank']
    >>> bool((t[t.metric == "auc"].value.between(0, 1)).all())
    True
    """
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    fractions = tuple(float(f) for f in fractions)
    if not all(0 <= f <= 1 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1], got {fractions}")
    auc(torch.zeros(len(fractions)), fractions)  # checks the schedule
    source = Source(dataset, n, data_root)
    settings = dict(model=model_name, dataset=dataset, layer=layer, fractions=list(fractions),
                    seeds=seeds, alpha=alpha, mode=mode, correct=source.correctness)
    runner = Runner(TASK, VERSION, settings, results_dir, labels=("model", "dataset"))
    state = {}

    def compute(items):
        if not state:
            net, pre = ac.zoo.load(model_name) if model is None else model
            state.update(net=runner.place(net).eval(), pre=pre)
        return _batch_rows(state["net"], state["pre"], source, items, layer, fractions, seeds,
                           alpha, mode)

    return runner.run(range(source.n), compute, batch_size=batch_size, progress=progress, shard=shard,
                      desc=f"{model_name}/{dataset}")


def _batch_rows(net, pre, source, items, layer, fractions, seeds, alpha, mode) -> list:
    x, correct, masks = source.batch(items, pre)
    scores, _, logits = rankings(net, x, items, masks, layer, seeds, alpha)
    base = correct(logits)
    names = [m for m in METHODS if m in scores]
    orders = torch.cat([removal_order(scores["random"])]
                       + [removal_order(scores[m])[None] for m in names[1:]])
    curves = accuracy_curves(net, x, correct, orders, fractions, mode, baseline=base).cpu()
    per_method = [curves[:seeds].mean(0)] + list(curves[seeds:])
    out = []
    for m, curve in zip(names, per_method):
        w = _WEIGHTING.get(m, "-")
        areas = auc(curve, fractions)
        for b, item in enumerate(items):
            out += [(item, m, w, f"acc@{f:.2f}", float(curve[b, j])) for j, f in enumerate(fractions)]
            out.append((item, m, w, "auc", float(areas[b])))
    return out


# ----------------------------------------------------------------------------------------------
# summaries
def summarise(table: pd.DataFrame, n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Mean AUC per ranking with a bootstrap interval over images, and the paper's value.

    Returns
    -------
    pandas.DataFrame
        Index ``method`` (table order); columns ``n, auc, low, high`` and ``paper`` (the paper's
        AUC for the classifier's backbone, NaN where the paper has none: the scene ViT, the
        oracle).
    """
    s = _summarise(table[table.metric == "auc"], by=("method",), n_boot=n_boot, seed=seed)
    s = s.rename(columns={"mean": "auc"})
    column = PAPER_AUC.get(BACKBONES.get(str(table["model"].iloc[0]), ""), {}) \
        if "model" in table else {}
    s["paper"] = [column.get(m, math.nan) for m in s.index]
    return s


def versus(table: pd.DataFrame, method: str = "tokenrank", n_boot: int = 10000,
           seed: int = 0) -> pd.DataFrame:
    """Paired AUC differences ``method − other`` for every other ranking, with intervals.

    Negative = ``method`` removes what matters sooner. Rows are paired by image.
    """
    t = table[table.metric == "auc"].assign(weighting="-")
    rows = {}
    for other in [m for m in t.method.unique() if m != method]:
        c = compare(t, "method", method, other, by=("method", "metric"), n_boot=n_boot, seed=seed)
        rows[other] = c.iloc[0]
    out = pd.DataFrame(rows).T[["n", "mean_a", "mean_b", "diff", "low", "high"]]
    out.index.name = f"{method} vs"
    out["n"] = out["n"].astype(int)
    return out.astype({c: np.float64 for c in ("mean_a", "mean_b", "diff", "low", "high")})
