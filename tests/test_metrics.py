import itertools

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from attnchain import metrics


def test_pixel_accuracy_and_iou_hand_worked():
    pred = np.array([[1, 1, 0], [0, 0, 0]])
    target = np.array([[1, 0, 0], [1, 0, 0]])
    assert metrics.pixel_accuracy(pred, target) == pytest.approx(4 / 6)
    # intersection 1 pixel, union 3 pixels
    assert metrics.iou(pred, target) == pytest.approx(1 / 3)
    assert metrics.iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.iou(np.zeros((2, 2)), np.zeros((2, 3)))


def test_matched_miou_hand_worked():
    target = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([5, 5, 7, 7, 7, 3])  # 5 <-> 0 exact; 7 vs 1: 2/3; 3 vs 2: 1/2
    m, match = metrics.matched_miou(pred, target, return_matching=True)
    assert m == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert match == {0: 5, 1: 7, 2: 3}
    # relabelling the prediction does not change the score
    assert metrics.matched_miou(10 - pred, target) == pytest.approx(m)
    # more targets than predicted segments: the unmatched target scores 0
    assert metrics.matched_miou(np.zeros(6), target) == pytest.approx((2 / 6) / 3)


def _brute_miou(pred, target, ignore_background=False):
    p_ids, t_ids = np.unique(pred), np.unique(target)
    if ignore_background:
        t_ids = t_ids[t_ids != 0]
    best = 0.0
    k = max(len(p_ids), len(t_ids))
    p_pad = list(p_ids) + [None] * (k - len(p_ids))
    for perm in itertools.permutations(p_pad, len(t_ids)):
        tot = 0.0
        for t, p in zip(t_ids, perm):
            if p is None:
                continue
            a, b = target == t, pred == p
            tot += (a & b).sum() / (a | b).sum()
        best = max(best, tot)
    return best / len(t_ids)


@pytest.mark.parametrize("seed", range(12))
def test_matched_miou_vs_brute_force(seed):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, rng.integers(2, 5), size=40)
    pred = rng.integers(0, rng.integers(1, 6), size=40) * 3 + 1
    for ib in (False, True):
        if ib and not (target != 0).any():
            continue
        assert metrics.matched_miou(pred, target, ignore_background=ib) == pytest.approx(
            _brute_miou(pred, target, ib))


def test_average_precision_and_auc_hand_worked():
    # ranking: pos, neg, pos, neg -> P@1 = 1, P@3 = 2/3; AP = (1 + 2/3) / 2
    s = np.array([0.9, 0.8, 0.7, 0.1])
    y = np.array([1, 0, 1, 0])
    assert metrics.average_precision(s, y) == pytest.approx((1 + 2 / 3) / 2)
    # AUC: pairs (pos, neg) correctly ordered: (0.9>0.8),(0.9>0.1),(0.7<0.8),(0.7>0.1) -> 3/4
    assert metrics.auc(s, y) == pytest.approx(3 / 4)
    assert np.isnan(metrics.auc(s, np.ones(4)))
    with pytest.raises(ValueError, match="binary"):
        metrics.average_precision(s, np.array([0, 2, 1, 0]))


@pytest.mark.parametrize("ties", [False, True])
def test_ranking_metrics_vs_sklearn_and_brute_force(ties):
    g = torch.Generator().manual_seed(1)
    s = torch.rand(30, 50, generator=g)
    if ties:
        s = (s * 4).floor()  # heavy ties, like nearest-upsampled patch maps
    y = torch.rand(30, 50, generator=g) < 0.3
    y[0] = False
    ap, best = metrics.ranking_metrics(s, y)
    assert torch.isnan(ap[0]) and best[0] == 1.0
    for r in range(1, 30):
        ref = average_precision_score(y[r].numpy(), s[r].numpy())
        assert float(ap[r]) == pytest.approx(ref, abs=1e-12)
        cuts = [metrics.iou((s[r] >= t).numpy(), y[r].numpy()) for t in torch.unique(s[r])]
        assert float(best[r]) == pytest.approx(max(cuts), abs=1e-12)


def test_ranking_metrics_bad_input():
    with pytest.raises(ValueError, match="shape"):
        metrics.ranking_metrics(torch.rand(3, 4), torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        metrics.ranking_metrics(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[True, False]]))


def test_otsu_bimodal_and_vs_brute_force():
    x = torch.cat([torch.full((30,), 0.1), torch.full((10,), 0.9)])[None]
    tau = metrics.otsu_threshold(x, bins=16)
    assert 0.1 < float(tau) < 0.9
    g = torch.Generator().manual_seed(3)
    s = torch.rand(5, 200, generator=g) ** 2
    taus = metrics.otsu_threshold(s, bins=32)
    for r in range(5):
        v = s[r].double().numpy()
        lo, hi = v.min(), v.max()
        w = (hi - lo) / 32
        idx = np.clip(np.floor((v - lo) / w), 0, 31)
        c = lo + (idx + 0.5) * w  # histogram centres, as Otsu sees the data
        best, best_t = -1, None
        for k in range(1, 32):
            lo_m, hi_m = idx < k, idx >= k
            if lo_m.any() and hi_m.any():
                bv = lo_m.mean() * hi_m.mean() * (c[lo_m].mean() - c[hi_m].mean()) ** 2
                if bv > best + 1e-15:
                    best, best_t = bv, lo + k * w
        assert float(taus[r]) == pytest.approx(best_t, rel=1e-6)
    const = metrics.otsu_threshold(torch.ones(1, 10))
    assert float(const) == 1.0


