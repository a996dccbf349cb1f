"""Scene saliency (chapter 7's task): maps against direct computations, the evaluation's table,
resume after an interrupted run (issue 17), locality against brute force."""
import numpy as np
import pytest
import torch

import attnchain as ac
from attnchain import metrics
from attnchain.capture.recorder import TokenLayout
from attnchain.data import scenes
from attnchain.tasks import locality, readouts
from attnchain.tasks import scene_saliency as ss
from attnchain.tasks.preprocess import whole_image_preprocess


def _layout(cls: bool, grid=(4, 4)):
    n_img = grid[0] * grid[1]
    if cls:
        return TokenLayout(n=n_img + 1, cls=(0,), image=tuple(range(1, n_img + 1)), grid=grid)
    return TokenLayout(n=n_img, image=tuple(range(n_img)), grid=grid)


def _attention(B, H, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(B, H, N, N, generator=g), -1)


@pytest.mark.parametrize("cls", [True, False])
def test_saliency_maps_against_direct_computation(cls):
    lay = _layout(cls)
    A = _attention(3, 2, lay.n)
    maps, states = ss.saliency_maps(A, lay, max_bounces=3)
    img = list(lay.image)
    for w, M in (("uniform", A.mean(1)), ("lambda2", ac.head_mean(A, "lambda2"))):
        M64 = M.double()
        assert torch.allclose(maps[f"column_sum/{w}"].flatten(1).double(), M64[:, :, img].sum(1),
                              atol=1e-5)
        v0 = torch.zeros(3, lay.n, dtype=torch.float64)
        if cls:
            v0[:, 0] = 1
            assert torch.allclose(maps[f"row_cls/{w}"].flatten(1).double(), M64[:, 0, img], atol=1e-5)
        else:
            v0[:] = 1 / lay.n
            assert f"row_cls/{w}" not in maps
        for n in range(1, 4):
            ref = (v0[:, None] @ torch.linalg.matrix_power(M64, n))[:, 0, img]
            assert torch.allclose(maps[f"bounce_{n}/{w}"].flatten(1).double(), ref, atol=1e-5)
        pi = ac.stationary_dense(M64)[:, img]
        assert torch.allclose(maps[f"tokenrank/{w}"].flatten(1).double(), pi, atol=1e-4)
        assert states[w].shape == (3, 4, 4)
        fg = maps[f"metastable/{w}"]
        assert set(fg.unique().tolist()) <= {0.0, 1.0}
    maps2, _ = ss.saliency_maps(A, lay, max_bounces=3, lam2=ac.lambda2(A))
    for k in maps:
        assert torch.equal(maps[k], maps2[k]), k  # precomputed |λ2|: the same weights exactly


def test_saliency_maps_bad_input():
    lay = _layout(True)
    with pytest.raises(ValueError, match="tokens"):
        ss.saliency_maps(_attention(1, 1, 10), lay)
    with pytest.raises(ValueError, match="shape"):
        ss.saliency_maps(torch.rand(4, 17, 17), lay)
    with pytest.raises(ValueError, match="weighting"):
        ss.saliency_maps(_attention(1, 2, 17), lay, weightings=("max",))


def test_metastable_finds_planted_blocks():
    # block-diagonal chain on a 4x4 grid: left half (background, touches the border) / 2x2 centre
    lab = torch.zeros(4, 4, dtype=torch.long)
    lab[1:3, 1:3] = 1
    lab = lab.flatten()
    same = (lab[:, None] == lab[None, :]).double()
    A = (same * 0.98 + 0.02 / 16)
    A = (A / A.sum(-1, keepdim=True))[None, None].float()
    maps, states = ss.saliency_maps(A, _layout(False), max_bounces=1, k_states=2)
    assert torch.equal(maps["metastable/uniform"].flatten().long(), lab)


