r"""Scores of concept maps against masks, pooled as ConceptAttention pools them, and summaries.

**Scoring** (:func:`score_maps`), ConceptAttention's protocol :cite:`helbling2025conceptattention`
where the paper is silent: the map is min-max normalised, thresholded at its mean on the token
grid, and both map and mask are brought to the evaluation size by nearest-neighbour resizing.
Per image the table stores the pixel counts, so that pixel accuracy and IoU are *pooled over the
dataset* (sums of correct pixels, intersections and unions, then the ratio), and the per-image
average precision (:func:`sklearn.metrics.average_precision_score` of the map against the
mask), whose mean over images is mAP.

The summaries (:func:`summarise`, :func:`versus`, :func:`bounce_table`,
:func:`paper_comparison`) read the long table of
:func:`attnchain.tasks.concept_segmentation.evaluate` and set our numbers beside the paper's
table (:data:`PAPER`).

**References**

Erel et al., "Attention (as Discrete-Time Markov) Chains", NeurIPS 2025
:cite:`erel2025attention`; Helbling et al., "ConceptAttention", ICML 2025
:cite:`helbling2025conceptattention`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["score_maps", "pooled_scores", "PAPER", "summarise", "versus", "bounce_table",
           "paper_comparison"]


# ----------------------------------------------------------------------------------------------
# scoring
def _resize_nearest(x: Tensor, size) -> Tensor:
    return F.interpolate(x[:, None].float(), size=tuple(size), mode="nearest")[:, 0]


def score_maps(maps: Tensor, masks: Tensor, eval_size: Optional[int] = None) -> dict:
    """Per-map counts and AP of grid maps against binary masks (ConceptAttention's protocol).

    Each map is min-max normalised, thresholded at its mean on its own grid, and the map, its
    thresholded mask and the ground truth are resized (nearest neighbour) to ``eval_size``
    squared (default: the ground truth's own size).

    Parameters
    ----------
    maps : Tensor (B, r, c)
    masks : Tensor (B, H, W)
        Ground truth, bool or 0/1.
    eval_size : int, optional

    Returns
    -------
    dict of ndarray (B,)
        ``pixels``, ``correct``, ``inter_fg``, ``union_fg``, ``inter_bg``, ``union_bg`` (counts
        for pooled accuracy and IoU, :func:`pooled_scores`), ``ap`` (average precision of the
        map against the mask, :func:`attnchain.metrics.ranking_metrics`, identical to
        :func:`sklearn.metrics.average_precision_score`; NaN for an empty or full mask),
        ``iou`` (the item's own foreground IoU at the mean threshold) and ``iou_best`` (its IoU
        at the best threshold of the map: an oracle).

    Examples
    --------
    >>> import torch
    >>> gt = torch.zeros(1, 4, 4, dtype=torch.bool); gt[0, :2, :2] = True
    >>> s = score_maps(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), gt)
    >>> float(s["ap"][0]), int(s["correct"][0]), int(s["pixels"][0])
    (1.0, 16, 16)
    """
    from ..metrics import ranking_metrics

    if maps.ndim != 3 or masks.ndim != 3 or maps.shape[0] != masks.shape[0]:
        raise ValueError(f"maps (B, r, c) and masks (B, H, W) expected, got {tuple(maps.shape)} "
                         f"and {tuple(masks.shape)}")
    m = maps.detach().float()
    lo = m.flatten(1).amin(-1)[:, None, None]
    hi = m.flatten(1).amax(-1)[:, None, None]
    m = (m - lo) / (hi - lo).clamp_min(1e-12)
    pred = m > m.flatten(1).mean(-1)[:, None, None]
    size = tuple(masks.shape[-2:]) if eval_size is None else (eval_size, eval_size)
    gt = masks.to(m.device).bool()
    if tuple(gt.shape[-2:]) != size:
        gt = _resize_nearest(gt, size) > 0.5
    pred = _resize_nearest(pred, size) > 0.5
    score = _resize_nearest(m, size)
    tp = (pred & gt).flatten(1).sum(-1)
    tn = (~pred & ~gt).flatten(1).sum(-1)
    fp = (pred & ~gt).flatten(1).sum(-1)
    fn = (~pred & gt).flatten(1).sum(-1)
    counts = {"pixels": tp + tn + fp + fn, "correct": tp + tn, "inter_fg": tp,
              "union_fg": tp + fp + fn, "inter_bg": tn, "union_bg": tn + fp + fn}
    out = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in counts.items()}
    y = gt.flatten(1)
    ap, best = ranking_metrics(score.flatten(1), y)
    npos = y.sum(-1)
    ok = (npos > 0) & (npos < y.shape[1])
    out["ap"] = torch.where(ok, ap, torch.full_like(ap, float("nan"))).detach().cpu().numpy()
    out["iou_best"] = best.detach().cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        out["iou"] = np.where(out["union_fg"] > 0, out["inter_fg"] / out["union_fg"], 1.0)
    return out


def pooled_scores(table: pd.DataFrame, n_boot: int = 0, level: float = 0.95,
                  seed: int = 0) -> pd.DataFrame:
    """Accuracy, IoU and mAP per method and weighting, pooled as ConceptAttention pools them.

    ``acc`` = sum of correct pixels / sum of pixels; ``iou_fg`` and ``iou_bg`` = summed
    intersections / summed unions of the foreground and the background; ``miou`` = their mean;
    ``map`` = the mean over items of the per-item AP (NaN items left out). Values in percent.

    Parameters
    ----------
    table : pandas.DataFrame
        A task table (one row per item, concept, method, weighting and metric).
    n_boot : int
        With ``n_boot > 0``, percentile bootstrap intervals of ``acc``, ``miou`` and ``map``
        (columns ``*_low``, ``*_high``): the concepts are resampled with replacement and the
        pooled ratios recomputed on each resample.
    level, seed
        Confidence level and the seed of :func:`numpy.random.default_rng`.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [(0, "m", "-", k, v) for k, v in dict(pixels=4, correct=3, inter_fg=1,
    ...         union_fg=2, inter_bg=2, union_bg=3, ap=0.5).items()]
    >>> t = pd.DataFrame(rows, columns=["item", "method", "weighting", "metric", "value"])
    >>> pooled_scores(t).round(2).values.tolist()
    [[75.0, 50.0, 66.67, 58.33, 50.0, 1.0]]
    """
    ids = ["method", "weighting", "item"] + (["object"] if "object" in table else [])
    w = table.pivot_table(index=ids, columns="metric", values="value", sort=False,
                          aggfunc="first")
    rows, keys = [], []
    q = (1 - level) / 2
    for key, g in w.groupby(level=[0, 1], sort=False):
        c = {k: g[k].to_numpy(np.float64) for k in ("correct", "pixels", "inter_fg", "union_fg",
                                                     "inter_bg", "union_bg", "ap")}

        def stats(idx):
            tot = {k: v[idx].sum(-1) for k, v in c.items() if k != "ap"}
            acc = tot["correct"] / tot["pixels"]
            iou_fg = tot["inter_fg"] / tot["union_fg"]
            iou_bg = tot["inter_bg"] / tot["union_bg"]
            return acc, iou_fg, iou_bg, (iou_fg + iou_bg) / 2, np.nanmean(c["ap"][idx], -1)

        acc, iou_fg, iou_bg, miou, m_ap = stats(np.arange(len(g)))
        row = [100 * acc, 100 * iou_fg, 100 * iou_bg, 100 * miou, 100 * m_ap,
               int(np.isfinite(c["ap"]).sum())]
        if n_boot:
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, len(g), size=(n_boot, len(g)))
            with np.errstate(invalid="ignore"):
                b_acc, _, _, b_miou, b_map = stats(idx)
            for v in (b_acc, b_miou, b_map):
                row += list(100 * np.nanquantile(v, [q, 1 - q]))
        rows.append(row)
        keys.append(key)
    cols = ["acc", "iou_fg", "iou_bg", "miou", "map", "n"]
    if n_boot:
        cols += [f"{m}_{b}" for m in ("acc", "miou", "map") for b in ("low", "high")]
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(keys, names=["method", "weighting"]),
                        columns=cols)


# ----------------------------------------------------------------------------------------------
# summaries
#: The paper's table (FLUX.1-schnell on ImageNet-segmentation), :cite:`erel2025attention`.
PAPER = pd.DataFrame(
    [["row select", 73.96, 54.65, 82.64], ["column select", 80.55, 64.02, 87.20],
     ["ConceptAttention (quoted)", 83.07, 71.04, 90.45],
     ["multi-bounce, uniform heads", 84.00, 70.02, 94.28],
     ["multi-bounce, λ2-weighted heads", 84.12, 70.20, 94.29]],
    columns=["method", "acc", "miou", "map"]).set_index("method")


def summarise(table: pd.DataFrame, methods: Optional[Sequence[str]] = None, n_boot: int = 0,
              seed: int = 0) -> pd.DataFrame:
    """Pooled accuracy, IoU and mAP per method and weighting (:func:`pooled_scores`, with
    bootstrap intervals over concepts when ``n_boot > 0``), and ``miou_ca``, ConceptAttention's
    published "mIoU" (Notes).

    Notes
    -----
    ConceptAttention's evaluation stacks ``(1 - mask, mask)`` and pools the histogram IoU of
    both channels; every pixel then counts once as foreground and once as background in both
    classes, and its "mIoU" equals :math:`a / (2 - a)` for the pooled accuracy :math:`a`
    (83.07 -> 71.04, its published pair). ``miou`` is the mean of the foreground and
    background IoUs.
    """
    t = table[table.object > 0] if "object" in table else table
    if methods is not None:
        t = t[t.method.isin(list(methods))]
    out = pooled_scores(t, n_boot=n_boot, seed=seed)
    out.insert(4, "miou_ca", 100 * out["acc"] / (200 - out["acc"]))
    return out


def versus(table: pd.DataFrame, pairs: Sequence[tuple], metrics_: Sequence[str] = ("ap", "iou"),
           n_boot: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Paired differences between (method, weighting) pairs per item and concept, with bootstrap
    intervals (:func:`attnchain.metrics.paired_bootstrap_ci`), in percent.

    Parameters
    ----------
    pairs : sequence of ((method_a, weighting_a), (method_b, weighting_b))
    metrics_ : per-concept metrics compared (``"ap"``, ``"iou"``, ``"acc"``)
    """
    from .. import metrics as M

    t = table[table.object > 0] if "object" in table else table
    rows, index = [], []
    for (ma, wa), (mb, wb) in pairs:
        for metric in metrics_:
            def values(m, w):
                s = t[(t.method == m) & (t.weighting == w)]
                if metric == "acc":
                    p = s.pivot_table(index=["item", "object"], columns="metric", values="value")
                    return p["correct"] / p["pixels"]
                return s[s.metric == metric].set_index(["item", "object"])["value"]
            a, b = values(ma, wa), values(mb, wb)
            both = pd.concat([a, b], axis=1, keys=["a", "b"]).dropna()
            if both.empty:
                continue
            d, lo, hi = M.paired_bootstrap_ci(both["a"], both["b"], n_boot=n_boot, seed=seed)
            index.append((f"{ma} [{wa}]", f"{mb} [{wb}]", metric))
            rows.append([len(both), 100 * both["a"].mean(), 100 * both["b"].mean(), 100 * d,
                         100 * lo, 100 * hi])
    return pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["a", "b", "metric"]),
                        columns=["n", "mean_a", "mean_b", "diff", "low", "high"])