def test_paired_bootstrap_ci():
    rng = np.random.default_rng(0)
    b = rng.normal(size=400)
    a = b + 0.5 + rng.normal(scale=0.1, size=400)
    m, lo, hi = metrics.paired_bootstrap_ci(a, b, n_boot=2000, seed=1)
    assert m == pytest.approx(np.mean(a - b))
    assert lo < m < hi and lo > 0.48 and hi < 0.52
    assert metrics.paired_bootstrap_ci(a, b, n_boot=2000, seed=1) == (m, lo, hi)
    m0, lo0, hi0 = metrics.paired_bootstrap_ci(b, b + rng.normal(size=400), n_boot=2000)
    assert lo0 < 0 < hi0 or abs(m0) > 0.1
    with pytest.raises(ValueError, match="shape"):
        metrics.paired_bootstrap_ci(a, b[:3])


def test_bootstrap_ci_against_direct_resampling():
    rng = np.random.default_rng(3)
    x = rng.normal(loc=1.0, size=50)
    m, lo, hi = metrics.bootstrap_ci(x, n_boot=500, level=0.9, seed=7)
    draws = np.random.default_rng(7).integers(0, 50, size=(500, 50))
    means = x[draws].mean(1)
    assert m == pytest.approx(x.mean())
    assert (lo, hi) == tuple(np.quantile(means, [0.05, 0.95]))
    assert metrics.bootstrap_ci(torch.tensor(x), n_boot=500, level=0.9, seed=7) == (m, lo, hi)
    # the paired interval is the one-sample interval of the differences
    y = rng.normal(size=50)
    assert metrics.paired_bootstrap_ci(x, y, n_boot=500, seed=2) == \
        metrics.bootstrap_ci(x - y, n_boot=500, seed=2)
    for bad in (dict(x=[1.0, np.nan]), dict(x=[1.0], level=1.0), dict(x=[1.0], n_boot=0),
                dict(x=[])):
        with pytest.raises(ValueError):
            metrics.bootstrap_ci(**bad)


def test_foreground_scores_against_sklearn_and_brute_force():
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(4, 6, 6, generator=g)
    fg = torch.rand(4, 6, 6, generator=g) > 0.6
    sc = metrics.foreground_scores(maps, fg)
    for i in range(4):
        s, y = maps[i].flatten().numpy(), fg[i].flatten().numpy()
        assert sc["ap"][i] == pytest.approx(average_precision_score(y, s))
        tau = float(metrics.otsu_threshold(maps[i].flatten()[None])[0])
        assert sc["iou_otsu"][i] == pytest.approx(metrics.iou(s > tau, y))
        best = max(metrics.iou(s >= t, y) for t in np.unique(s))
        assert sc["iou_best"][i] == pytest.approx(best)
    binary = metrics.foreground_scores(fg.float(), fg, binary=True)
    np.testing.assert_allclose(binary["iou_otsu"], 1.0)


def test_object_iou_against_pixel_iou():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 1
    masks[0, 4:8, 4:6] = 2
    states = torch.tensor([[[0, 1], [1, 2]]])
    # object 1: state 0 covers it exactly -> 1; object 2 (8 px): state 2 (16 px) -> 8 / 16
    assert metrics.object_iou(states, masks)[0] == pytest.approx((1 + 0.5) / 2)
    up = states[0].repeat_interleave(4, 0).repeat_interleave(4, 1)
    ref = np.mean([max(metrics.iou((up == s).numpy(), (masks[0] == o).numpy()) for s in range(3))
                   for o in (1, 2)])
    assert metrics.object_iou(states, masks)[0] == pytest.approx(ref)
    two = torch.cat([masks, torch.zeros_like(masks)])  # the second image has no object
    out = metrics.object_iou(states.expand(2, 2, 2), two)
    assert out[0] == pytest.approx(0.75) and np.isnan(out[1])


def test_adjusted_rand_is_sklearns():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    assert metrics.adjusted_rand(torch.tensor(a), torch.tensor(b)) == adjusted_rand_score(a, b)
    assert metrics.adjusted_rand([0, 0, 1], [2, 2, 7]) == 1.0
    with pytest.raises(ValueError, match="shape"):
        metrics.adjusted_rand([0, 1], [0, 1, 1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_otsu_threshold_names_nan_scores(bad):
    """Regression (issue 17): NaN / Inf scores ended in an index error inside the histogram."""
    s = torch.rand(2, 10)
    s[1, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        metrics.otsu_threshold(s)
    with pytest.raises(ValueError, match="M >= 1"):
        metrics.otsu_threshold(torch.zeros(2, 0))
