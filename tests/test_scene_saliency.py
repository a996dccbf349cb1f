import numpy as np
import pytest
import torch

from attnchain import chain, metrics, spectral
from attnchain.capture.recorder import TokenLayout
from attnchain.data import scenes
from attnchain.tasks import segmentation as seg


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
    maps, states = seg.saliency_maps(A, lay, n_max=3)
    img = list(lay.image)
    for w, M in (("uniform", A.mean(1)), ("lambda2", spectral.weighted_head_mean(A, head_dim=1))):
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
        pi = chain.stationary_dense(M64)[:, img]
        assert torch.allclose(maps[f"tokenrank/{w}"].flatten(1).double(), pi, atol=1e-4)
        assert states[w].shape == (3, 4, 4)
        fg = maps[f"metastable/{w}"]
        assert set(fg.unique().tolist()) <= {0.0, 1.0}
    maps2, _ = seg.saliency_maps(A, lay, n_max=3, lam2=spectral.lambda2(A))
    for k in maps:
        assert torch.allclose(maps[k], maps2[k], atol=1e-5), k


def test_saliency_maps_bad_input():
    lay = _layout(True)
    with pytest.raises(ValueError, match="tokens"):
        seg.saliency_maps(_attention(1, 1, 10), lay)
    with pytest.raises(ValueError, match="shape"):
        seg.saliency_maps(torch.rand(4, 17, 17), lay)
    with pytest.raises(ValueError, match="weighting"):
        seg.head_mean(_attention(1, 2, 5), "max")


def test_metastable_finds_planted_blocks():
    # block-diagonal chain on a 4x4 grid: left half (background, touches the border) / 2x2 centre
    lab = torch.zeros(4, 4, dtype=torch.long)
    lab[1:3, 1:3] = 1
    lab = lab.flatten()
    same = (lab[:, None] == lab[None, :]).double()
    A = (same * 0.98 + 0.02 / 16)
    A = (A / A.sum(-1, keepdim=True))[None, None].float()
    maps, states = seg.saliency_maps(A, _layout(False), n_max=1, k_states=2)
    assert torch.equal(maps["metastable/uniform"].flatten().long(), lab)


def test_upsample_and_score_maps():
    m = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]])
    near = seg.upsample(m, (4, 4), "nearest")
    assert torch.equal(near[0, :2, 2:], torch.ones(2, 2)) and near.sum() == 4
    bil = seg.upsample(m, (4, 4), "bilinear")
    assert bil.shape == (1, 4, 4) and float(bil[0, 0, 3]) == pytest.approx(1.0)
    fg = near.bool()
    sc = seg.score_maps(near, fg)
    assert sc["ap"][0] == pytest.approx(1.0) and sc["iou_best"][0] == 1.0
    assert sc["iou_otsu"][0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="mode"):
        seg.upsample(m, (4, 4), "cubic")


def test_object_iou_and_patch_objects():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 1  # object 1 = patch (0, 0) exactly
    masks[0, 4:8, 4:6] = 2  # object 2 = half of patch (1, 1)
    po = seg.patch_objects(masks, 4)
    assert po.tolist() == [[[1, 0], [0, 0]]]
    states = torch.tensor([[[0, 1], [1, 2]]])
    # object 1: state 0 covers it exactly -> 1; object 2 (8 px): state 2 (16 px) -> 8 / 16
    assert seg.object_iou(states, masks)[0] == pytest.approx((1 + 0.5) / 2)
    # brute force against metrics.iou on pixels
    up = seg.upsample(states, (8, 8), "nearest").long()[0]
    ref = np.mean([max(metrics.iou((up == s).numpy(), (masks[0] == o).numpy()) for s in range(3))
                   for o in (1, 2)])
    assert seg.object_iou(states, masks)[0] == pytest.approx(ref)


