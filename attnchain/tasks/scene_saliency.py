r"""Scene saliency (chapter 7): zero-shot foreground maps from attention chains, scored on scenes.

From the captured attention of one layer, ``(B, H, N, N)``, and its token layout this task builds
one patch-level saliency map per method with the read-outs of :mod:`attnchain.tasks.readouts`,
upsamples it to pixels and scores it against the ground-truth foreground of
:mod:`attnchain.data.scenes`, on the task runner (:class:`attnchain.tasks.Runner`).

Methods (each computed from the head mean ``M`` of the layer, :func:`attnchain.head_mean` with
``weighting`` ``"uniform"`` or ``"lambda2"``):

``row_cls``
    Row select of the CLS token, ``M[cls, image]`` (only for models with a CLS token).
``column_sum``
    ``sum_i M[i, image]``: how much attention each patch receives from all queries.
``bounce_n`` (``n = 1 .. max_bounces``)
    Multi-bounce, :math:`v_n = v_0 M^n` (sink direction), read on the image tokens. Start:
    :math:`e_{\mathrm{cls}}` where there is a CLS token (then ``bounce_1 = row_cls``); otherwise
    the uniform distribution over all tokens, so that ``bounce_1`` is the column sum divided by
    ``N`` (same ranking as ``column_sum``) and ``bounce_n`` is ``n - 1`` further steps from it.
``tokenrank``
    The stationary distribution of the damped chain (:func:`attnchain.token_rank`,
    :math:`\alpha = 0.99`).
``metastable``
    Spectral clustering of the chain (:func:`attnchain.metastable_states`); the *background
    state* is the state holding most of the border patches of the grid, and the map is 1 on
    patches of every other state. Its per-object score ``obj_iou`` is the IoU of the
    best-matching state with each object, averaged over objects
    (:func:`attnchain.metrics.object_iou`). The number of states is fixed (``k_states = 4`` by
    default: at most three objects plus background), not read from the masks.

References (weighting ``"-"``): ``colour_contrast`` and ``centre_prior``
(:mod:`attnchain.data.scenes`) and ``gt_grid``, the ground truth averaged on the patch grid and
upsampled again (the best a patch-level map can do, up to the upsampling).

Metrics per scene (:func:`attnchain.metrics.foreground_scores`): ``ap`` (average precision of the
pixel map against the foreground), ``iou_otsu`` (foreground IoU of the map thresholded at its Otsu
threshold; binary maps at 0.5) and ``iou_best`` (IoU at the best threshold of that map: an oracle).
Also ``metastable/<w>/obj_iou`` and ``n_states``, ``gt_grid/-/obj_iou`` (the patch-grid ceiling),
``retention/<w>/{retention, kernel_retention, distance, sigma}``
(:func:`attnchain.tasks.locality.retention`), ``h<k>/-/lambda2`` (:math:`|\lambda_2|` of head
``k``) and ``scene/-/n_objects``.
"""
from __future__ import annotations

from typing import Optional

import pandas as pd
import torch
import torch.nn.functional as F

import attnchain as ac

from .. import metrics
from ..data import scenes as scenes_mod
from ..spectral import HEAD_WEIGHTINGS
from . import locality, readouts
from ._runner import Runner

__all__ = ["TASK", "VERSION", "METHODS", "saliency_maps", "evaluate", "load_model", "summarise"]

#: The task's name (results files) and its version: bump it when a change alters its numbers.
TASK = "scene_saliency"
VERSION = 2
#: The methods of the module docstring, in table order.
METHODS = ("row_cls", "column_sum", "bounce_{n}", "tokenrank", "metastable", "colour_contrast",
           "centre_prior", "gt_grid")


def _grid_of(layout):
    grid = layout.grid
    if grid is None:
        raise ValueError(f"layout {layout.kind!r} has no image grid")
    return tuple(grid)


def _background_state(labels_img: torch.Tensor, grid) -> torch.Tensor:
    """Per scene, the state holding most border patches. ``labels_img`` (B, R*C)."""
    r, c = grid
    border = torch.ones(r, c, dtype=torch.bool, device=labels_img.device)
    border[1:-1, 1:-1] = False
    lab = labels_img[:, border.flatten()]
    k = int(labels_img.max()) + 1
    counts = F.one_hot(lab, k).sum(1)  # (B, k)
    return counts.argmax(-1)


