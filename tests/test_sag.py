"""Self-Attention Guidance: exactness against diffusers, the mask rules, the evaluation task."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attnchain as ac
from attnchain.tasks import image_metrics, sag


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_sd():
    from diffusers.models.attention_processor import AttnProcessor

    from attnchain.zoo.tiny_sd import build_tiny_sd
    pipe = build_tiny_sd()
    # diffusers' SAG pipeline swaps the mid block's processor for its classic (bmm) store
    # processor; the same classic processor everywhere makes both UNet calls the same arithmetic
    pipe.unet.set_attn_processor(AttnProcessor())
    return pipe


@pytest.mark.parametrize("prompt,guidance", [("", 1.0), ("a red circle", 3.0)])
def test_column_sum_sampler_equals_diffusers_sag_pipeline(tiny_sd, prompt, guidance):
    import diffusers

    ref = diffusers.StableDiffusionSAGPipeline(**tiny_sd.components)
    ref.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, guidance_scale=guidance, num_images_per_prompt=2)
    want = ref(prompt, sag_scale=0.75, generator=torch.Generator().manual_seed(3),
               output_type="pt", **kw).images
    got = sag.sample(tiny_sd, prompt, rule="column_sum", sag_scale=0.75,
                     generator=torch.Generator().manual_seed(3), **kw)
    torch.testing.assert_close(got["images"], want, rtol=0, atol=1e-6)
    # the guidance acts: without it the images differ
    plain = sag.sample(tiny_sd, prompt, rule=None, generator=torch.Generator().manual_seed(3),
                       **kw)
    assert (plain["images"] - want).abs().max() > 1e-3
    assert torch.isnan(plain["mask_fraction"]).all()
    assert ((got["mask_fraction"] > 0) & (got["mask_fraction"] < 1)).all()


def test_capture_map_is_diffusers_stored_map(tiny_sd):
    """The map capture records is the one diffusers' store processor computes."""
    from diffusers.pipelines.deprecated.stable_diffusion_sag import pipeline_stable_diffusion_sag \
        as P
    unet = tiny_sd.unet
    store = P.CrossAttnStoreProcessor()
    block = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    old = block.processor
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    emb = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))
    try:
        block.processor = store
        with torch.no_grad(), ac.capture(unet, layers=sag.MID_LAYER, weighting="uniform") as rec:
            unet(x, 500, encoder_hidden_states=emb)
    finally:
        block.processor = old
    heads = block.heads
    want = store.attention_probs.reshape(2, heads, 64, 64).mean(1)
    torch.testing.assert_close(rec.attentions[sag.MID_LAYER], want, rtol=0, atol=1e-6)
    assert tuple(rec.tokens[sag.MID_LAYER].grid) == (8, 8)
    m = sag.attention_mask(rec.attentions[sag.MID_LAYER], (8, 8))
    assert torch.equal(m.flatten(1), want.sum(1) > 1)


