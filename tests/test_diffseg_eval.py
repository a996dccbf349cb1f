"""DiffSeg as an evaluation: the COCO-Stuff-27 loader on files written in the real formats, the
Stable Diffusion attention path (16 maps on 4 levels), the distance-matched kernel, the summaries
against a direct pooled computation, and the full-profile code path end to end on the tiny UNet
twin with resume and a two-shard merge."""
import numpy as np
import pytest
import torch
from PIL import Image

from attnchain.data import coco_stuff as cs
from attnchain.tasks import diffseg_eval as de
from attnchain.tasks import locality


# ---------------------------------------------------------------------------------------------
# COCO-Stuff-27
def test_the_182_to_27_mapping():
    assert len(cs.FINE) == 182 and len(cs.COARSE) == 27 and len(set(cs.FINE)) == 182
    per = np.bincount(cs.FINE_TO_COARSE, minlength=27)
    # COCO's supercategories (things with the 11 unused ids) and COCO-Stuff's stuff groups
    expected = {"person": 1, "vehicle": 8, "outdoor": 6, "animal": 10, "accessory": 8,
                "sports": 10, "kitchen": 8, "food-things": 10, "furniture-things": 10,
                "electronic": 6, "appliance": 6, "indoor": 8, "wall": 7, "sky": 2}
    for name, count in expected.items():
        assert per[cs.COARSE.index(name)] == count, name
    assert per[:12].sum() == 91 and per[12:].sum() == 91
    lab = cs.to_coarse(torch.tensor([[0, 255], [cs.FINE.index("sky-other"), 90]]))
    assert lab.tolist() == [[cs.COARSE.index("person"), -1],
                            [cs.COARSE.index("sky"), cs.COARSE.index("indoor")]]
    with pytest.raises(ValueError, match="fine labels"):
        cs.to_coarse(torch.tensor([182]))


def test_loader_reads_the_written_format_and_crops_like_diffseg(tmp_path):
    ids = cs.write_sample(tmp_path, n=2, shape=(30, 50))
    ds_ = cs.CocoStuff27(tmp_path, size=20)
    assert ds_.ids == ids and len(ds_) == 2
    image, label = ds_[1]
    raw = np.asarray(Image.open(tmp_path / "val2017" / f"{ids[1]}.jpg").convert("RGB"))
    fine = np.asarray(Image.open(tmp_path / "annotation_val2017" / f"{ids[1]}.png"))
    crop = fine[:, 10:40]                                   # centre 30 x 30 of 30 x 50
    rows = np.floor((np.arange(20) + 0.5) * 30 / 20).astype(int)
    expected = np.array(cs.FINE_TO_COARSE + (-1,))[np.where(crop == 255, 182, crop)]
    np.testing.assert_array_equal(label.numpy(), expected[rows][:, rows])
    up = torch.nn.functional.interpolate(
        torch.from_numpy(raw[:, 10:40].copy()).permute(2, 0, 1)[None].float(), size=(20, 20),
        mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(image, up)
    with pytest.raises(FileNotFoundError, match="download"):
        cs.CocoStuff27(tmp_path / "nothing")


def test_download_fetches_images_and_extracts_maps_from_the_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    ids = cs.write_sample(src, n=3, shape=(16, 24), maps_archive=True)
    root = tmp_path / "root"
    root.mkdir()
    (root / cs.CURATED_LIST).write_text((src / cs.CURATED_LIST).read_text())
    fetched = []

    def fake_fetch(url, target):
        fetched.append(url)
        name = url.rsplit("/", 1)[-1]
        origin = src / ("val2017/" + name if name.endswith(".jpg") else name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(origin.read_bytes())

    monkeypatch.setattr(cs, "_fetch", fake_fetch)
    cs.download(root, limit=2, progress=False)
    assert fetched == [cs.IMAGE_URL.format(i) for i in ids[:2]] + [cs.MAPS_URL]
    assert sorted(p.stem for p in (root / "annotation_val2017").iterdir()) == ids[:2]
    fetched.clear()
    cs.download(root, limit=2, progress=False)               # cached: nothing fetched again
    assert fetched == []
    # a downloaded list that is not DiffSeg's is refused
    (tmp_path / "other").mkdir()
    monkeypatch.setattr(cs, "_fetch", lambda url, target: target.write_text("000000000001\n"))
    with pytest.raises(ValueError, match="curated list"):
        cs.download(tmp_path / "other", progress=False)


# ---------------------------------------------------------------------------------------------
# attention
def test_stable_diffusion_path_reads_16_maps_on_4_levels(monkeypatch):
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "full")
    monkeypatch.setenv("ATTNCHAIN_WEIGHTS", "random")
    import attnchain as ac

    pipe, pre = ac.zoo.load("sd14", device="cpu")
    images = torch.rand(2, 3, 64, 64)
    maps, grids = de.self_attention(pipe, pre, images)
    assert len(maps) == 16
    assert sorted(set(grids), reverse=True) == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [grids.count(g) for g in [(8, 8), (4, 4), (2, 2), (1, 1)]] == [5, 5, 5, 1]
    # the latent is the VAE posterior mean, scaled; the UNet sees t = 300 and the empty prompt
    seen = {}
    hook = pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.update(sample=a[0], t=a[1], text=kw["encoder_hidden_states"]),
        with_kwargs=True)
    try:
        de.self_attention(pipe, pre, images)
    finally:
        hook.remove()
    with torch.no_grad():
        mean = pipe.vae.encode(images * 2 - 1).latent_dist.mean * 0.18215
        empty = pipe.encode_prompt("", "cpu", 1, False)[0]
    torch.testing.assert_close(seen["sample"], mean)
    assert int(seen["t"]) == 300
    torch.testing.assert_close(seen["text"], empty.expand(2, -1, -1))