def saliency_maps(A: torch.Tensor, layout, max_bounces: int = 10, weightings=HEAD_WEIGHTINGS,
                  k_states: Optional[int] = 4, lam2: Optional[torch.Tensor] = None):
    """Patch-level saliency maps of every method.

    Parameters
    ----------
    A : Tensor, shape (B, H, N, N)
        Captured row-stochastic attention of one layer (any device).
    layout : attnchain.capture.recorder.TokenLayout
        Its token layout (``cls``, ``image`` positions and the ``grid``).
    max_bounces : int
        Largest number of bounces.
    weightings : sequence of {"uniform", "lambda2"}
        Head weightings to use.
    k_states : int or None
        Number of metastable states. Default 4 = ``MAX_OBJECTS + 1`` (at most three objects and
        the background), the same for every scene and every model, chosen without looking at
        any mask. None: chosen per scene from the largest spectral gap
        (:func:`attnchain.metastable_states`), which on these mixed-head chains often picks a
        single state.
    lam2 : Tensor (B, H), optional
        Precomputed :func:`attnchain.lambda2` of every head (see :func:`attnchain.head_mean`).

    Returns
    -------
    maps : dict
        ``{f"{method}/{weighting}": Tensor (B, rows, cols)}`` for the methods of the module
        docstring (``metastable`` is 0/1), on ``A``'s device.
    states : dict
        ``{weighting: LongTensor (B, rows, cols)}`` metastable state of each patch.

    Raises
    ------
    ValueError
        ``A`` not of shape ``(B, H, N, N)`` with the layout's ``N``, a layout without a grid.

    Examples
    --------
    >>> import torch
    >>> from attnchain.capture.recorder import TokenLayout
    >>> layout = TokenLayout(n=5, cls=(0,), image=(1, 2, 3, 4), grid=(2, 2))
    >>> A = torch.softmax(torch.randn(1, 2, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
    >>> maps, states = saliency_maps(A, layout, max_bounces=2, k_states=2)
    >>> sorted(k for k in maps if k.endswith("/uniform"))
    ['bounce_1/uniform', 'bounce_2/uniform', 'column_sum/uniform', 'metastable/uniform', 'row_cls/uniform', 'tokenrank/uniform']
    >>> torch.equal(maps["row_cls/uniform"], maps["bounce_1/uniform"])
    True

    See Also
    --------
    evaluate, attnchain.tasks.readouts
    """
    if A.ndim != 4 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"attention must have shape (B, H, N, N), got {tuple(A.shape)}")
    if A.shape[-1] != layout.n:
        raise ValueError(f"attention has N = {A.shape[-1]} tokens but the layout has {layout.n}")
    grid = _grid_of(layout)
    img = list(layout.image)
    B = A.shape[0]
    maps, states = {}, {}
    for w in weightings:
        M = ac.to_stochastic(ac.head_mean(A, w, lam2=lam2), kind="weights")
        N = M.shape[-1]
        if layout.cls:
            start = int(layout.cls[0])
            maps[f"row_cls/{w}"] = readouts.row_select(M, start, img)
        else:
            start = torch.full((N,), 1.0 / N, device=M.device)
        maps[f"column_sum/{w}"] = readouts.column_sum(M, img)
        v = readouts.bounce_maps(M, start, max_bounces, targets=img)  # (B, max_bounces + 1, n)
        for n in range(1, max_bounces + 1):
            maps[f"bounce_{n}/{w}"] = v[:, n]
        maps[f"tokenrank/{w}"] = readouts.token_rank_map(M, img)
        lab = readouts.metastable_map(M, img, k=k_states)
        bg = _background_state(lab, grid)
        maps[f"metastable/{w}"] = (lab != bg[:, None]).float()
        states[w] = lab.reshape(B, *grid)
    maps = {k: m.reshape(B, *grid).float() for k, m in maps.items()}
    return maps, states