def bounce_table(table: pd.DataFrame, metric: str = "map") -> pd.DataFrame:
    """One pooled metric of every multi-bounce map: rows ``n``, columns (direction, weighting).

    Examples
    --------
    >>> import pandas as pd
    >>> from attnchain.tasks.concept_chains import WEIGHTINGS
    >>> rows = [(0, 1, f"bounce_{d}_{n}", w, k, v) for d in ("sink", "source") for n in (1, 2)
    ...         for w in WEIGHTINGS for k, v in dict(pixels=4, correct=3, inter_fg=1,
    ...         union_fg=2, inter_bg=2, union_bg=3, ap=0.5 + 0.1 * n).items()]
    >>> t = pd.DataFrame(rows, columns=["item", "object", "method", "weighting", "metric",
    ...                                 "value"])
    >>> bounce_table(t).round(1).loc[2].tolist()
    [70.0, 70.0, 70.0, 70.0]
    """
    s = summarise(table)
    out = {}
    for (method, w), row in s.iterrows():
        if method.startswith("bounce_"):
            _, direction, n = method.split("_")
            out.setdefault((direction, w), {})[int(n)] = row[metric]
    df = pd.DataFrame(out).sort_index()
    df.index.name = "n"
    df.columns.names = ["direction", "weighting"]
    return df