def test_distance_kernel_matches_the_mean_distance():
    g = torch.Generator().manual_seed(0)
    s = torch.logspace(-1, 1.5, 7, dtype=torch.float64)
    torch.testing.assert_close(de.kernel_mean_distance((6, 9), s),
                               locality.kernel_mean_distance((6, 9), s))
    d = locality.grid_distances((6, 8)).float()
    # attention with a local bump on a flat floor, and a sharper random one
    bump = 0.9 / 48 + 0.1 * locality.gaussian_kernel((6, 8), torch.tensor([1.0])).float()
    A = torch.cat([bump, torch.softmax(2 * torch.randn(2, 48, 48, generator=g), -1)])
    for match in de.KERNEL_MATCHES:
        K, sigma, w = de.distance_kernel(A, (6, 8), match=match)
        torch.testing.assert_close(K.sum(-1), torch.ones(3, 48))
        mean_d = (A * d).sum(-1).mean(-1)
        torch.testing.assert_close((K * d).sum(-1).mean(-1)[:1], mean_d[:1], rtol=2e-3,
                                   atol=1e-4)
        if match == "distance":
            assert (w == 1).all()
    K, sigma, w = de.distance_kernel(A[:1], (6, 8))
    assert abs(float(w[0]) - 0.1) < 0.02 and abs(float(sigma[0]) - 1.0) < 0.1  # the mixture
    flat, _, _ = de.distance_kernel(A[:1], (6, 8), match="distance")
    H = lambda P: float(-(P * P.log()).sum(-1).mean())                         # noqa: E731
    assert abs(H(K) - H(A[:1])) < 2e-3 < abs(H(flat) - H(A[:1]))   # entropy matched, not flat