def _batch_rows(model, preprocess, sc, items, layer, max_bounces: int, mode: str) -> list:
    """Rows ``(item, layer, method, weighting, metric, value)`` for one batch of scenes."""
    with torch.no_grad(), ac.capture(model, layers=[layer]) as rec:
        model(preprocess(sc.images))
    name = list(rec.attentions)[-1]
    A = rec.attentions[name].float()
    # softmax underflow leaves subnormal floats (down to 1e-45), which can make LAPACK's
    # eigenvalue routines orders of magnitude slower; entries below 1e-30 are set to 0 (a change
    # far below float32 resolution of the row sums).
    A = torch.where(A < 1e-30, torch.zeros_like(A), A)
    layout = rec.tokens[name]
    grid = _grid_of(layout)
    H_img, W_img = sc.masks.shape[-2:]
    masks = sc.masks.to(A.device)
    fg = masks > 0
    l2 = ac.lambda2(A)  # (B, H), computed once for the weights and the report
    maps, states = saliency_maps(A, layout, max_bounces=max_bounces, lam2=l2)
    maps["colour_contrast/-"] = scenes_mod.colour_contrast(sc.images.to(A.device))
    maps["centre_prior/-"] = scenes_mod.centre_prior(len(sc), size=H_img).to(A.device)
    maps["gt_grid/-"] = scenes_mod.patch_foreground(masks, grid=grid)
    out = []

    def add(method, weighting, metric, values):
        out.extend((i, name, method, weighting, metric, float(v)) for i, v in zip(items, values))

    for key, m in maps.items():
        method, w = key.split("/")
        binary = method == "metastable"
        pix = m if m.shape[-2:] == (H_img, W_img) else readouts.upsample(m, (H_img, W_img), mode)
        if binary:
            pix = readouts.upsample(m, (H_img, W_img), "nearest")
        for metric, vals in metrics.foreground_scores(pix, fg, binary=binary).items():
            add(method, w, metric, vals)
    objects = scenes_mod.patch_objects(masks, grid=grid)
    img = list(layout.image)
    for w in HEAD_WEIGHTINGS:
        add("metastable", w, "obj_iou", metrics.object_iou(states[w], masks))
        add("metastable", w, "n_states", [s.unique().numel() for s in states[w]])
        ret = locality.retention(ac.restrict(ac.head_mean(A, w, lam2=l2), img), objects, grid)
        for metric, vals in ret.items():
            add("retention", w, metric, vals)
    add("gt_grid", "-", "obj_iou", metrics.object_iou(objects, masks))
    add("scene", "-", "n_objects", sc.n_objects.tolist())
    for h, vals in enumerate(l2.detach().cpu().T):
        add(f"h{h}", "-", "lambda2", vals.tolist())
    return out


def evaluate(model_name: str, level: str, n: int = scenes_mod.BENCHMARK_SIZE,
             results_dir=None, batch_size: int = 100, layer: int = -1, max_bounces: int = 10,
             mode: str = "bilinear", model=None, progress: bool = True,
             shard: Optional[tuple] = None) -> pd.DataFrame:
    """Evaluate every method on the first ``n`` held-out scenes of ``level``, resumably.

    Parameters
    ----------
    model_name : str
        A name for :func:`attnchain.zoo.load` (also part of the results key).
    level : {"easy", "medium", "hard"}
        Difficulty level of :func:`attnchain.data.scenes.benchmark`.
    n : int
        Number of scenes (default the whole split, 500).
    results_dir : str or Path, optional
        Folder of the results file (see :class:`attnchain.tasks.Runner`): each finished batch
        is written as it goes, so an interrupted run resumes where it stopped. None: nothing is
        stored.
    batch_size : int
        Scenes per forward pass.
    layer : int
        Which attention layer (index into the captured layers; default the last).
    max_bounces : int
        Largest number of bounces.
    mode : {"bilinear", "nearest"}
        Upsampling of patch maps to pixels (metastable masks always use nearest).
    model : (model, preprocess), optional
        Already loaded model; default ``attnchain.zoo.load(model_name)`` (for full-profile timm
        checkpoints with :func:`attnchain.tasks.preprocess.whole_image_preprocess`, so the
        64 x 64 scenes are upsampled whole to the model's input size and the patch grid lines up
        with the masks).
    progress : bool
        Show a tqdm bar over scenes.
    shard : (int, int), optional
        Evaluate one shard of the scenes only (see :meth:`attnchain.tasks.Runner.run`);
        default: this process's share under ``accelerate``.

    Returns
    -------
    pandas.DataFrame
        The long table: columns ``model, level, item`` (the scene index), ``layer`` (the captured
        layer's name), ``method, weighting, metric, value`` (see the module docstring).

    Raises
    ------
    ValueError
        An unknown level, a bad ``n`` or ``batch_size``.

    Examples
    --------
    >>> t = evaluate("feature-attention", "easy", n=2, batch_size=2, progress=False)
    >>> list(t.columns)
    ['model', 'level', 'item', 'layer', 'method', 'weighting', 'metric', 'value']
    >>> bool(summarise(t, "ap").loc["gt_grid", "-"] > summarise(t, "ap").loc["centre_prior", "-"])
    True

    See Also
    --------
    saliency_maps, summarise, attnchain.tasks.Runner
    """
    if level not in scenes_mod.LEVELS:
        raise ValueError(f"level must be one of {scenes_mod.LEVELS}, got {level!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    settings = dict(model=model_name, level=level, layer=layer, max_bounces=max_bounces,
                    mode=mode)
    runner = Runner(TASK, VERSION, settings, results_dir, labels=("model", "level"),
                    columns=("layer",))
    state = {}

    def compute(items):
        if not state:  # first batch to compute: load the model and the scenes
            net, pre = load_model(model_name) if model is None else model
            state.update(net=runner.place(net), pre=pre, scenes=scenes_mod.benchmark(level, n=n))
        idx = torch.tensor(items)
        sc = state["scenes"]
        sub = scenes_mod.Scenes(images=sc.images[idx], masks=sc.masks[idx], labels=sc.labels[idx],
                                n_objects=sc.n_objects[idx],
                                levels=tuple(sc.levels[i] for i in items), seed=sc.seed)
        return _batch_rows(state["net"], state["pre"], sub, items, layer, max_bounces, mode)

    return runner.run(range(n), compute, batch_size=batch_size, progress=progress, shard=shard,
                      desc=f"{model_name}/{level}")


