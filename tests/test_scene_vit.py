"""scene-vit: the shipped small timm ViT, its preprocessing, and its training script."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from attnchain.data import scenes as S
from attnchain.zoo import scene_vit as SV
from attnchain.zoo import train_scene_vit as T

TINY = dict(embed_dim=32, depth=1, num_heads=2, mlp_ratio=2.0, drop_path_rate=0.0)


def _tiny_cfg(**kw):
    base = dict(steps=40, batch_size=32, lr=3e-3, warmup_steps=5, chunk_size=256, chunk_reuse=2,
                ckpt_every=0, eval_every=0, threads=1, model=TINY)
    base.update(kw)
    return T.TrainConfig(**base)


@pytest.fixture(scope="module")
def shipped():
    return SV.build()


# ---------------------------------------------------------------------------------------------
# the shipped model


def test_build_offline_loads_timm_vit(shipped):
    model, preprocess = shipped
    info = SV.report()
    assert isinstance(model, VisionTransformer)
    assert not model.training
    assert SV.WEIGHTS_FILE.stat().st_size <= 5 * 2**20
    assert model.num_prefix_tokens == 1 and model.patch_embed.grid_size == (8, 8)
    assert info["classes"] == list(S.CLASSES)
    for key in ("config", "seed", "training_wall_time_s", "benchmark", "split200"):
        assert key in info
    assert info["training_wall_time_s"] <= 60 * 60
    x = preprocess(torch.rand(3, 64, 64))
    assert x.shape == (1, 3, 64, 64)
    assert model(x).shape == (1, len(S.CLASSES))
    head = SV.load_patch_head()
    feats = model.forward_features(x)[:, model.num_prefix_tokens:]
    assert head(feats).shape == (1, 64, len(S.CLASSES) + 1)


def test_reported_accuracy_reproduces_on_fixed_split(shipped):
    model, preprocess = shipped
    info = SV.report()
    split = S.benchmark("easy", n=200)
    with torch.no_grad():
        prob = torch.sigmoid(model(preprocess(split.images)))  # the public preprocess path
    y = split.presence
    pred = (prob > 0.5).float()
    per_label = float((pred == y).float().mean())
    exact = float((pred == y).all(1).float().mean())
    reported = info["split200"]["model"]
    assert per_label == pytest.approx(reported["per_label_accuracy"], abs=0.005)
    assert exact == pytest.approx(reported["exact_match_accuracy"], abs=0.01)
    # the trivial baseline, refitted here on training labels, is what the JSON says it is
    train_presence = S.generate(512, T.chunk_seed(info["seed"], 0), "easy").presence
    triv = T.trivial_baselines(train_presence, y)
    assert triv["per_label_accuracy"] == pytest.approx(
        info["split200"]["trivial"]["per_label_accuracy"], abs=0.01)
    assert per_label > triv["per_label_accuracy"]


def test_preprocess_accepts_every_image_kind(shipped):
    from PIL import Image

    _, preprocess = shipped
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    ref = preprocess(torch.from_numpy(u8).permute(2, 0, 1).float() / 255)
    kinds = (u8, u8.astype(np.float32) / 255, Image.fromarray(u8),
             torch.from_numpy(u8).permute(2, 0, 1))
    for img in kinds:
        out = preprocess(img)
        assert out.shape == (1, 3, 64, 64) and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # normalisation: (x - 0.5) / 0.5 maps [0, 1] to [-1, 1]
    assert preprocess(torch.zeros(3, 64, 64)).min() == -1
    assert preprocess(torch.ones(3, 64, 64)).max() == 1
    # other sizes are resized; a constant image stays constant
    big = preprocess(np.full((128, 96, 3), 0.25, dtype=np.float32))
    assert big.shape == (1, 3, 64, 64)
    torch.testing.assert_close(big, torch.full_like(big, -0.5))
    for bad in (np.zeros((64, 64)), np.full((8, 8, 3), 2.0), torch.zeros(1, 64, 64),
                torch.full((3, 8, 8), float("nan")), "image", np.zeros((8, 8, 3), dtype=np.int32)):
        with pytest.raises(ValueError):
            preprocess(bad)


def test_recomputed_attention_matches_timm(shipped):
    """cls_attention_ap recomputes attention from qkv; check it against timm's own softmax path."""
    model, preprocess = shipped
    x = preprocess(S.benchmark("easy", n=3).images)
    blk = model.blocks[-1].attn
    seen = {}
    h1 = blk.attn_drop.register_forward_hook(lambda m, a, o: seen.__setitem__("timm", o))
    h2 = blk.register_forward_hook(lambda m, a, o: seen.__setitem__("x", a[0]))
    fused = blk.fused_attn
    blk.fused_attn = False
    try:
        with torch.no_grad():
            model(x)
    finally:
        blk.fused_attn = fused
        h1.remove()
        h2.remove()
    xin = seen["x"].double()
    w, b = blk.qkv.weight.double(), blk.qkv.bias.double()
    qkv = (xin @ w.T + b).reshape(xin.shape[0], 65, 3, blk.num_heads, blk.head_dim)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, head_dim)
    att = (qkv[0] @ qkv[1].transpose(-2, -1) / blk.head_dim ** 0.5).softmax(-1)
    torch.testing.assert_close(seen["timm"].double(), att, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(att.sum(-1), torch.ones_like(att[..., 0]))
    # attnchain.capture's timm adapter reads the same matrices, with the CLS / 8x8 grid layout
    import attnchain.capture

    with attnchain.capture(model) as rec:
        with torch.no_grad():
            model(x)
    name = f"blocks.{len(model.blocks) - 1}.attn"
    assert list(rec.attentions) == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    torch.testing.assert_close(rec.attentions[name].double(), att, atol=1e-5, rtol=1e-4)
    assert rec.tokens[name].grid == (8, 8) and tuple(rec.tokens[name].cls) == (0,)


def test_zoo_registry_loads_it():
    from attnchain.zoo import load

    model, preprocess = load("scene-vit")
    assert isinstance(model, VisionTransformer) and not model.training
    assert preprocess(np.zeros((64, 64, 3), dtype=np.uint8)).shape == (1, 3, 64, 64)


# ---------------------------------------------------------------------------------------------
# training data and targets


def test_class_maps_and_patch_composition_match_loops():
    sc = S.generate(6, 5, "easy")
    cm = T.class_maps(sc)
    for s in range(6):
        for inst in range(1, int(sc.n_objects[s]) + 1):
            where = sc.masks[s] == inst
            assert (cm[s][where] == sc.labels[s, inst - 1] + 1).all()
        assert (cm[s][sc.masks[s] == 0] == 0).all()
    comp = T.patch_composition(cm, 4, 8)
    assert comp.shape == (6, 64, 5)
    torch.testing.assert_close(comp.sum(-1), torch.ones(6, 64))
    for s, p in [(0, 0), (3, 27), (5, 63)]:
        r, c = divmod(p, 8)
        block = cm[s, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
        expect = torch.bincount(block.flatten(), minlength=5).float() / 64
        torch.testing.assert_close(comp[s, p], expect)
    # the background column equals 1 - patch_foreground of the scenes module
    torch.testing.assert_close(1 - comp[..., 0], S.patch_foreground(sc.masks).flatten(1))


def test_augment_moves_images_and_targets_together():
    sc = S.generate(32, 9, "easy")
    cm = T.class_maps(sc)
    img = cm[:, None].float().expand(-1, 3, -1, -1).contiguous()  # image that encodes its map
    out_img, out_cm = T.augment(img, cm, np.random.default_rng(0))
    torch.testing.assert_close(out_img, out_cm[:, None].float().expand(-1, 3, -1, -1))
    for s in range(32):  # labels (class histograms) are invariant
        assert torch.equal(torch.bincount(out_cm[s].flatten(), minlength=5),
                           torch.bincount(cm[s].flatten(), minlength=5))
    # channels are permuted, not mixed
    x = torch.stack([torch.full((64, 64), v) for v in (0.1, 0.5, 0.9)])[None].repeat(8, 1, 1, 1)
    y, _ = T.augment(x, torch.zeros(8, 64, 64, dtype=torch.long), np.random.default_rng(1))
    vals = y[:, :, 0, 0]
    assert torch.equal(vals.sort(1).values, torch.tensor([[0.1, 0.5, 0.9]]).expand(8, 3))
    assert len({tuple(v.tolist()) for v in vals}) > 1


def test_batches_are_deterministic_and_disjoint_from_benchmark():
    cfg = _tiny_cfg()
    a, b = T.batch_at(cfg, 17), T.batch_at(cfg, 17)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], T.batch_at(cfg, 18)[0])
    seeds = {T.chunk_seed(s, c) for s in range(3) for c in range(0, 10_000, 97)}
    assert S.BENCHMARK_SEED not in seeds and T.VAL_SEED not in seeds
    with pytest.raises(ValueError):
        T.TrainConfig(batch_size=100, chunk_size=256)
    with pytest.raises(ValueError):
        T.TrainConfig(level="impossible")


