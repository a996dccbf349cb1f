"""scene-unet: captions, the pipeline's contract, deterministic resumable training, shipped weights."""
from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch

from attnchain.data import scenes as S
from attnchain.zoo import scene_unet as SU
from attnchain.zoo import train_scene_unet as T


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("rgb,name", [((1, 0, 0), "red"), ((1, 0.5, 0), "orange"),
                                      ((1, 1, 0), "yellow"), ((0, 1, 0), "green"),
                                      ((0, 1, 1), "cyan"), ((0, 0, 1), "blue"),
                                      ((0.6, 0, 1), "purple"), ((1, 0, 0.6), "pink"),
                                      ((1, 0, 0.1), "red"), ((0.4, 0.4, 0.45), "grey")])
def test_colour_names(rgb, name):
    assert SU.colour_name(rgb) == name


def test_captions_name_every_object_by_its_colour_and_shape():
    sc = S.generate(40, seed=5, size=32)
    caps = SU.captions(sc)
    for i, cap in enumerate(caps):
        n = int(sc.n_objects[i])
        for k in range(n):
            shape = S.CLASSES[int(sc.labels[i, k])]
            pix = sc.images[i].permute(1, 2, 0)[sc.masks[i] == k + 1].numpy()
            h, s, _ = colorsys.rgb_to_hsv(*np.median(pix, 0))
            assert s > 0.25  # easy scenes: saturated objects
            name = SU.colour_name(np.median(pix, 0))
            article = "an" if name[0] in "aeiou" else "a"
            assert f"{article} {name} {shape}" in cap
        assert cap.count(" and ") == (n > 1) and cap.count(",") == max(0, n - 2)


@pytest.fixture(scope="module")
def small_pipe():
    torch.manual_seed(0)
    return SU.pipeline(SU.make_unet())


def test_pipeline_follows_stable_diffusions_contract(small_pipe):
    pipe = small_pipe
    cond, neg = pipe.encode_prompt(["a red circle", "a blue square"], "cpu", 2, True)
    assert cond.shape == (4, SU.TEXT_LENGTH, 384) and neg.shape == cond.shape
    empty = pipe.encode_prompt("", "cpu", 1, False)
    assert empty[1] is None
    torch.testing.assert_close(neg[0], empty[0][0])      # the negative prompt is the empty one
    torch.testing.assert_close(cond[0], cond[1])          # repeated per image
    img = pipe("a red circle", num_inference_steps=2, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(0))
    assert img.shape == (2, 3, 32, 32) and 0 <= float(img.min()) and float(img.max()) <= 1
    again = pipe("a red circle", num_inference_steps=2, num_images_per_prompt=2,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(img, again)
    assert pipe.vae is None and pipe.vae_scale_factor == 1


def test_training_is_deterministic_and_resumes_identically(tmp_path):
    cfg = T.TrainConfig(steps=4, batch_size=4, chunk_size=8, warmup_steps=2, ckpt_every=2,
                        log_every=2, model={"block_out_channels": [8, 16, 16],
                                            "norm_num_groups": 4})
    whole = T.train(cfg, tmp_path / "a", log=lambda m: None)
    T.train(cfg, tmp_path / "b", log=lambda m: None, stop_after=2)
    resumed = T.train(cfg, tmp_path / "b", log=lambda m: None)
    assert resumed["step"] == whole["step"] == 4
    for (k, a), b in zip(whole["ema"].state_dict().items(), resumed["ema"].state_dict().values()):
        assert torch.equal(a, b), k
    losses = [h["loss"] for h in whole["history"]]
    assert losses == [h["loss"] for h in resumed["history"]]
    x, e = T._Data(cfg, lambda caps: torch.zeros(len(caps), 2)).batch(3)
    assert x.shape == (4, 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_chunk_seeds_never_hit_held_out_scenes():
    seeds = {T.chunk_seed(s, c) for s in range(3) for c in range(0, 10_000, 97)}
    assert S.BENCHMARK_SEED not in seeds and T.VAL_SEED not in seeds


weights = pytest.mark.skipif(not SU.WEIGHTS_FILE.exists(), reason="scene-unet not trained yet")


@weights
def test_shipped_weights_load_and_beat_the_trivial_predictors():
    import attnchain as ac

    assert SU.WEIGHTS_FILE.stat().st_size <= 8 * 2 ** 20
    info = json.loads((SU.WEIGHTS_DIR / "scene_unet.json").read_text())
    assert info["architecture"] == "diffusers.UNet2DConditionModel"
    pipe, pre = ac.zoo.load("scene-unet", device="cpu")
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert info["parameters"] == sum(p.numel() for p in pipe.unet.parameters())
    val = T.validation_loss(pipe.unet, n=16, batch=16, n_stats=512)
    assert val["model"] < val["gaussian"] < val["zero"]
    for part in ("caption", "empty_caption"):
        v = info["validation_loss"][part]
        assert v["model"] < v["gaussian"] < v["zero"]
    lat = pre(S.generate(2, seed=0, size=32).images)
    assert lat.shape == (2, 3, 32, 32) and float(lat.min()) >= -1
