r"""Zero-shot foreground segmentation from attention chains, scored against known answers.

From the captured attention of one layer, ``(B, H, N, N)``, and its token layout this module builds
one patch-level saliency map per method, upsamples it to pixels, and scores it against the
ground-truth foreground of :mod:`attnchain.data.scenes`. All chain mathematics is delegated to
:mod:`attnchain.chain` and :mod:`attnchain.spectral`.

Methods (each computed from the head mean ``M`` of the layer, with ``uniform`` or ``lambda2``
head weighting, :func:`attnchain.spectral.weighted_head_mean`):

``row_cls``
    Row select of the CLS token, ``M[cls, image]`` (only for models with a CLS token).
``column_sum``
    ``sum_i M[i, image]``: how much attention each patch receives from all queries.
``bounce_n`` (``n = 1 .. n_max``)
    Multi-bounce, :math:`v_n = v_0 M^n` (:func:`attnchain.chain.bounce`, sink direction), read on
    the image tokens. Start: :math:`e_{\mathrm{cls}}` where there is a CLS token (then
    ``bounce_1 = row_cls``); otherwise the uniform distribution over all tokens, so that
    ``bounce_1`` is the column sum divided by ``N`` (same ranking as ``column_sum``) and
    ``bounce_n`` is ``n - 1`` further steps from it.
``tokenrank``
    The stationary distribution of the damped chain (:func:`attnchain.chain.token_rank`,
    :math:`\alpha = 0.99`).
``metastable``
    Spectral clustering of the chain (:func:`attnchain.spectral.metastable_states`); the
    *background state* is the state holding most of the border patches of the grid, and the map is
    1 on patches of every other state. Its per-object score ``obj_iou`` is the IoU of the
    best-matching state with each object, averaged over objects. The number of states is fixed
    (``k_states = 4`` by default: at most three objects plus background), not read from the masks.

References: ``colour_contrast`` and ``centre_prior`` (:mod:`attnchain.data.scenes`) and
``gt_grid``, the ground truth averaged on the patch grid and upsampled again (the best a
patch-level map can do, up to the upsampling).

Scores per scene: ``ap`` (average precision of the pixel map against the foreground,
:func:`attnchain.metrics.ranking_metrics`), ``iou_otsu`` (foreground IoU of the map thresholded
at its Otsu threshold, :func:`attnchain.metrics.otsu_threshold`; binary maps are thresholded at 0.5)
and ``iou_best`` (IoU at the best threshold of that map: an oracle, an upper bound for any
thresholding rule).
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import chain, metrics, spectral
from ..data import scenes as scenes_mod

__all__ = [
    "WEIGHTINGS",
    "head_mean",
    "saliency_maps",
    "upsample",
    "score_maps",
    "object_iou",
    "patch_objects",
    "retention",
    "kernel_mean_distance",
    "whole_image_preprocess",
    "evaluate",
    "summarise",
]

WEIGHTINGS = ("uniform", "lambda2")
_VERSION = 1


def head_mean(A: torch.Tensor, weighting: str, lam2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Head average ``(B, H, N, N) -> (B, N, N)``: plain mean or λ2-weighted mean.

    ``lam2`` (``(B, H)``, from :func:`attnchain.spectral.lambda2`) may be passed to avoid computing
    the eigenvalues again; the weights are then ``lam2 / lam2.sum(1)`` exactly as in
    :func:`attnchain.spectral.head_weights` (uniform where every head has ``|λ2| = 0``).
    """
    if A.ndim != 4:
        raise ValueError(f"attention must have shape (B, H, N, N), got {tuple(A.shape)}")
    if weighting == "uniform":
        return A.float().mean(1)
    if weighting == "lambda2":
        if lam2 is None:
            return spectral.weighted_head_mean(A.float(), head_dim=1)
        s = lam2.sum(1, keepdim=True)
        w = torch.where(s > 0, lam2 / torch.where(s > 0, s, torch.ones_like(s)),
                        torch.full_like(lam2, 1.0 / lam2.shape[1]))
        return (A.float() * w[:, :, None, None].float()).sum(1)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _grid_of(layout):
    grid = layout.grid
    if grid is None:
        raise ValueError(f"layout {layout.kind!r} has no image grid")
    return tuple(grid)


