"""Segmentation and ranking metrics: pixel accuracy, IoU, matched mIoU, AP, AUC, bootstrap CIs.

Reference implementations come from the ecosystem: average precision and ROC AUC from
scikit-learn, the optimal one-to-one matching of unlabelled segments from SciPy's Hungarian
solver. :func:`ranking_metrics` is a batched torch version of average precision (and of the IoU at
the best threshold) for evaluating thousands of maps at once; it is tested against scikit-learn.
:func:`foreground_scores` and :func:`object_iou` score batches of maps against masks.

This module is the boundary to NumPy: every function accepts tensors on any device. The batched
torch metrics compute on the input's device; results that leave as NumPy arrays or floats are
moved with ``.detach().cpu()`` here and nowhere else.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, average_precision_score, roc_auc_score

__all__ = [
    "pixel_accuracy",
    "iou",
    "matched_miou",
    "adjusted_rand",
    "average_precision",
    "auc",
    "ranking_metrics",
    "otsu_threshold",
    "foreground_scores",
    "object_iou",
    "bootstrap_ci",
    "paired_bootstrap_ci",
]


def _np(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.size == 0:
        raise ValueError(f"{name} is empty")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, na: str, nb: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{na} has shape {a.shape} but {nb} has shape {b.shape}")


def pixel_accuracy(pred, target) -> float:
    r"""Fraction of pixels whose predicted label equals the target label.

    Parameters
    ----------
    pred, target : array_like, shape (..., H, W)
        Integer (or boolean) label maps of the same shape.

    Returns
    -------
    float
        :math:`\frac{1}{|P|}\sum_p [\hat y_p = y_p]`.

    Examples
    --------
    >>> pixel_accuracy([[0, 1], [1, 1]], [[0, 1], [0, 1]])
    0.75

    See Also
    --------
    iou, matched_miou
    """
    p, t = _np(pred, "pred"), _np(target, "target")
    _same_shape(p, t, "pred", "target")
    return float((p == t).mean())


def iou(pred, target) -> float:
    r"""Intersection over union of two binary masks.

    Parameters
    ----------
    pred, target : array_like of bool, shape (..., H, W)
        Binary masks of the same shape (non-zero = inside).

    Returns
    -------
    float
        :math:`|P \cap T| / |P \cup T|`; 1.0 when both masks are empty (perfect agreement).

    Examples
    --------
    >>> iou([[1, 1], [0, 0]], [[1, 0], [0, 0]])
    0.5

    See Also
    --------
    matched_miou, object_iou
    """
    p, t = _np(pred, "pred") != 0, _np(target, "target") != 0
    _same_shape(p, t, "pred", "target")
    union = np.logical_or(p, t).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(p, t).sum() / union)


def matched_miou(pred, target, ignore_background: bool = False, return_matching: bool = False):
    r"""Mean IoU of an unlabelled segmentation after optimal one-to-one matching of its segments.

    Parameters
    ----------
    pred : array_like of int, shape (H, W) (or any shape)
        Predicted segment ids (arbitrary integers; their values carry no meaning).
    target : array_like of int, same shape
        Ground-truth segment ids.
    ignore_background : bool
        If True, target id 0 is not scored (its pixels still count in the unions).
    return_matching : bool
        Also return the matching as a dict ``{target_id: pred_id or None}``.

    Returns
    -------
    miou : float
        :math:`\frac{1}{|T|}\sum_{t \in T} \mathrm{IoU}(t, m(t))`, where :math:`m` is the
        one-to-one assignment of predicted to target segments maximising the summed IoU; target
        segments left unmatched (more targets than predictions) score 0.
    matching : dict, optional
        Only if ``return_matching``.

    Examples
    --------
    >>> matched_miou([[5, 5], [7, 7]], [[0, 0], [1, 1]])   # ids differ, segments agree
    1.0

    See Also
    --------
    iou, object_iou

    Notes
    -----
    The assignment problem is solved exactly with the Hungarian algorithm
    (:func:`scipy.optimize.linear_sum_assignment`) on the ``|T| x |P|`` IoU matrix [1]_.

    References
    ----------
    .. [1] H. W. Kuhn, "The Hungarian method for the assignment problem", Naval Research
       Logistics Quarterly 2, 1955.
    """
    p, t = _np(pred, "pred").ravel(), _np(target, "target").ravel()
    if p.shape != t.shape:
        raise ValueError(f"pred has {p.size} pixels but target has {t.size}")
    p_ids, p_inv = np.unique(p, return_inverse=True)
    t_ids, t_inv = np.unique(t, return_inverse=True)
    inter = np.zeros((len(t_ids), len(p_ids)))
    np.add.at(inter, (t_inv, p_inv), 1.0)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    ious = inter / union
    scored = np.ones(len(t_ids), dtype=bool)
    if ignore_background:
        scored = t_ids != 0
        if not scored.any():
            raise ValueError("target holds only background (id 0) and ignore_background=True")
    rows, cols = linear_sum_assignment(ious[scored], maximize=True)
    sc_ids = t_ids[scored]
    total = ious[scored][rows, cols].sum()
    miou = float(total / scored.sum())
    if return_matching:
        match = {int(i): None for i in sc_ids}
        for r, c in zip(rows, cols):
            match[int(sc_ids[r])] = int(p_ids[c])
        return miou, match
    return miou


def adjusted_rand(labels_true, labels_pred) -> float:
    """Adjusted Rand index of two labellings (:func:`sklearn.metrics.adjusted_rand_score`).

    Parameters
    ----------
    labels_true, labels_pred : array_like or Tensor of int, shape (n,)
        Cluster labels (any device); their values carry no meaning, only the grouping.

    Returns
    -------
    float
        1 for identical groupings, about 0 for independent ones (it can be negative).

    Examples
    --------
    >>> import torch
    >>> adjusted_rand(torch.tensor([0, 0, 1, 1]), torch.tensor([5, 5, 2, 2]))
    1.0

    See Also
    --------
    matched_miou
    """
    a, b = _np(labels_true, "labels_true").ravel(), _np(labels_pred, "labels_pred").ravel()
    _same_shape(a, b, "labels_true", "labels_pred")
    return float(adjusted_rand_score(a, b))


def _check_binary(y: np.ndarray) -> np.ndarray:
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be binary (0/1 or bool)")
    return y.astype(bool)


def average_precision(scores, labels) -> float:
    r"""Average precision of a score map against binary labels (scikit-learn).

    Parameters
    ----------
    scores : array_like, shape (...)
        Real scores, higher = more likely positive.
    labels : array_like of {0, 1} or bool, same shape
        Ground truth.

    Returns
    -------
    float
        :math:`\mathrm{AP} = \sum_k (R_k - R_{k-1}) P_k` over the distinct score thresholds
        (:func:`sklearn.metrics.average_precision_score`). NaN if there is no positive.

    Examples
    --------
    >>> average_precision([0.9, 0.8, 0.1], [1, 0, 1])
    0.8333333333333333

    See Also
    --------
    ranking_metrics : the batched torch version.
    """
    s, y = _np(scores, "scores"), _np(labels, "labels")
    _same_shape(s, y, "scores", "labels")
    y = _check_binary(y).ravel()
    if not y.any():
        return float("nan")
    return float(average_precision_score(y, s.ravel()))


def auc(scores, labels) -> float:
    """Area under the ROC curve (:func:`sklearn.metrics.roc_auc_score`); NaN if one class is absent.

    Parameters
    ----------
    scores : array_like
        Real scores, higher = more likely positive.
    labels : array_like of {0, 1} or bool, same shape

    Returns
    -------
    float

    Examples
    --------
    >>> auc([0.9, 0.8, 0.1], [1, 0, 1])
    0.5

    See Also
    --------
    average_precision
    """
    s, y = _np(scores, "scores"), _np(labels, "labels")
    _same_shape(s, y, "scores", "labels")
    y = _check_binary(y).ravel()
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, s.ravel()))


def ranking_metrics(scores: torch.Tensor, labels: torch.Tensor):
    r"""Batched average precision and best-threshold IoU of score maps against binary masks.

    Parameters
    ----------
    scores : Tensor, shape (..., M)
        Real scores per element (flattened pixels); higher = more likely positive.
    labels : Tensor of bool, shape (..., M)
        Ground truth.

    Returns
    -------
    ap : Tensor, shape (...,)
        Average precision, identical to :func:`sklearn.metrics.average_precision_score` per row
        (ties handled the same way: one operating point per distinct score). NaN for rows
        without positives.
    best_iou : Tensor, shape (...,)
        :math:`\max_\tau |\{s \ge \tau\} \cap T| / |\{s \ge \tau\} \cup T|` over the distinct
        thresholds (an oracle threshold per map: an upper bound for any thresholding rule).

    Examples
    --------
    >>> import torch
    >>> ap, best = ranking_metrics(torch.tensor([[0.9, 0.8, 0.1]]), torch.tensor([[True, False, True]]))
    >>> round(float(ap[0]), 4), round(float(best[0]), 4)
    (0.8333, 0.6667)

    See Also
    --------
    average_precision, foreground_scores

    Notes
    -----
    Sort each row by decreasing score; with cumulative true / false positives ``tp_i, fp_i`` at
    the last element of every group of tied scores, precision is ``tp / (tp + fp)``, recall
    ``tp / P`` and ``AP = sum_k (R_k - R_{k-1}) P_k`` [1]_; the IoU at that cut is
    ``tp / (P + fp)``. Cost: one sort per row, in float64.

    References
    ----------
    .. [1] M. Zhu, "Recall, precision and average precision", University of Waterloo, 2004.
    """
    if scores.shape != labels.shape:
        raise ValueError(f"scores has shape {tuple(scores.shape)} but labels has shape "
                         f"{tuple(labels.shape)}")
    if scores.ndim < 1 or scores.shape[-1] == 0:
        raise ValueError("scores must have a non-empty last dimension")
    s = scores.detach().to(torch.float64)
    if not torch.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    y = labels.bool()
    s_sorted, order = torch.sort(s, dim=-1, descending=True, stable=True)
    y_sorted = torch.gather(y, -1, order).to(torch.float64)
    tp = y_sorted.cumsum(-1)
    fp = (1.0 - y_sorted).cumsum(-1)
    end = torch.ones_like(y_sorted, dtype=torch.bool)
    end[..., :-1] = s_sorted[..., :-1] != s_sorted[..., 1:]
    P = tp[..., -1:]
    tp_end = torch.where(end, tp, torch.zeros_like(tp))
    prev = torch.cummax(tp_end, dim=-1).values
    prev = torch.cat([torch.zeros_like(prev[..., :1]), prev[..., :-1]], dim=-1)
    prec = tp / (tp + fp)
    d_tp = torch.where(end, tp - prev, torch.zeros_like(tp))
    ap = (d_tp * prec).sum(-1) / P[..., 0]
    ap = torch.where(P[..., 0] > 0, ap, torch.full_like(ap, float("nan")))
    iou_cut = torch.where(end, tp / (P + fp), torch.zeros_like(tp))
    best = iou_cut.amax(-1)
    best = torch.where(P[..., 0] > 0, best, torch.ones_like(best))
    return ap, best


def otsu_threshold(scores: torch.Tensor, bins: int = 64) -> torch.Tensor:
    r"""Batched Otsu threshold of each row of ``scores``.

    Parameters
    ----------
    scores : Tensor, shape (..., M)
        Values to split in two classes.
    bins : int
        Number of equal-width histogram bins between each row's min and max.

    Returns
    -------
    Tensor, shape (...,)
        Threshold ``tau`` per row (a bin edge); the foreground is ``scores > tau``. A constant row
        gets its value (empty foreground).

    Examples
    --------
    >>> import torch
    >>> tau = otsu_threshold(torch.tensor([[0.0, 0.1, 0.0, 0.9, 1.0, 0.95]]))
    >>> bool(0.1 < tau[0] < 0.9)
    True

    See Also
    --------
    foreground_scores

    Notes
    -----
    Otsu (1979) picks the bin edge maximising the between-class variance
    :math:`\omega_0 \omega_1 (\mu_0 - \mu_1)^2` of the histogram.

    References
    ----------
    .. [1] N. Otsu, "A threshold selection method from gray-level histograms", IEEE Trans. SMC 9,
       1979.
    """
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    s = scores.detach().to(torch.float64)
    if s.ndim == 0 or s.shape[-1] == 0:
        raise ValueError(f"otsu_threshold: expected scores of shape (..., M), M >= 1, got "
                         f"{tuple(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError("otsu_threshold: scores contain NaN or Inf")
    lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    width = (hi - lo) / bins
    safe = torch.where(width > 0, width, torch.ones_like(width))
    idx = ((s - lo) / safe).floor().clamp(0, bins - 1).long()
    hist = torch.zeros(*s.shape[:-1], bins, dtype=torch.float64, device=s.device)
    hist.scatter_add_(-1, idx, torch.ones_like(s))
    centres = lo + (torch.arange(bins, device=s.device, dtype=torch.float64) + 0.5) * safe
    w0 = hist.cumsum(-1)[..., :-1]
    m0 = (hist * centres).cumsum(-1)[..., :-1]
    total_w, total_m = hist.sum(-1, keepdim=True), (hist * centres).sum(-1, keepdim=True)
    w1, m1 = total_w - w0, total_m - m0
    ok = (w0 > 0) & (w1 > 0)
    between = torch.where(ok, w0 * w1 * (m0 / w0.clamp_min(1) - m1 / w1.clamp_min(1)) ** 2,
                          torch.full_like(w0, -1.0))
    k = between.argmax(-1, keepdim=True)
    tau = lo + (k + 1).to(torch.float64) * safe
    tau = torch.where(width > 0, tau, hi)
    return tau[..., 0].to(scores.dtype if scores.is_floating_point() else torch.float64)


def foreground_scores(pixel_maps: torch.Tensor, foreground: torch.Tensor,
                      binary: bool = False) -> dict:
    r"""Per-map ``ap``, ``iou_best`` and ``iou_otsu`` of pixel maps against foreground masks.

    Parameters
    ----------
    pixel_maps : Tensor, shape (B, H, W)
        One saliency map per image, higher = more likely foreground (any device).
    foreground : Tensor of bool, shape (B, H, W)
        The true foreground.
    binary : bool
        The maps are already masks: ``iou_otsu`` thresholds them at 0.5 instead of at their Otsu
        threshold.

    Returns
    -------
    dict of ndarray, shape (B,)
        ``ap``: average precision (:func:`ranking_metrics`); ``iou_best``: the IoU at the best
        threshold of each map (an oracle); ``iou_otsu``: the IoU of ``map > tau`` with ``tau``
        from :func:`otsu_threshold` (1.0 when prediction and truth are both empty).

    Examples
    --------
    >>> import torch
    >>> fg = torch.tensor([[[True, False], [False, False]]])
    >>> s = foreground_scores(torch.tensor([[[0.9, 0.1], [0.2, 0.0]]]), fg)
    >>> float(s["ap"][0]), float(s["iou_best"][0]), float(s["iou_otsu"][0])
    (1.0, 1.0, 1.0)

    See Also
    --------
    ranking_metrics, otsu_threshold, object_iou
    """
    s = pixel_maps.flatten(1)
    y = foreground.flatten(1).bool().to(s.device)
    ap, best = ranking_metrics(s, y)
    if binary:
        tau = torch.full((s.shape[0],), 0.5, device=s.device)
    else:
        tau = otsu_threshold(s)
    pred = s > tau[:, None].to(s.dtype)
    inter = (pred & y).sum(-1).double()
    union = (pred | y).sum(-1).double()
    iou_o = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {k: v.detach().cpu().numpy() for k, v in
            (("ap", ap), ("iou_best", best), ("iou_otsu", iou_o))}


def object_iou(states: torch.Tensor, masks: torch.Tensor) -> np.ndarray:
    r"""Mean over objects of the IoU of the best-matching segment with each object.

    Parameters
    ----------
    states : LongTensor, shape (B, r, c)
        A segment (e.g. metastable state) id for each patch.
    masks : LongTensor, shape (B, H, W)
        Instance ids, 0 = background.

    Returns
    -------
    ndarray, shape (B,)
        :math:`\frac{1}{K}\sum_{o=1}^{K} \max_s \mathrm{IoU}(\{p: s(p) = s\}, o)` over the
        :math:`K` objects present, with the segments upsampled to pixels by nearest neighbour;
        NaN for an image without objects.

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> masks[0, :2, :2] = 1
    >>> object_iou(torch.tensor([[[1, 0], [0, 0]]]), masks)
    array([1.])

    See Also
    --------
    matched_miou : one-to-one matching instead of the best segment per object.
    """
    H, W = masks.shape[-2:]
    st = F.interpolate(states[:, None].float(), size=(H, W), mode="nearest")[:, 0].long()
    k = int(st.max()) + 1
    n_obj = int(masks.max())
    S = F.one_hot(st.flatten(1), k).double()  # (B, P, k)
    O = F.one_hot(masks.to(st.device).flatten(1), n_obj + 1)[..., 1:].double()  # (B, P, n_obj)
    inter = S.transpose(1, 2) @ O  # (B, k, n_obj)
    union = S.sum(1)[:, :, None] + O.sum(1)[:, None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    best = iou.amax(1)  # (B, n_obj)
    present = O.sum(1) > 0
    cnt = present.sum(1)
    out = (best * present).sum(1) / cnt.clamp_min(1)
    out = torch.where(cnt > 0, out, torch.full_like(out, float("nan")))
    return out.detach().cpu().numpy()


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")


def bootstrap_ci(x, n_boot: int = 10000, level: float = 0.95, seed: int = 0):
    r"""Percentile bootstrap confidence interval of a mean.

    Parameters
    ----------
    x : array_like or Tensor, shape (n,)
        Measurements (e.g. per-scene AP of one method), finite.
    n_boot : int
        Number of bootstrap resamples.
    level : float in (0, 1)
        Confidence level.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the result is deterministic.

    Returns
    -------
    mean : float
        :math:`\bar x = \frac1n \sum_i x_i`.
    low, high : float
        The :math:`(1-\mathrm{level})/2` and :math:`(1+\mathrm{level})/2` quantiles of the means
        :math:`\bar x^*` of ``n_boot`` resamples of ``x`` with replacement.

    Raises
    ------
    ValueError
        Empty or non-finite ``x``, ``level`` outside (0, 1), ``n_boot < 1``.

    Examples
    --------
    >>> mean, low, high = bootstrap_ci([0.2, 0.4, 0.6, 0.8], n_boot=2000, seed=0)
    >>> round(mean, 3), low < mean < high
    (0.5, True)

    See Also
    --------
    paired_bootstrap_ci

    References
    ----------
    .. [1] B. Efron, R. Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall, 1993.
    """
    x = _np(x, "x").astype(np.float64).ravel()
    _check_bootstrap(n_boot, level)
    if not np.isfinite(x).all():
        raise ValueError("x must be finite")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    means = x[idx].mean(1)
    q = (1 - level) / 2
    low, high = np.quantile(means, [q, 1 - q])
    return float(x.mean()), float(low), float(high)


def paired_bootstrap_ci(a, b, n_boot: int = 10000, level: float = 0.95, seed: int = 0):
    r"""Percentile bootstrap confidence interval of the mean paired difference ``mean(a - b)``.

    Parameters
    ----------
    a, b : array_like, shape (n,)
        Paired measurements (e.g. per-scene AP of two methods on the same scenes).
    n_boot : int
        Number of bootstrap resamples.
    level : float in (0, 1)
        Confidence level.
    seed : int
        Seed of :func:`numpy.random.default_rng`; the result is deterministic.

    Returns
    -------
    mean : float
        :math:`\bar d = \frac1n \sum_i (a_i - b_i)`.
    low, high : float
        The :math:`(1-\mathrm{level})/2` and :math:`(1+\mathrm{level})/2` quantiles of the
        bootstrap means :math:`\bar d^*` (resampling scenes with replacement, keeping pairs):
        :func:`bootstrap_ci` of the differences.

    Raises
    ------
    ValueError
        Shapes differ, non-finite differences, ``level`` outside (0, 1), ``n_boot < 1``.

    Examples
    --------
    >>> mean, low, high = paired_bootstrap_ci([0.9, 0.8, 0.7], [0.5, 0.6, 0.5], seed=0)
    >>> round(mean, 3), low > 0
    (0.267, True)

    See Also
    --------
    bootstrap_ci

    References
    ----------
    .. [1] B. Efron, R. Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall, 1993.
    """
    a, b = _np(a, "a").astype(np.float64).ravel(), _np(b, "b").astype(np.float64).ravel()
    _same_shape(a, b, "a", "b")
    _check_bootstrap(n_boot, level)
    d = a - b
    if not np.isfinite(d).all():
        raise ValueError("a and b must be finite")
    return bootstrap_ci(d, n_boot=n_boot, level=level, seed=seed)
