"""DiffSeg: known answers for the algorithm (planted blocks, token order, the aggregation against
an independent upsampling, the distance), the anchor samplers, and the metrics against SciPy's
assignment on scikit-learn's confusion matrix and a brute-force search."""
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.special import rel_entr
from sklearn.metrics import adjusted_rand_score, confusion_matrix

import attnchain as ac
from attnchain.tasks import diffseg as ds


def _same_partition(a, b) -> bool:
    return adjusted_rand_score(np.asarray(a).ravel(), np.asarray(b).ravel()) == 1.0


# ---------------------------------------------------------------------------------------------
# the algorithm
@pytest.mark.parametrize("sampler", ds.SAMPLERS)
def test_planted_blocks_are_found_exactly(sampler):
    sizes = [70, 9, 23, 40, 114]                    # unequal blocks on a 16 x 16 grid
    for seed in range(2):
        A, truth = ds.planted_attention((16, 16), sizes, leak=0.05, noise=0.3, seed=seed)
        seg = ds.segment(A[None], (16, 16), sampler=sampler, points=16, seeds=[seed])
        assert seg.segments == [len(sizes)]
        assert _same_partition(seg.labels[0].flatten(), truth)


def test_planted_blocks_sparse_anchors_and_shuffled_tokens():
    sizes = [100, 20, 36, 100]
    A, truth = ds.planted_attention((16, 16), sizes, seed=3)
    seg = ds.segment(A[None], (16, 16), points=8)           # 64 anchors, every block hit
    assert _same_partition(seg.labels[0].flatten(), truth)
    A, truth = ds.planted_attention((16, 16), sizes, seed=4, shuffle=True)
    for sampler in ("tokenrank", "random"):
        seg = ds.segment(A[None], (16, 16), sampler=sampler, k=256)
        assert seg.segments == [4] and _same_partition(seg.labels[0].flatten(), truth)


def test_a_block_without_an_anchor_is_lost_not_invented():
    A, truth = ds.planted_attention((8, 8), [62, 2], seed=0)  # the small block: tokens 62, 63
    seg = ds.segment(A[None], (8, 8), anchors=torch.tensor([[0, 10, 20]]))
    assert seg.segments == [1]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(3, 30), min_size=2, max_size=5), st.integers(0, 10 ** 6))
def test_merging_is_invariant_to_token_order(sizes, seed):
    n = sum(sizes)
    rng = np.random.default_rng(seed)
    A, truth = ds.planted_attention((1, n), sizes, noise=0.4, seed=seed, shuffle=True)
    anchors = torch.tensor(rng.choice(n, size=min(n, 12), replace=False))[None]
    perm = torch.tensor(rng.permutation(n))
    inv = torch.argsort(perm)
    Ap = A[perm][:, perm]                      # token perm[i] of A is token i of Ap
    a = ds.segment(A[None], (1, n), anchors=anchors)
    b = ds.segment(Ap[None], (1, n), anchors=inv[anchors])
    assert a.segments == b.segments
    assert _same_partition(a.labels[0, 0][perm], b.labels[0, 0])
    torch.testing.assert_close(a.maps[0][:, perm], b.maps[0], rtol=1e-5, atol=1e-7)


def test_merging_keeps_rows_stochastic_and_follows_the_threshold():
    g = torch.Generator().manual_seed(0)
    A = torch.softmax(3 * torch.randn(2, 36, 36, generator=g), -1)
    anchors = ds.grid_anchors((6, 6), 3).expand(2, -1)
    few = ds.merge(A, anchors, threshold=50.0)     # everything merges into one map
    assert [m.shape[0] for m in few] == [1, 1]
    torch.testing.assert_close(few[0][0], A[0].mean(0))
    many = ds.merge(A, anchors, threshold=1e-6)    # nothing merges: the anchors' own maps
    torch.testing.assert_close(many[1], A[1, anchors[1]])
    for m, m2 in zip(ds.merge(A, anchors, threshold=1.0),
                     ds.merge(A, anchors, threshold=1.0, distances=ds.symmetric_kl(A, A))):
        torch.testing.assert_close(m.sum(-1), torch.ones(len(m)))
        torch.testing.assert_close(m, m2)                  # precomputed distances: the same


def test_greedy_iteration_matches_a_direct_transcription():
    """Iterations after the first, written out with explicit loops and float64 KL."""
    g = torch.Generator().manual_seed(1)
    A = torch.softmax(2 * torch.randn(1, 49, 49, generator=g, dtype=torch.float64), -1)
    anchors = ds.grid_anchors((7, 7), 4)[None]
    tau = 0.4

    def kl(p, q):
        return 0.5 * rel_entr(p, q).sum() + 0.5 * rel_entr(q, p).sum()

    X = A[0].numpy()
    maps = []
    for a in anchors[0].tolist():
        members = [i for i in range(49) if kl(X[a], X[i]) < tau]
        maps.append(X[members].mean(0))
    for _ in range(2):
        taken, new = set(), []
        for i, p in enumerate(maps):
            if i in taken:
                continue
            taken.add(i)
            close = [j for j, q in enumerate(maps) if kl(p, q) < tau]
            taken.update(close)
            new.append(np.mean([maps[j] for j in close], 0))
        maps = new
    ours = ds.merge(A, anchors, threshold=tau, iterations=3)[0]
    np.testing.assert_allclose(ours.numpy(), np.array(maps), rtol=1e-9, atol=1e-12)