# ---------------------------------------------------------------------------------------------
# the task
def test_offline_evaluation_and_the_pooled_summary():
    t = de.evaluate("feature-attention", "scenes-easy", n=6, points=8, threshold=0.5,
                    samplers=("grid", "tokenrank"), control=True, batch_size=3, progress=False)
    assert set(t.chain) == {"attention", "kernel"} and t.item.nunique() == 6
    s = de.summarise(t, n_boot=200)
    for key in s.index:
        sub = t[(t.chain == key[0]) & (t.method == key[1])]
        tot = {m: sub[sub.metric == m].value.sum() for m in sub.metric.unique()}
        tp = np.array([tot[f"tp/{c}"] for c in range(5)])
        fp = np.array([tot[f"fp/{c}"] for c in range(5)])
        fn = np.array([tot[f"fn/{c}"] for c in range(5)])
        den = tp + fp + fn
        assert s.loc[key, "acc"] == pytest.approx(tp.sum() / tot["total"])
        assert s.loc[key, "miou"] == pytest.approx(np.mean(tp[den > 0] / den[den > 0]))
        assert s.loc[key, "acc_low"] <= s.loc[key, "acc"] <= s.loc[key, "acc_high"]
    v = de.versus(t, ("attention", "tokenrank"), ("attention", "grid"), n_boot=200)
    assert v.loc["acc", "diff"] == pytest.approx(
        s.loc[("attention", "tokenrank"), "acc"] - s.loc[("attention", "grid"), "acc"])
    with pytest.raises(ValueError, match="samplers"):
        de.evaluate("feature-attention", n=2, samplers=("kmeans",), progress=False)


def test_threshold_is_chosen_on_validation_scenes():
    best, sweep = de.tune_threshold("feature-attention", n=8, thresholds=(0.05, 0.5, 5.0),
                                    batch_size=8)
    assert set(best) == {"attention", "kernel"}
    att = sweep[sweep.chain == "attention"]
    assert best["attention"] == att.sort_values("miou").threshold.iloc[-1]
    assert (sweep[sweep.threshold == 5.0].segments == 1).all()   # everything merges


def test_full_profile_code_path_on_the_tiny_unet_twin(tmp_path, monkeypatch):
    cs.write_sample(tmp_path / "coco", n=5, shape=(40, 56))
    kw = dict(dataset="coco-stuff-27", data_root=tmp_path / "coco", size=64,
              samplers=("grid", "tokenrank"), control=True, batch_size=2, progress=False)
    whole = de.evaluate("tiny-unet", **kw)
    assert whole.item.nunique() == 5 and set(whole.method) == {"grid", "tokenrank"}
    assert set(whole.chain) == {"attention", "kernel"}
    de.evaluate("tiny-unet", n=3, results_dir=tmp_path / "r", **kw)        # stopped after 3
    computed = []
    real = de._batch_rows
    monkeypatch.setattr(de, "_batch_rows",
                        lambda net, pre, src, items, st: computed.append(list(items))
                        or real(net, pre, src, items, st))
    resumed = de.evaluate("tiny-unet", results_dir=tmp_path / "r", **kw)
    assert computed == [[3, 4]]                    # only the images not yet in the file
    monkeypatch.setattr(de, "_batch_rows", real)
    np.testing.assert_array_equal(resumed.value, whole.value)
    for i in range(2):
        de.evaluate("tiny-unet", results_dir=tmp_path / "s", shard=(i, 2), **kw)
    merged = de.evaluate("tiny-unet", results_dir=tmp_path / "s", **kw)
    assert not list((tmp_path / "s").glob("*.shard-*"))
    np.testing.assert_array_equal(merged.value, whole.value)


def test_repro_prints_the_paper_beside_ours(capsys):
    from attnchain.repro import main

    main(["diffseg", "--profile", "offline", "--models", "feature-attention", "--n", "3",
          "--threshold", "0.5", "--samplers", "grid", "tokenrank", "--no-progress",
          "--no-control", "--out", "/tmp/attnchain-test-diffseg"])
    out = capsys.readouterr().out
    assert "84.97" in out and "72.50" in out and "symmetric KL threshold 0.5" in out
    assert "attention/tokenrank vs attention/grid" in out