def test_trivial_baselines_by_hand():
    train = torch.tensor([[1, 0, 0, 1], [1, 0, 1, 1], [1, 0, 0, 1], [0, 1, 0, 0]]).float()
    y = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 0]]).float()
    out = T.trivial_baselines(train, y)
    # majority: classes 0 and 3 present -> first row all right, second row 2 of 4 right
    assert out["per_label_accuracy"] == pytest.approx(6 / 8)
    assert out["exact_match_accuracy"] == pytest.approx(1 / 2)  # mode set is [1, 0, 0, 1]


# ---------------------------------------------------------------------------------------------
# training


def test_short_training_run_lowers_the_loss(tmp_path):
    res = T.train(_tiny_cfg(), tmp_path, log=lambda m: None)
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-8:]) < 0.85 * np.mean(losses[:8])


def test_resume_gives_the_uninterrupted_weights(tmp_path):
    cfg = _tiny_cfg(steps=10, ckpt_every=3)
    straight = T.train(cfg, tmp_path / "a", log=lambda m: None)
    T.train(cfg, tmp_path / "b", log=lambda m: None, stop_after=4)
    msgs = []
    resumed = T.train(cfg, tmp_path / "b", log=msgs.append)
    assert any("resumed" in m and "step 4" in m for m in msgs)
    assert resumed["step"] == 10 and len(resumed["history"]) == 10
    for k, v in straight["model"].state_dict().items():
        torch.testing.assert_close(resumed["model"].state_dict()[k], v, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="another configuration"):
        T.train(_tiny_cfg(steps=11, ckpt_every=3), tmp_path / "b", log=lambda m: None)


def test_finalise_writes_weights_and_report(tmp_path):
    cfg = _tiny_cfg(steps=3, chunk_size=64, batch_size=32)
    res = T.train(cfg, tmp_path / "wd", log=lambda m: None)
    info = T.finalise(cfg, res, tmp_path / "out", log=lambda m: None, n_bench=40)
    assert (tmp_path / "out" / "scene_vit.pt").exists()
    assert info["benchmark"]["model"]["n"] == 40 and info["split200"]["model"]["n"] == 200
    assert len(info["cls_attention_foreground_ap"]["trained"]) == 1
    state = torch.load(tmp_path / "out" / "scene_vit.pt", weights_only=True)
    model = SV.make_model(info["config"])
    model.load_state_dict(state["model"])