def test_symmetric_kl_matches_scipy_on_spiky_distributions():
    rng = np.random.default_rng(0)
    P = rng.dirichlet(np.full(50, 0.05), size=4)        # many entries near 0, some exactly 0
    Q = rng.dirichlet(np.full(50, 2.0), size=3)
    assert (P == 0).any()
    tiny = np.finfo(np.float64).tiny                      # the documented clamp
    P, Q = np.maximum(P, tiny), np.maximum(Q, tiny)
    ref = np.array([[0.5 * rel_entr(p, q).sum() + 0.5 * rel_entr(q, p).sum() for q in Q]
                    for p in P])
    ours = ds.symmetric_kl(torch.tensor(P), torch.tensor(Q)).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-6)
    d = ds.symmetric_kl(torch.tensor(P, dtype=torch.float32), torch.tensor(P, dtype=torch.float32))
    assert float(d.diagonal().abs().max()) < 1e-4


def _reference_level(M, h, w, H, W):
    """One level, by scipy.ndimage.zoom (half-pixel linear, edges extended) and explicit loops."""
    out = np.zeros((H * W, H * W))
    for I in range(H):
        for J in range(W):
            q = (I // (H // h)) * w + J // (W // w)
            up = ndimage.zoom(M[q].reshape(h, w), (H // h, W // w), order=1, grid_mode=True,
                              mode="nearest")
            out[I * W + J] = (up / up.sum()).ravel()
    return out


def test_aggregation_matches_an_independent_upsampling():
    g = torch.Generator().manual_seed(2)
    grids = [(8, 8), (8, 8), (4, 4), (2, 2)]
    maps = [torch.softmax(torch.randn(1, 3, h * w, h * w, generator=g, dtype=torch.float64), -1)
            for h, w in grids]
    A, grid = ds.aggregate(maps, grids)
    assert grid == (8, 8)
    wts = np.array([8, 4, 2]) / 14                 # weights proportional to the resolution
    fine = (maps[0][0].mean(0) + maps[1][0].mean(0)).numpy() / 2
    ref = wts[0] * fine / fine.sum(-1, keepdims=True)
    ref += wts[1] * _reference_level(maps[2][0].mean(0).numpy(), 4, 4, 8, 8)
    ref += wts[2] * _reference_level(maps[3][0].mean(0).numpy(), 2, 2, 8, 8)
    np.testing.assert_allclose(A[0].numpy(), ref, rtol=1e-10, atol=1e-13)
    ac.check_stochastic(A)


def test_aggregation_rejects_bad_input():
    m = torch.softmax(torch.randn(1, 16, 16), -1)
    with pytest.raises(ValueError, match="divide"):
        ds.aggregate([m, torch.softmax(torch.randn(1, 9, 9), -1)], [(4, 4), (3, 3)])
    with pytest.raises(ValueError, match="grid"):
        ds.aggregate([m], [(4, 5)])
    with pytest.raises(ValueError, match="2 maps but 1"):
        ds.aggregate([m, m], [(4, 4)])
    with pytest.raises(ValueError, match="weights"):
        ds.aggregate([m], [(4, 4)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="threshold"):
        ds.merge(m, torch.tensor([[0]]), threshold=0.0)
    with pytest.raises(ValueError, match="token indices"):
        ds.merge(m, torch.tensor([[16]]))
    with pytest.raises(ValueError, match="unknown sampler"):
        ds.sample_anchors(m, (4, 4), "kmeans")


# ---------------------------------------------------------------------------------------------
# anchors
def test_grid_anchors_follow_diffseg_spacing():
    for side, points in ((64, 16), (32, 16), (16, 4), (10, 3), (5, 8)):
        p = min(points, side)
        step = (side - 1) // max(p - 1, 1)
        first = (side - 1 - step * (p - 1)) // 2
        axis = [first + step * i for i in range(p)]
        expected = [r * side + c for r in axis for c in axis]
        assert ds.grid_anchors((side, side), points).tolist() == expected
    assert ds.grid_anchors((64, 64))[:16].div(64, rounding_mode="floor").unique().tolist() == [1]
    assert sorted(set(ds.grid_anchors((64, 64)).remainder(64).tolist())) == list(range(1, 62, 4))


def test_tokenrank_sampling_is_proportional_to_pi():
    A = torch.softmax(torch.randn(1, 6, 6, generator=torch.Generator().manual_seed(3)), -1)
    pi = ac.token_rank(A, alpha=0.99)
    picks = torch.cat([ds.sample_anchors(A, (2, 3), "tokenrank", k=1, seeds=[s], pi=pi)[0]
                       for s in range(4000)])
    freq = torch.bincount(picks, minlength=6).double() / 4000
    assert float((freq - pi[0].double()).abs().max()) < 0.03
    two = ds.sample_anchors(A.expand(3, -1, -1), (2, 3), "tokenrank", k=4, seeds=[5, 6, 5])
    assert all(len(set(r)) == 4 for r in two.tolist())
    assert torch.equal(two[0], two[2]) and not torch.equal(two[0], two[1])   # seeded per image


def test_nms_anchors_are_spread_and_start_at_the_top():
    A, _ = ds.planted_attention((12, 12), [50, 94], seed=0)
    pi = ac.token_rank(A[None])
    a = ds.sample_anchors(A[None], (12, 12), "tokenrank_nms", k=9, radius=3.0, pi=pi)[0]
    assert int(a[0]) == int(pi[0].argmax())
    rc = torch.stack([a // 12, a % 12], -1).double()
    d = torch.cdist(rc, rc) + torch.eye(len(a)) * 100
    assert float(d.min()) >= 3.0
    assert bool((pi[0, a[:-1]] >= pi[0, a[1:]]).all())       # decreasing TokenRank
    many = ds.sample_anchors(A[None], (12, 12), "tokenrank_nms", k=144, radius=5.0, pi=pi)[0]
    assert len(many) == 144 and len(set(many.tolist())) < 144   # padded with a repeat


# ---------------------------------------------------------------------------------------------
# metrics
def _brute_force(pred, target, n_class):
    labels = sorted(set(pred.tolist()) | set(range(n_class)))
    best = None
    for perm in itertools.permutations(labels, n_class):
        tp = sum(int(((target == c) & (pred == perm[c])).sum()) for c in range(n_class))
        if best is None or tp > best[0]:
            best = (tp, perm)
    return best


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.integers(0, 10 ** 6))
def test_hungarian_counts_match_scipy_on_sklearn_confusion(n_class, n_pred, seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, n_pred, (3, 9, 7))
    target = rng.integers(-1, n_class, (3, 9, 7))
    c = ds.hungarian_counts(torch.tensor(pred), torch.tensor(target), n_class)
    tp_all = fp_all = fn_all = 0
    total = 0
    for b in range(3):
        keep = target[b] >= 0
        t, p = target[b][keep], pred[b][keep]
        P = max(n_class, int(pred[b].max()) + 1)
        cm = confusion_matrix(t, p, labels=range(P))[:n_class]
        rows, cols = linear_sum_assignment(cm, maximize=True)
        tp = np.zeros(n_class)
        tp[rows] = cm[rows, cols]
        np.testing.assert_array_equal(c["tp"][b], tp)
        np.testing.assert_array_equal(c["fn"][b], cm.sum(1) - tp)
        fp = np.zeros(n_class)
        fp[rows] = cm[:, cols].sum(0) - cm[rows, cols]
        np.testing.assert_array_equal(c["fp"][b], fp)
        assert c["total"][b] == keep.sum()
        assert c["tp"][b].sum() == _brute_force(p, t, n_class)[0]
        tp_all, fp_all, fn_all, total = tp_all + tp, fp_all + fp, fn_all + cm.sum(1) - tp, \
            total + keep.sum()
    acc, miou = ds.scores(c["tp"].sum(0), c["fp"].sum(0), c["fn"].sum(0), c["total"].sum())
    den = tp_all + fp_all + fn_all
    assert acc == pytest.approx(tp_all.sum() / total)
    if (den > 0).any():
        assert miou == pytest.approx(np.mean(tp_all[den > 0] / den[den > 0]))


def test_matched_miou_of_a_relabelled_truth_is_one():
    target = torch.randint(0, 4, (2, 16, 16), generator=torch.Generator().manual_seed(0))
    relabel = torch.tensor([7, 2, 9, 0])[target]
    c = ds.hungarian_counts(relabel, target, 4)
    assert ds.scores(c["tp"].sum(0), c["fp"].sum(0), c["fn"].sum(0), c["total"].sum()) == (1.0, 1.0)
    # and against the project's IoU-matched mIoU: the same optimum here
    assert ac.metrics.matched_miou(relabel[0], target[0]) == 1.0


# ---------------------------------------------------------------------------------------------
# device
def test_segment_keeps_the_device_under_strict_cuda():
    from attnchain.testing import strict_cuda

    A, truth = ds.planted_attention((8, 8), [20, 44], seed=0)
    with strict_cuda.enabled():
        Ac = A[None].to("cuda")
        levels = [Ac, ds.planted_attention((4, 4), [8, 8])[0][None].to("cuda")]
        agg, grid = ds.aggregate(levels, [(8, 8), (4, 4)])
        for sampler in ds.SAMPLERS:
            seg = ds.segment(agg, grid, sampler=sampler, points=4, size=32)
            assert seg.labels.device.type == "cuda" and seg.labels.shape == (1, 32, 32)
        c = ds.hungarian_counts(seg.labels, torch.zeros(1, 32, 32, dtype=torch.long,
                                                        device="cuda"), 1)
        assert c["total"].tolist() == [1024]