def paper_comparison(table: pd.DataFrame, n: Optional[int] = None,
                     direction: Optional[str] = None) -> pd.DataFrame:
    """Our pooled numbers beside the paper's table, row by row.

    The paper's multi-bounce rows are matched with our multi-bounce map of the ``direction``
    and ``n`` (default: the pair with the best uniform-heads mAP; the method column names it);
    row select and column select are the uniform head mean (the paper's baselines).

    Returns
    -------
    pandas.DataFrame
        Index: the paper's rows (ConceptAttention's row is quoted, not recomputed); columns
        ``ours`` (the method used), ``acc``, ``miou``, ``map``, ``miou_ca`` and the paper's
        ``paper_acc``, ``paper_miou``, ``paper_map``.
    """
    s = summarise(table)
    if n is None or direction is None:
        bounces = [(m, s.loc[(m, "uniform"), "map"]) for m, w in s.index
                   if m.startswith("bounce_") and w == "uniform"
                   and (direction is None or m.split("_")[1] == direction)
                   and (n is None or int(m.split("_")[2]) == n)]
        best = max(bounces, key=lambda t: t[1])[0]
    else:
        best = f"bounce_{direction}_{n}"
    pick = {"row select": ("row_select", "uniform"), "column select": ("column_select", "uniform"),
            "multi-bounce, uniform heads": (best, "uniform"),
            "multi-bounce, λ2-weighted heads": (best, "lambda2")}
    rows = []
    for name in PAPER.index:
        paper = PAPER.loc[name]
        if name in pick:
            m, w = pick[name]
            r = s.loc[(m, w)]
            ours = [f"{m} [{w}]", r["acc"], r["miou"], r["map"], r["miou_ca"]]
        else:
            ours = ["(not recomputed)", np.nan, np.nan, np.nan, np.nan]
        rows.append(ours + [paper["acc"], paper["miou"], paper["map"]])
    return pd.DataFrame(rows, index=PAPER.index,
                        columns=["ours", "acc", "miou", "map", "miou_ca", "paper_acc",
                                 "paper_miou", "paper_map"])