def _background_state(labels_img: torch.Tensor, grid) -> torch.Tensor:
    """Per scene, the state holding most border patches. ``labels_img`` (B, R*C)."""
    r, c = grid
    border = torch.ones(r, c, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    lab = labels_img[:, border.flatten()]
    k = int(labels_img.max()) + 1
    counts = F.one_hot(lab, k).sum(1)  # (B, k)
    return counts.argmax(-1)


def saliency_maps(A: torch.Tensor, layout, n_max: int = 10, weightings=WEIGHTINGS,
                  k_states: Optional[int] = 4, lam2: Optional[torch.Tensor] = None):
    """Patch-level saliency maps of every method.

    Parameters
    ----------
    A : Tensor, shape (B, H, N, N)
        Captured row-stochastic attention of one layer.
    layout : attnchain.capture.recorder.TokenLayout
        Its token layout (``cls``, ``image`` positions and the ``grid``).
    n_max : int
        Largest number of bounces.
    weightings : sequence of {"uniform", "lambda2"}
        Head weightings to use.
    k_states : int or None
        Number of metastable states. Default 4 = ``MAX_OBJECTS + 1`` (at most three objects and
        the background), the same for every scene and every model, chosen without looking at
        any mask. None: chosen per scene from the largest spectral gap
        (:func:`attnchain.spectral.metastable_states`), which on these mixed-head chains often
        picks a single state.
    lam2 : Tensor (B, H), optional
        Precomputed :func:`attnchain.spectral.lambda2` of every head (see :func:`head_mean`).

    Returns
    -------
    maps : dict
        ``{f"{method}/{weighting}": Tensor (B, rows, cols)}`` for the methods of the module
        docstring (``metastable`` is 0/1).
    states : dict
        ``{weighting: LongTensor (B, rows, cols)}`` metastable state of each patch.
    """
    if A.ndim != 4 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"attention must have shape (B, H, N, N), got {tuple(A.shape)}")
    if A.shape[-1] != layout.n:
        raise ValueError(f"attention has N = {A.shape[-1]} tokens but the layout has {layout.n}")
    grid = _grid_of(layout)
    img = torch.tensor(layout.image, dtype=torch.long)
    B = A.shape[0]
    maps, states = {}, {}
    for w in weightings:
        M = head_mean(A, w, lam2)
        M = M / M.sum(-1, keepdim=True)
        N = M.shape[-1]
        if layout.cls:
            start = int(layout.cls[0])
            maps[f"row_cls/{w}"] = M[:, start, img]
        else:
            start = torch.full((N,), 1.0 / N)
        maps[f"column_sum/{w}"] = M[:, :, img].sum(-2)
        v = chain.bounce(M, start, n_max)  # (B, n_max + 1, N)
        for n in range(1, n_max + 1):
            maps[f"bounce_{n}/{w}"] = v[:, n, img]
        maps[f"tokenrank/{w}"] = chain.token_rank(M)[:, img]
        lab = spectral.metastable_states(M, k=k_states)[:, img]
        bg = _background_state(lab, grid)
        maps[f"metastable/{w}"] = (lab != bg[:, None]).float()
        states[w] = lab.reshape(B, *grid)
    maps = {k: m.reshape(B, *grid).float() for k, m in maps.items()}
    return maps, states


def upsample(maps: torch.Tensor, size, mode: str = "bilinear") -> torch.Tensor:
    """Patch maps ``(B, r, c)`` to pixels ``(B, H, W)`` with :func:`torch.nn.functional.interpolate`.

    ``mode="nearest"`` repeats each patch value over its pixels; ``"bilinear"`` interpolates
    between patch centres (``align_corners=False``).
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    x = maps.float()[:, None]
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=tuple(size), mode=mode, **kw)[:, 0]


def score_maps(pixel_maps: torch.Tensor, foreground: torch.Tensor, binary: bool = False) -> dict:
    """Per-scene ``ap``, ``iou_best`` and ``iou_otsu`` of pixel maps ``(B, H, W)``.

    ``binary=True``: the map is already a mask; ``iou_otsu`` then thresholds it at 0.5.
    """
    s = pixel_maps.flatten(1)
    y = foreground.flatten(1).bool()
    ap, best = metrics.ranking_metrics(s, y)
    tau = torch.full((s.shape[0],), 0.5) if binary else metrics.otsu_threshold(s)
    pred = s > tau[:, None].to(s.dtype)
    inter = (pred & y).sum(-1).double()
    union = (pred | y).sum(-1).double()
    iou_o = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"ap": ap.numpy(), "iou_best": best.numpy(), "iou_otsu": iou_o.numpy()}


def object_iou(states: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    """Mean over objects of the IoU of the best-matching state with each object.

    Parameters
    ----------
    states : LongTensor, shape (B, r, c)
        Metastable state of each patch.
    masks : LongTensor, shape (B, H, W)
        Instance ids (0 background).

    Returns
    -------
    ndarray, shape (B,)
        :math:`\\frac{1}{K}\\sum_{o=1}^{K} \\max_s \\mathrm{IoU}(\\{p: s(p) = s\\}, o)`, states
        upsampled to pixels by nearest neighbour; NaN for scenes without objects.
    """
    H, W = masks.shape[-2:]
    st = F.interpolate(states[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    k = int(st.max()) + 1
    n_obj = int(masks.max())
    S = F.one_hot(st.flatten(1), k).double()  # (B, P, k)
    O = F.one_hot(masks.flatten(1), n_obj + 1)[..., 1:].double()  # (B, P, n_obj)
    inter = S.transpose(1, 2) @ O  # (B, k, n_obj)
    union = S.sum(1)[:, :, None] + O.sum(1)[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    best = iou.amax(1)  # (B, n_obj)
    present = O.sum(1) > 0
    cnt = present.sum(1)
    out = (best * present).sum(1) / cnt.clamp_min(1)
    out = torch.where(cnt > 0, out, torch.full_like(out, float("nan")))
    return out.numpy()


def patch_objects(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Object id of each patch ``(B, r, c)``: the instance covering more than half its pixels, else 0."""
    B, H, W = masks.shape
    k = int(masks.max()) + 1
    oh = F.one_hot(masks, k).float().permute(0, 3, 1, 2)  # (B, k, H, W)
    frac = F.avg_pool2d(oh, patch_size)  # (B, k, r, c)
    frac[:, 0] = 0.0
    val, idx = frac.max(1)
    return torch.where(val > 0.5, idx, torch.zeros_like(idx))