def test_retention_local_kernel_matches_itself():
    grid = (6, 6)
    sig = torch.tensor([0.8])
    K = seg._gaussian_kernel(grid, sig).float()
    objects = torch.zeros(1, 6, 6, dtype=torch.long)
    objects[0, 1:4, 1:4] = 1
    r = seg.retention(K, objects, grid)
    assert r["sigma"][0] == pytest.approx(0.8, rel=1e-3)
    assert r["retention"][0] == pytest.approx(r["kernel_retention"][0], rel=1e-3)
    # a chain that stays exactly inside objects retains everything
    lab = objects.flatten(1)[0]
    same = (lab[:, None] == lab[None, :]).float()
    r2 = seg.retention((same / same.sum(-1, keepdim=True))[None], objects, grid)
    assert r2["retention"][0] == pytest.approx(1.0)
    assert r2["kernel_retention"][0] < 1.0
    # brute force of the kernel's mean distance
    d = np.array([[np.hypot(i // 6 - j // 6, i % 6 - j % 6) for j in range(36)] for i in range(36)])
    Kn = K[0].double().numpy()
    assert float(seg.kernel_mean_distance(grid, 0.8)[0]) == pytest.approx((Kn * d).sum(1).mean())


class _Stop(Exception):
    pass


def test_evaluate_caches_and_resumes(tmp_path, monkeypatch):
    kw = dict(n=6, batch_size=3, progress=False)
    full = seg.evaluate("feature-attention", "easy", cache_path=None, **kw)
    assert len(full) == 6 and full["scene"].tolist() == list(range(6))
    assert {"row_cls/uniform/ap"}.isdisjoint(full.columns)
    assert "bounce_2/lambda2/ap" in full.columns and "retention/uniform/retention" in full.columns

    calls = []
    real = seg._batch_results

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Stop  # interrupted after the first batch
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "_batch_results", interrupted)
    with pytest.raises(_Stop):
        seg.evaluate("feature-attention", "easy", cache_path=tmp_path, **kw)
    files = list(tmp_path.glob("*.jsonl"))
    assert len(files) == 1 and len(files[0].read_text().splitlines()) == 3

    calls.clear()
    monkeypatch.setattr(seg, "_batch_results", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = seg.evaluate("feature-attention", "easy", cache_path=tmp_path, **kw)
    assert len(calls) == 1  # only the second batch was computed
    num = full.select_dtypes("number").columns
    np.testing.assert_allclose(resumed[num].to_numpy(float), full[num].to_numpy(float), atol=1e-6)
    calls.clear()
    seg.evaluate("feature-attention", "easy", cache_path=tmp_path, **kw)
    assert calls == []  # all cached

    table = seg.summarise(resumed, "ap")
    assert table.loc["gt_grid", "-"] > table.loc["centre_prior", "-"]
    with pytest.raises(ValueError, match="level"):
        seg.evaluate("feature-attention", "extreme", n=2)


def test_evaluate_scene_vit_has_cls_rows():
    df = seg.evaluate("scene-vit", "easy", n=4, batch_size=4, progress=False)
    np.testing.assert_allclose(df["row_cls/uniform/ap"], df["bounce_1/uniform/ap"])
    assert (df["gt_grid/-/ap"] > 0.5).all()
    assert df.filter(like="lambda2/h").shape[1] == 3


def test_whole_image_preprocess_tiny_timm():
    import attnchain

    net, _ = attnchain.zoo.load("tiny-timm-vit")
    pre = seg.whole_image_preprocess(net)
    x = pre(scenes.benchmark("easy", n=2).images)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    assert tuple(x.shape) == (2, 3, *net.patch_embed.img_size)
    const = pre(torch.full((1, 3, 64, 64), 0.5))
    ref = (0.5 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert torch.allclose(const[0, :, 3, 3], ref, atol=1e-5)
    df = seg.evaluate("tiny-timm-vit", "easy", n=2, batch_size=2, progress=False,
                      model=(net, pre))
    assert "row_cls/uniform/ap" in df.columns
