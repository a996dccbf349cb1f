r"""Same-object AUC: does a walk that starts inside an object stay on that object?

The protocol of chapters 3 and 5. For every object of every scene, start a multi-bounce walk at
the patch most inside the object (the largest fraction of object pixels,
:func:`attnchain.data.scenes.mask_to_grid`) and score the map after :math:`n` bounces,
:math:`v_n = e_{\text{start}} P^n`, against the object's patches (more than half of their pixels
inside) with the ROC AUC (:func:`attnchain.metrics.auc`). 1 means the walk ranks every patch of
its object above every other patch; 0.5 is chance.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
from torch import Tensor

from .. import metrics
from ..data import scenes
from ..spectral import choose_bounces
from . import readouts

__all__ = ["same_object_auc", "rule_bounce_auc", "rule_summary"]


def same_object_auc(chains: Tensor, masks: Tensor, grid, bounces: Sequence[int] = (1, 2),
                    direction: str = "sink") -> pd.DataFrame:
    r"""Same-object AUC of multi-bounce maps from the patch most inside each object.

    Parameters
    ----------
    chains : Tensor, shape (B, n, n)
        One row-stochastic chain per scene on its ``n = rows * cols`` image patches (e.g.
        :func:`attnchain.restrict` of the attention to the patch tokens), any device.
    masks : LongTensor, shape (B, H, W)
        Instance ids of the scenes, 0 = background.
    grid : (int, int)
        The patch grid ``(rows, cols)``.
    bounces : sequence of int
        The numbers of bounces :math:`n \ge 1` to score.
    direction : {"sink", "source"}
        Direction of the walk (:func:`attnchain.tasks.readouts.bounce_maps`).

    Returns
    -------
    pandas.DataFrame
        Columns ``scene, object, start, n, AUC``, one row per scored object and ``n``, ordered by
        object, scene and ``n``. Objects that cover no patch, or every patch, are left out.

    Raises
    ------
    ValueError
        Chains and masks of different batch sizes, or chains that do not fit the grid.

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> masks[0, :, :2] = 1                                  # object 1: the left column of patches
    >>> lab = torch.tensor([1, 0, 1, 0])                     # patch labels on the 2 x 2 grid
    >>> P = (lab[:, None] == lab[None, :]).float()
    >>> P = (P / P.sum(-1, keepdim=True))[None]              # a walk that never leaves its side
    >>> same_object_auc(P, masks, (2, 2), bounces=[1, 2])
       scene  object  start  n  AUC
    0      0       1      0  1  1.0
    1      0       1      0  2  1.0

    See Also
    --------
    attnchain.tasks.readouts.bounce_maps, attnchain.metrics.auc
    """
    if chains.ndim != 3 or chains.shape[0] != masks.shape[0]:
        raise ValueError(f"chains must have shape (B, n, n) with B = {masks.shape[0]} scenes, got "
                         f"{tuple(chains.shape)}")
    if chains.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"chains have n = {chains.shape[-1]} tokens but the grid {tuple(grid)} "
                         f"has {grid[0] * grid[1]} patches")
    bounces = [int(n) for n in bounces]
    if not bounces or min(bounces) < 1:
        raise ValueError(f"bounces must be numbers n >= 1, got {bounces}")
    rows = []
    for obj in range(1, int(masks.max()) + 1):
        frac = scenes.mask_to_grid(masks == obj, grid).flatten(1)  # (B, n)
        starts = frac.argmax(-1)
        vv = readouts.bounce_maps(chains, starts, max(bounces), direction=direction)
        vv = vv.detach().cpu()  # (B, max + 1, n), scored by metrics on the CPU
        for i in range(chains.shape[0]):
            target = frac[i] > 0.5
            if target.sum() == 0 or target.all():
                continue
            for n in bounces:
                rows.append(dict(scene=i, object=obj, start=int(starts[i]), n=n,
                                 AUC=metrics.auc(vv[i, n], target)))
    return pd.DataFrame(rows, columns=["scene", "object", "start", "n", "AUC"])


def rule_bounce_auc(chains: Tensor, masks: Tensor, grid, max_bounces: int = 10,
                    eps: float = 0.1) -> pd.DataFrame:
    r"""Same-object AUC at every fixed :math:`n` and at the rule's :math:`n^\star` per scene.

    The test of chapter 3's rule for the number of bounces: :func:`same_object_auc` for
    :math:`n = 1, \dots,` ``max_bounces``, and, for each scene, the rows of
    :math:`n^\star` = :func:`attnchain.choose_bounces` of its chain (the bounces after which the
    modes inside its metastable states have decayed to ``eps``) repeated with ``n = "rule n*"``.

    Parameters
    ----------
    chains, masks, grid
        As in :func:`same_object_auc`.
    max_bounces : int
        The largest fixed :math:`n`, and the cap of the rule.
    eps : float
        The rule's threshold (:func:`attnchain.choose_bounces`).

    Returns
    -------
    pandas.DataFrame
        Columns ``scene, object, start, n, AUC, n_rule``: ``n`` is ``"1"`` to
        ``str(max_bounces)`` for the fixed numbers and ``"rule n*"`` for the rule's rows, whose
        ``n_rule`` holds the scene's :math:`n^\star` (NaN on the fixed rows).

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> masks[0, :, :2] = 1
    >>> lab = torch.tensor([1, 0, 1, 0])
    >>> P = 0.9 * (lab[:, None] == lab[None, :]).float() / 2 + 0.1 / 4  # two leaky states
    >>> res = rule_bounce_auc(P[None], masks, (2, 2), max_bounces=3)
    >>> res[["n", "AUC", "n_rule"]]
             n  AUC  n_rule
    0        1  1.0     NaN
    1        2  1.0     NaN
    2        3  1.0     NaN
    3  rule n*  1.0     1.0

    See Also
    --------
    same_object_auc, attnchain.choose_bounces
    """
    res = same_object_auc(chains, masks, grid, bounces=range(1, max_bounces + 1))
    n_rule = choose_bounces(chains, eps=eps, max_bounces=max_bounces).cpu().numpy()  # (B,)
    at_rule = res[res.n == n_rule[res.scene]].assign(n_rule=lambda d: d.n, n="rule n*")
    fixed = res.assign(n=res.n.astype(str), n_rule=float("nan"))
    return pd.concat([fixed, at_rule.astype({"n_rule": float})], ignore_index=True)


def rule_summary(res: pd.DataFrame, max_bounces: int, by: str = "layer") -> dict:
    r"""Chapter 3's summary of a :func:`rule_bounce_auc` table with a column ``by`` (layers).

    Returns
    -------
    dict
        ``table``: mean AUC per ``by`` group (rows, in order of appearance) and ``n`` (columns
        ``"1"`` .. ``str(max_bounces)``, ``"rule n*"``); ``mean``: mean AUC per ``n`` over all
        rows (same order); ``best_n`` and ``best``: the fixed ``n`` of the highest mean and that
        mean; ``rule``: the rule's mean; ``oracle``: the mean over groups of each group's best
        fixed ``n``; ``rule_counts``: how often the rule chose each :math:`n^\star`, counted
        once per group and scene.

    Examples
    --------
    >>> res = pd.DataFrame({"layer": ["a"] * 3 + ["b"] * 3, "scene": 0, "object": 1,
    ...                     "n": ["1", "2", "rule n*"] * 2, "AUC": [.6, .8, .8, .9, .75, .9],
    ...                     "n_rule": [None, None, 2, None, None, 1]})
    >>> s = rule_summary(res, 2)
    >>> s["best_n"], round(s["oracle"], 2), s["rule_counts"]
    ('2', 0.85, {1: 1, 2: 1})
    """
    order = [str(n) for n in range(1, max_bounces + 1)] + ["rule n*"]
    groups = list(dict.fromkeys(res[by]))
    table = res.pivot_table(index=by, columns="n", values="AUC", aggfunc="mean").loc[groups, order]
    mean = res.groupby("n")["AUC"].mean().reindex(order)
    fixed = mean.iloc[:max_bounces]
    chosen = res.dropna(subset=["n_rule"]).drop_duplicates([by, "scene"]).n_rule.astype(int)
    return dict(table=table, mean=mean, best_n=fixed.idxmax(), best=float(fixed.max()),
                rule=float(mean["rule n*"]), oracle=float(table[order[:-1]].max(axis=1).mean()),
                rule_counts={int(k): int(v) for k, v in chosen.value_counts().sort_index().items()})