def _grid_distances(grid) -> torch.Tensor:
    r, c = grid
    yy, xx = torch.meshgrid(torch.arange(r, dtype=torch.float64), torch.arange(c, dtype=torch.float64),
                            indexing="ij")
    p = torch.stack([yy.flatten(), xx.flatten()], -1)
    return torch.cdist(p, p)


def _gaussian_kernel(grid, sigma: torch.Tensor) -> torch.Tensor:
    """Row-stochastic Gaussian kernels on the grid, one per sigma: ``(S, n, n)``."""
    d = _grid_distances(grid)
    K = torch.exp(-0.5 * d[None] ** 2 / sigma.double()[:, None, None] ** 2)
    return K / K.sum(-1, keepdim=True)


def kernel_mean_distance(grid, sigma) -> torch.Tensor:
    """Mean attention distance (patch units) of the Gaussian kernel chain, ``mean_i sum_j K_ij d_ij``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)
    K = _gaussian_kernel(grid, sigma)
    return (K * _grid_distances(grid)).sum(-1).mean(-1)


@functools.lru_cache(maxsize=8)
def _distance_table(grid):
    sig = torch.logspace(-2, 2, 2000, dtype=torch.float64)
    return sig, kernel_mean_distance(grid, sig)


def retention(M_img: torch.Tensor, objects: torch.Tensor, grid) -> dict:
    r"""In-object retention of an image-token chain and of its distance-matched Gaussian kernel.

    Parameters
    ----------
    M_img : Tensor, shape (B, n, n)
        Row-stochastic chain on the ``n = rows * cols`` image tokens.
    objects : LongTensor, shape (B, rows, cols)
        Object id of each patch (:func:`patch_objects`), 0 = background.
    grid : (int, int)

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
    """
    d = _grid_distances(grid)
    M = M_img.double()
    dist = (M * d).sum(-1).mean(-1)  # (B,)
    sig_grid, md = _distance_table(tuple(grid))  # md increasing in sigma
    pos = torch.searchsorted(md.contiguous(), dist.clamp(md[0], md[-1]).contiguous()).clamp(1, len(md) - 1)
    t = (dist - md[pos - 1]) / (md[pos] - md[pos - 1])
    sigma = torch.exp(torch.log(sig_grid[pos - 1]) + t.clamp(0, 1) * (torch.log(sig_grid[pos])
                                                                     - torch.log(sig_grid[pos - 1])))
    K = _gaussian_kernel(grid, sigma)
    obj = objects.flatten(1)
    same = (obj[:, :, None] == obj[:, None, :]) & (obj[:, :, None] > 0)
    inside = obj > 0
    cnt = inside.sum(-1).double()

    def keep(P):
        r = (P * same).sum(-1)
        return torch.where(cnt > 0, (r * inside).sum(-1) / cnt.clamp_min(1),
                           torch.full_like(cnt, float("nan")))

    return {"retention": keep(M).numpy(), "kernel_retention": keep(K).numpy(),
            "distance": dist.numpy(), "sigma": sigma.numpy()}


# ----------------------------------------------------------------------------------------------
# evaluation loop with a resumable cache


def _config_key(model_name, level, layer, n_max, mode) -> str:
    # the evaluation code itself is part of the key: any edit to this module starts a fresh cache
    code = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()
    s = json.dumps([_VERSION, code, model_name, level, layer, n_max, mode])
    return hashlib.sha1(s.encode()).hexdigest()[:10]


def _batch_results(model, preprocess, sc, first: int, layer, n_max: int, mode: str) -> list:
    """Per-scene result dicts for one batch of scenes."""
    from .. import capture  # late import: capture imports model adapters

    with torch.no_grad(), capture(model, layers=[layer]) as rec:
        model(preprocess(sc.images))
    name = list(rec.attentions)[-1]
    A = rec.attentions[name].float().cpu()
    # softmax underflow leaves subnormal floats (down to 1e-45), which can make LAPACK's
    # eigenvalue routines orders of magnitude slower; entries below 1e-30 are set to 0 (a change
    # far below float32 resolution of the row sums).
    A = torch.where(A < 1e-30, torch.zeros_like(A), A)
    layout = rec.tokens[name]
    grid = _grid_of(layout)
    H_img, W_img = sc.masks.shape[-2:]
    fg = sc.foreground
    l2 = spectral.lambda2(A)  # (B, H), computed once for the weights and the report
    maps, states = saliency_maps(A, layout, n_max=n_max, lam2=l2)
    maps["colour_contrast/-"] = scenes_mod.colour_contrast(sc.images)
    maps["centre_prior/-"] = scenes_mod.centre_prior(len(sc), size=H_img)
    patch = H_img // grid[0]
    maps["gt_grid/-"] = scenes_mod.patch_foreground(sc.masks, patch)
    rows = [dict() for _ in range(len(sc))]
    for key, m in maps.items():
        pix = m if m.shape[-2:] == (H_img, W_img) else upsample(m, (H_img, W_img), mode)
        if key.startswith("metastable"):
            pix = upsample(m, (H_img, W_img), "nearest")
        sc_ = score_maps(pix, fg, binary=key.startswith("metastable"))
        for metric, vals in sc_.items():
            for i, v in enumerate(vals):
                rows[i][f"{key}/{metric}"] = float(v)
    objects = patch_objects(sc.masks, patch)
    ceiling = object_iou(objects, sc.masks)
    img = torch.tensor(layout.image)
    for w in WEIGHTINGS:
        oi = object_iou(states[w], sc.masks)
        Mw = head_mean(A, w, l2)[:, img][:, :, img]
        Mw = Mw / Mw.sum(-1, keepdim=True)
        ret = retention(Mw, objects, grid)
        for i in range(len(sc)):
            rows[i][f"metastable/{w}/obj_iou"] = float(oi[i])
            rows[i][f"metastable/{w}/n_states"] = int(states[w][i].unique().numel())
            for k2, v in ret.items():
                rows[i][f"retention/{w}/{k2}"] = float(v[i])
    for i in range(len(sc)):
        rows[i]["scene"] = first + i
        rows[i]["gt_grid/-/obj_iou"] = float(ceiling[i])
        rows[i]["n_objects"] = int(sc.n_objects[i])
        rows[i]["layer"] = name
        for h in range(l2.shape[1]):
            rows[i][f"lambda2/h{h}"] = float(l2[i, h])
    return rows


def whole_image_preprocess(net):
    """Resize the *whole* image to a timm model's input size and normalise it (no centre crop).

    A hub checkpoint's own evaluation transform (resize, then centre crop) would cut off part of
    the scene, and the patch grid would no longer line up with the masks. This preprocess maps
    ``(B, 3, h, w)`` images in [0, 1] to ``(B, 3, H, W)`` with bilinear upsampling and the model's
    ``mean`` / ``std``, so every patch covers a known block of the scene.
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    size = tuple(cfg["input_size"][1:])
    pe = getattr(net, "patch_embed", None)
    if getattr(pe, "img_size", None) is not None and not getattr(net, "dynamic_img_size", False):
        size = tuple(pe.img_size)  # a fixed-size model: its own input size
    p = next(net.parameters())
    mean = torch.tensor(cfg["mean"], device=p.device)[:, None, None]
    std = torch.tensor(cfg["std"], device=p.device)[:, None, None]

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(p.device)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return ((x - mean) / std).to(p.dtype)

    return preprocess