def _doubly_stochastic(b, heads, n, seed):
    """Head means of permutation matrices: doubly stochastic with exact dyadic entries."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n)
    P = torch.stack([torch.stack([eye[torch.randperm(n, generator=g)] for _ in range(heads)])
                     for _ in range(b)])
    return P.mean(1)


@pytest.mark.parametrize("n,seed", [(16, 0), (64, 1)])
def test_tokenrank_is_uniform_on_doubly_stochastic_chains(n, seed):
    A = _doubly_stochastic(3, 4, n, seed)
    cs = sag.mask_scores(A, "column_sum")
    tr = sag.mask_scores(A, "tokenrank")
    assert torch.equal(cs, torch.ones_like(cs))          # exact: dyadic entries
    torch.testing.assert_close(tr, torch.ones_like(tr), rtol=0, atol=1e-4)
    # nothing stands out under either rule once a tolerance absorbs the solver's rounding
    assert not (cs > 1 + 1e-3).any() and not (tr > 1 + 1e-3).any()


@pytest.mark.parametrize("seed", range(4))
def test_tokenrank_mask_equals_column_sum_mask_on_rank_one_chains(seed):
    """Identical rows ``A = 1 v^T``: column sums are ``N v`` and ``N pi = alpha N v + 1 - alpha``,
    so both rules mask exactly the tokens with ``N v > 1``."""
    g = torch.Generator().manual_seed(seed)
    n = 64
    v = torch.rand(2, n, generator=g) ** 3
    v = v / v.sum(-1, keepdim=True)
    A = v[:, None, :].expand(2, n, n).contiguous()
    keep = ((n * v - 1).abs() > 1e-3)  # away from the threshold
    cs = sag.attention_mask(A, (8, 8), "column_sum").flatten(1)
    tr = sag.attention_mask(A, (8, 8), "tokenrank").flatten(1)
    assert torch.equal(cs[keep], tr[keep])
    assert cs.any() and not cs.all()
    # against a float64 reference of the same rule
    pi = ac.stationary_dense(A.double(), alpha=0.99)
    assert torch.equal(tr[keep], (n * pi > 1)[keep])


def test_tokenrank_mask_differs_on_a_planted_hub_chain():
    """Every token attends to a hub ``a``; ``a`` passes 90 % on to ``b``, which returns it. The
    column sum of ``b`` is 0.9 (only ``a`` attends to it): SAG masks ``a`` alone. The walk
    alternates between ``a`` and ``b``, so TokenRank masks both."""
    n, a, b = 16, 3, 11
    A = torch.zeros(n, n)
    A[:, a] = 0.8
    A[torch.arange(n), torch.arange(n)] += 0.2
    A[a] = 0.0
    A[a, a], A[a, b] = 0.1, 0.9
    A[b] = 0.0
    A[b, a] = 1.0
    ac.check_stochastic(A)
    cs = sag.attention_mask(A[None], (4, 4), "column_sum").flatten()
    tr = sag.attention_mask(A[None], (4, 4), "tokenrank").flatten()
    assert cs.nonzero().flatten().tolist() == [a]
    assert tr.nonzero().flatten().tolist() == [a, b]
    pi = ac.stationary_dense(A.double(), alpha=0.99)
    assert float(n * pi[b]) > 5 and float(A[:, b].sum()) < 1


def test_mask_rules_reject_bad_input():
    A = torch.full((1, 4, 4), 0.25)
    with pytest.raises(ValueError, match="unknown mask rule"):
        sag.mask_scores(A, "median")
    with pytest.raises(ValueError, match="must return"):
        sag.mask_scores(A, lambda A: A)
    with pytest.raises(ValueError, match="grid"):
        sag.attention_mask(A, (3, 3))
    with pytest.raises(ValueError, match="odd"):
        sag.gaussian_blur(torch.zeros(1, 1, 4, 4), kernel_size=4)
    # a callable rule: column sum written by hand
    np.testing.assert_allclose(sag.mask_scores(A, lambda A: A.mean(-2)), sag.mask_scores(A))


def test_gaussian_blur_matches_scipy():
    from scipy import ndimage

    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = sag.gaussian_blur(x, 9, 1.0)
    k = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    k /= k.sum()
    want = ndimage.correlate1d(x.numpy(), k, axis=-1, mode="mirror")
    want = ndimage.correlate1d(want, k, axis=-2, mode="mirror")
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)  # the kernel is float32, as SAG


def _write_reference(folder, n=4):
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # COCO val2017's layout: <id>.jpg, any size
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(
            folder / f"{i:012d}.jpg")
    return folder


def test_full_profile_path_end_to_end_on_the_tiny_pipeline(tmp_path, monkeypatch, capsys):
    """Two shards, a merge, a resume that computes nothing, then `repro sag --profile full`."""
    monkeypatch.setenv("ATTNCHAIN_WEIGHTS", "random")
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "full")
    from attnchain import repro

    out = tmp_path / "out"
    kw = dict(seed=0, num_inference_steps=2, sag_scale=0.75, guidance_scale=1.0)
    pipe = ac.zoo.load("sd15")[0]           # the reduced stand-in under random weights
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    parts = [sag.evaluate("sd15", 3, out, batch_size=2, shard=(i, 2), pipe=pipe, progress=False,
                          **kw) for i in range(2)]
    assert [sorted(p.item.unique()) for p in parts] == [[0, 2], [1]]
    sag._runner_of(out, "sd15", kw).merge()

    def boom(*a, **k):
        raise AssertionError("a finished sample was computed again")
    monkeypatch.setattr(sag, "sample", boom)
    again = sag.evaluate("sd15", 3, out, batch_size=2, pipe=pipe, progress=False, **kw)
    assert sorted(again.item.unique()) == [0, 1, 2]
    imgs = sag.load_images(again, out, "sag", **kw)
    assert imgs.shape == (3, 3, 32, 32) and imgs.dtype == torch.uint8
    ref = _write_reference(tmp_path / "coco" / "val2017")
    repro.main(["sag", "--profile", "full", "--samples", "3", "--steps", "2", "--batch-size", "2",
                "--reference", str(ref), "--n-reference", "4", "--n-boot", "3", "--out", str(out),
                "--no-progress"])
    text = capsys.readouterr().out
    assert "profile full" in text and "sag_tokenrank - sag" in text and "16.32" in text
    # the one-file export of the run: the same images, the per-sample table, the settings
    res = sag.load_results(out / "sag_full_sd15_n3_steps2.npz")
    assert res["items"] == [0, 1, 2] and res["settings"]["steps"] == 2
    assert torch.equal(res["images"]["sag"], imgs)
    frac = again[(again.metric == "mask_fraction") & (again.method == "sag_tokenrank")]
    np.testing.assert_array_equal(
        res["table"].query("metric == 'mask_fraction' and method == 'sag_tokenrank'").value,
        frac.sort_values("item").value)
    monkeypatch.undo()
    monkeypatch.setenv("ATTNCHAIN_WEIGHTS", "random")
    # a file that does not hold what the sampler draws is caught
    res["images"]["sag"][1] ^= 1
    diff = sag.check_results(res, [1], pipe=pipe)
    assert diff["none"] == diff["sag_tokenrank"] == (0, 0.0) and diff["sag"] == (1, 1.0)


def test_metrics_table_against_torchmetrics_and_a_hand_fid():
    """The set metrics are torchmetrics' on the given features; FID checked by hand (scipy)."""
    from scipy import linalg

    g = torch.Generator().manual_seed(0)
    real = {"pool": torch.randn(60, 5, generator=g, dtype=torch.float64)}
    fake = {"pool": torch.randn(40, 5, generator=g, dtype=torch.float64) + 0.5,
            "logits": torch.randn(40, 3, generator=g, dtype=torch.float64),
            "valid": (torch.rand(40, generator=g) > 0.3).double()}
    other = {k: v.clone() for k, v in fake.items()}
    table, diffs = sag.metrics_table({"none": fake, "sag": other}, real, n_boot=4)
    r, f = real["pool"].numpy(), fake["pool"].numpy()
    c1, c2 = np.cov(r, rowvar=False), np.cov(f, rowvar=False)
    fid = ((r.mean(0) - f.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert abs(table.loc["none", "FID"] - fid) < 1e-6
    # the fast exact FID of the bootstrap resamples equals torchmetrics' (n < d and n > d)
    from torchmetrics.image.fid import FrechetInceptionDistance
    for n, d in ((7, 12), (40, 5)):
        r = torch.randn(50, d, generator=g, dtype=torch.float64)
        x = torch.randn(n, d, generator=g, dtype=torch.float64) * 1.5 + 0.3
        tm = FrechetInceptionDistance(feature=image_metrics._Given(d))
        tm.update(r, real=True)
        tm.update(x, real=False)
        assert abs(image_metrics._FrechetToReference(r)(x) - float(tm.compute())) < 1e-6
    assert table.loc["none", "FID low"] <= table.loc["none", "FID high"]
    assert abs(table.loc["none", "valid"] - float(fake["valid"].mean())) < 1e-12
    # identical samples: every paired difference is exactly zero
    assert (diffs.loc["sag"].abs() < 1e-9).all()


def test_shipped_offline_results_are_what_the_sampler_draws():
    """Chapter 10's table is computed from the committed samples of `repro sag --profile
    offline`: a fresh random sample of them is drawn again and must be the same images."""
    res = sag.load_results()
    st = res["settings"]
    assert st["model"] == "scene-unet" and st["methods"] == sag.METHODS and st["prompt"] == ""
    assert res["items"] == list(range(len(res["items"]))) and len(res["items"]) >= 200
    assert all(v.shape == (len(res["items"]), 3, 32, 32) for v in res["images"].values())
    items = sorted(int(i) for i in np.random.default_rng().choice(res["items"], 2, replace=False))
    diff = sag.check_results(res, items)
    # drawn in batches of 25 there, of 2 here: float32 rounding moves a rare value by one level
    assert all(d <= 1 and frac < 2e-3 for d, frac in diff.values()), (items, diff)