def load_model(model_name: str):
    """A model of :func:`attnchain.zoo.load` with the preprocess this task uses.

    Full-profile timm checkpoints get :func:`attnchain.tasks.preprocess.whole_image_preprocess`
    (the whole scene resized to the model's input, so the patch grid lines up with the masks);
    every other model keeps its own preprocess.

    Parameters
    ----------
    model_name : str
        A name of :func:`attnchain.zoo.available`.

    Returns
    -------
    (model, preprocess)

    Examples
    --------
    >>> net, pre = load_model("feature-attention")
    >>> net.head_names[:2]
    ('colour', 'texture')

    See Also
    --------
    evaluate, attnchain.zoo.load
    """
    from .preprocess import whole_image_preprocess

    net, pre = ac.zoo.load(model_name)
    if ac.zoo.describe(model_name).profile == "full" and hasattr(net, "patch_embed"):
        pre = whole_image_preprocess(net)
    return net, pre


def summarise(table: pd.DataFrame, metric: str = "ap") -> pd.DataFrame:
    """Mean of ``metric`` per method and weighting: rows ``method`` (table order), columns ``weighting``.

    Parameters
    ----------
    table : pandas.DataFrame
        A table of :func:`evaluate` (one model and level, or several: the mean is over all).
    metric : str
        E.g. ``"ap"``, ``"iou_otsu"``, ``"obj_iou"``.

    Returns
    -------
    pandas.DataFrame
        Means over scenes; NaN where a method has no such weighting.

    Raises
    ------
    ValueError
        No row has that metric.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"item": [0, 1, 0, 1], "method": ["tokenrank"] * 2 + ["gt_grid"] * 2,
    ...                   "weighting": ["uniform"] * 2 + ["-"] * 2, "metric": "ap",
    ...                   "value": [0.5, 0.7, 0.9, 1.0]})
    >>> summarise(t).round(2)  # doctest: +NORMALIZE_WHITESPACE
    weighting     -  uniform
    method
    tokenrank   NaN      0.6
    gt_grid    0.95      NaN

    See Also
    --------
    attnchain.tasks.summarise : the same means with bootstrap intervals.
    """
    sel = table[table["metric"] == metric]
    if sel.empty:
        raise ValueError(f"no row has metric {metric!r}")
    means = {key: pd.Series(g["value"].to_numpy()).mean()
             for key, g in sel.groupby(["method", "weighting"], sort=False)}
    out = pd.Series(means).unstack()
    out.index.name, out.columns.name = "method", "weighting"
    order = [m for m in ["row_cls", "column_sum"] + [f"bounce_{k}" for k in range(1, 100)]
             + ["tokenrank", "metastable", "colour_contrast", "centre_prior", "gt_grid"]
             if m in out.index]
    return out.loc[order]