def test_retention_local_kernel_matches_itself():
    grid = (6, 6)
    sig = torch.tensor([0.8])
    K = locality.gaussian_kernel(grid, sig).float()
    objects = torch.zeros(1, 6, 6, dtype=torch.long)
    objects[0, 1:4, 1:4] = 1
    r = locality.retention(K, objects, grid)
    assert r["sigma"][0] == pytest.approx(0.8, rel=1e-3)
    assert r["retention"][0] == pytest.approx(r["kernel_retention"][0], rel=1e-3)
    # a chain that stays exactly inside objects retains everything
    lab = objects.flatten(1)[0]
    same = (lab[:, None] == lab[None, :]).float()
    r2 = locality.retention((same / same.sum(-1, keepdim=True))[None], objects, grid)
    assert r2["retention"][0] == pytest.approx(1.0)
    assert r2["kernel_retention"][0] < 1.0
    # brute force of the kernel's mean distance
    d = np.array([[np.hypot(i // 6 - j // 6, i % 6 - j % 6) for j in range(36)] for i in range(36)])
    Kn = K[0].double().numpy()
    assert float(locality.kernel_mean_distance(grid, 0.8)[0]) == pytest.approx((Kn * d).sum(1).mean())


def test_kernel_mean_distance_chunks_are_exact(monkeypatch):
    sig = torch.logspace(-1, 1, 37, dtype=torch.float64)
    whole = locality.kernel_mean_distance((5, 7), sig)
    monkeypatch.setattr(locality, "KERNEL_CHUNK_BYTES", 3 * 35 * 35 * 8)  # 3 kernels a chunk
    assert torch.equal(locality.kernel_mean_distance((5, 7), sig), whole)


def _wide(t):
    return t.pivot(index="item", columns=["method", "weighting", "metric"], values="value")


def test_evaluate_long_table_and_summary():
    t = ss.evaluate("feature-attention", "easy", n=4, batch_size=2, progress=False)
    assert list(t.columns) == ["model", "level", "item", "layer", "method", "weighting",
                               "metric", "value"]
    assert sorted(t["item"].unique()) == [0, 1, 2, 3] and set(t.model) == {"feature-attention"}
    methods = set(t.method)
    assert "row_cls" not in methods and {"bounce_2", "retention", "h0", "scene"} <= methods
    assert set(t.weighting) == {"uniform", "lambda2", "-"}
    w = _wide(t)
    sc = scenes.benchmark("easy", n=4)
    np.testing.assert_array_equal(w[("scene", "-", "n_objects")], sc.n_objects.numpy())
    table = ss.summarise(t, "ap")
    assert table.loc["gt_grid", "-"] > table.loc["centre_prior", "-"]
    assert table.loc["bounce_2", "lambda2"] == pytest.approx(w[("bounce_2", "lambda2", "ap")].mean())
    with pytest.raises(ValueError, match="metric"):
        ss.summarise(t, "nope")
    with pytest.raises(ValueError, match="level"):
        ss.evaluate("feature-attention", "extreme", n=2)


class _Counting:
    """A preprocess that counts the batches the model sees."""

    def __init__(self, pre):
        self.pre, self.calls = pre, 0

    def __call__(self, images):
        self.calls += 1
        return self.pre(images)


def _tear_last_line(folder):
    """An interrupted write: the last line of the results file cut in its middle."""
    (file,) = folder.glob("*.jsonl")
    raw = file.read_bytes()
    start = raw.rstrip(b"\n").rfind(b"\n") + 1
    file.write_bytes(raw[: start + (len(raw) - start) // 2])
    return file


def test_interrupted_write_costs_one_recomputation(tmp_path):
    """Issue 17, "resume that does not heal": a torn last line left by an interrupted run must
    cost exactly one recomputation, after which the results are complete.

    (The code before the runner appended new rows onto the torn fragment and stopped reading
    there, so every later run recomputed the same batch; this test fails on it at the third run.)
    """
    net, pre = ac.zoo.load("feature-attention")
    counting = _Counting(pre)
    kw = dict(n=6, batch_size=3, progress=False, model=(net, counting))
    first = ss.evaluate("feature-attention", "easy", results_dir=tmp_path, **kw)
    assert counting.calls == 2
    _tear_last_line(tmp_path)
    counting.calls = 0
    second = ss.evaluate("feature-attention", "easy", results_dir=tmp_path, **kw)
    assert counting.calls == 1  # the interrupted batch, once
    counting.calls = 0
    third = ss.evaluate("feature-attention", "easy", results_dir=tmp_path, **kw)
    assert counting.calls == 0  # complete: nothing is computed again
    for t in (second, third):
        assert t["value"].equals(first["value"]) or np.allclose(t["value"], first["value"],
                                                                equal_nan=True, atol=0)


def test_evaluate_scene_vit_has_cls_rows():
    t = ss.evaluate("scene-vit", "easy", n=4, batch_size=4, progress=False)
    w = _wide(t)
    np.testing.assert_array_equal(w[("row_cls", "uniform", "ap")], w[("bounce_1", "uniform", "ap")])
    assert (w[("gt_grid", "-", "ap")] > 0.5).all()
    assert sum(m.startswith("h") for m in set(t.method)) == 3


def test_whole_image_preprocess_tiny_timm():
    net, _ = ac.zoo.load("tiny-timm-vit")
    pre = whole_image_preprocess(net)
    x = pre(scenes.benchmark("easy", n=2).images)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    assert tuple(x.shape) == (2, 3, *net.patch_embed.img_size)
    const = pre(torch.full((1, 3, 64, 64), 0.5))
    ref = (0.5 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert torch.allclose(const[0, :, 3, 3], ref, atol=1e-5)
    t = ss.evaluate("tiny-timm-vit", "easy", n=2, batch_size=2, progress=False, model=(net, pre))
    assert "row_cls" in set(t.method)


def test_scores_of_upsampled_maps():
    m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    near = readouts.upsample(m, (4, 4), "nearest")
    sc = metrics.foreground_scores(near, near.bool())
    assert sc["ap"][0] == pytest.approx(1.0) and sc["iou_best"][0] == 1.0
    assert sc["iou_otsu"][0] == pytest.approx(1.0)


def test_evaluate_on_a_grid_that_does_not_divide_the_scene():
    """A ViT whose 5 x 5 grid does not divide the 64-pixel scenes (as DINOv2's 37 x 37)."""
    import timm

    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=70, patch_size=14,
                            depth=1, num_classes=0).eval()
    pre = whole_image_preprocess(net)
    t = ss.evaluate("grid-5x5", "easy", n=3, batch_size=3, progress=False, model=(net, pre))
    w = _wide(t)
    fg = scenes.benchmark("easy", n=3).masks > 0
    ceiling = readouts.upsample(scenes.mask_to_grid(fg, (5, 5)).float(), (64, 64), "bilinear")
    np.testing.assert_allclose(w[("gt_grid", "-", "ap")].to_numpy(),
                               metrics.foreground_scores(ceiling, fg)["ap"], rtol=1e-6)
    assert (w[("gt_grid", "-", "ap")] < 1).all()  # a 5 x 5 grid cannot draw the pixel mask
    assert np.isfinite(w[("retention", "uniform", "retention")].astype(float)).any()