def evaluate(model_name: str, level: str, n: int = scenes_mod.BENCHMARK_SIZE,
             cache_path=None, batch_size: int = 100, layer: int = -1, n_max: int = 10,
             mode: str = "bilinear", model=None, progress: bool = True) -> pd.DataFrame:
    """Evaluate every method on the first ``n`` held-out scenes of ``level``, resumably.

    Parameters
    ----------
    model_name : str
        A name for :func:`attnchain.zoo.load` (also the cache key).
    level : {"easy", "medium", "hard"}
    n : int
        Number of scenes of :func:`attnchain.data.scenes.benchmark` (default 500).
    cache_path : str or Path, optional
        Folder for the per-scene cache (JSON lines, one file per model / level / settings). Each
        finished batch is appended, so an interrupted run resumes where it stopped. None: no cache.
    batch_size : int
        Scenes per forward pass.
    layer : int
        Which attention layer (index into the captured layers; default the last).
    n_max : int
        Largest number of bounces.
    mode : {"bilinear", "nearest"}
        Upsampling of patch maps to pixels (metastable masks always use nearest).
    model : (model, preprocess), optional
        Already loaded model; default ``attnchain.zoo.load(model_name)`` (for full-profile timm
        checkpoints with :func:`whole_image_preprocess`, so the 64 x 64 scenes are upsampled whole
        to the model's input size and the patch grid lines up with the masks).
    progress : bool
        Show a tqdm bar over batches.

    Returns
    -------
    pandas.DataFrame
        One row per scene (``scene`` index, ``n_objects``, ``layer``) with columns
        ``"{method}/{weighting}/{metric}"`` (see the module docstring), ``metastable/{w}/obj_iou``,
        ``retention/{w}/{retention, kernel_retention, distance, sigma}`` and ``lambda2/h{k}``.
    """
    if level not in scenes_mod.LEVELS:
        raise ValueError(f"level must be one of {scenes_mod.LEVELS}, got {level!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    done: dict[int, dict] = {}
    file: Optional[Path] = None
    if cache_path is not None:
        folder = Path(cache_path)
        folder.mkdir(parents=True, exist_ok=True)
        safe = model_name.replace("/", "_")
        file = folder / f"{safe}_{level}_{_config_key(model_name, level, layer, n_max, mode)}.jsonl"
        if file.exists():
            with open(file) as fh:
                for line in fh:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:
                        break  # a torn last line from an interrupted write: recompute from here
                    done[int(r["scene"])] = r
    todo = [i for i in range(n) if i not in done]
    if todo:
        if model is None:
            from .. import zoo

            model = zoo.load(model_name)
            if zoo.describe(model_name).profile == "full" and hasattr(model[0], "patch_embed"):
                model = (model[0], whole_image_preprocess(model[0]))
        net, preprocess = model
        sc_all = scenes_mod.benchmark(level, n=max(todo) + 1)
        starts = list(range(min(todo), max(todo) + 1, batch_size))
        for s0 in tqdm(starts, desc=f"{model_name}/{level}", disable=not progress):
            idx = [i for i in range(s0, min(s0 + batch_size, max(todo) + 1)) if i not in done]
            if not idx:
                continue
            idx_t = torch.tensor(idx)
            sub = scenes_mod.Scenes(images=sc_all.images[idx_t], masks=sc_all.masks[idx_t],
                                    labels=sc_all.labels[idx_t], n_objects=sc_all.n_objects[idx_t],
                                    levels=tuple(sc_all.levels[i] for i in idx), seed=sc_all.seed)
            rows = _batch_results(net, preprocess, sub, 0, layer, n_max, mode)
            for i, r in zip(idx, rows):
                r["scene"] = i
                done[i] = r
            if file is not None:
                with open(file, "a") as fh:
                    fh.write("".join(json.dumps(r) + "\n" for r in rows))
    df = pd.DataFrame([done[i] for i in range(n)])
    df.insert(0, "level", level)
    df.insert(0, "model", model_name)
    return df


def summarise(df: pd.DataFrame, metric: str = "ap") -> pd.DataFrame:
    """Mean of ``metric`` per method and weighting: rows ``method``, columns ``weighting``."""
    cols = [c for c in df.columns if c.endswith(f"/{metric}") and c.count("/") == 2]
    if not cols:
        raise ValueError(f"no column ends with '/{metric}'")
    rec = []
    for c in cols:
        method, w, _ = c.split("/")
        rec.append({"method": method, "weighting": w, metric: float(df[c].mean())})
    out = pd.DataFrame(rec).pivot(index="method", columns="weighting", values=metric)
    order = [m for m in ["row_cls", "column_sum"] + [f"bounce_{k}" for k in range(1, 100)]
             + ["tokenrank", "metastable", "colour_contrast", "centre_prior", "gt_grid"]
             if m in out.index]
    return out.loc[order]
