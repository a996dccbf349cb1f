"""Concept segmentation (chapter 8): known answers, metrics against independent references, the
reduce-on-the-fly capture against plain capture, and the full-profile path end to end on the
FLUX.1-schnell stand-in and a small file in ``gtsegs_ijcv.mat``'s layout (resume, shard merge).
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score

import attnchain as ac
from attnchain.capture import TokenLayout
from attnchain.data import imagenet_seg as IS
from attnchain.tasks import concept_segmentation as cs

pytest.importorskip("diffusers")
pytest.importorskip("h5py")


# ----------------------------------------------------------------------------------------------
# known answer: a concept token that reaches its region only through a two-step path
@pytest.mark.parametrize("direction", ["sink", "source"])
def test_bounce_recovers_a_two_step_region_exactly(direction):
    A, layout, region = cs.planted_two_step_chain(direction)
    maps = cs.concept_maps(A[None, None].float(), layout, [[[0]]], max_bounces=3)
    gt = region[None]
    two = cs.score_maps(maps[(f"bounce_{direction}_2", "uniform")][:, 0], gt)
    assert two["ap"][0] == 1.0 and two["iou"][0] == 1.0
    assert two["correct"][0] == two["pixels"][0]
    one = "row_select" if direction == "sink" else "column_select"
    first = maps[(one, "uniform")][:, 0]
    assert torch.equal(first, maps[(f"bounce_{direction}_1", "uniform")][:, 0])
    assert float(first.abs().max()) == 0.0              # one step never reaches an image token
    s = cs.score_maps(first, gt)
    assert s["iou"][0] == 0.0 and s["ap"][0] < 1.0


def test_concept_maps_match_explicit_matrix_products():
    g = torch.Generator().manual_seed(1)
    N, grid = 7, (2, 2)
    layout = TokenLayout(n=N, text=(0, 1, 2), image=(3, 4, 5, 6), grid=grid)
    A = torch.softmax(torch.randn(2, 2, N, N, generator=g, dtype=torch.float64), -1)
    maps = cs.concept_maps(A, layout, [[[0], [1, 2]], [[2], [0]]], max_bounces=3)
    S = A / A.sum(-2, keepdim=True)                     # source chain: column-normalised A^T
    S = S.transpose(-1, -2)
    for b, concepts in enumerate([[[0], [1, 2]], [[2], [0]]]):
        for k, pos in enumerate(concepts):
            v0 = torch.zeros(N, dtype=torch.float64)
            v0[pos] = 1.0 / len(pos)
            for w, name in enumerate(cs.WEIGHTINGS):
                for n in (1, 2, 3):
                    sink = v0 @ torch.linalg.matrix_power(A[b, w], n)
                    src = v0 @ torch.linalg.matrix_power(S[b, w], n)
                    got_sink = maps[(f"bounce_sink_{n}", name)][b, k].flatten().double()
                    got_src = maps[(f"bounce_source_{n}", name)][b, k].flatten().double()
                    torch.testing.assert_close(got_sink, sink[3:], atol=1e-6, rtol=1e-5)
                    torch.testing.assert_close(got_src, src[3:], atol=1e-6, rtol=1e-5)
            row = A[b, 0][pos, 3:].mean(0)
            torch.testing.assert_close(maps[("row_select", "uniform")][b, k].flatten().double(),
                                       row, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# metrics against independent computations
def _ap_reference(y, s):
    """Average precision written out: mean over positives of the precision at their rank
    (ties: all tied items counted at once, as scikit-learn's step function does)."""
    order = np.argsort(-s, kind="stable")
    y, s = y[order], s[order]
    ap, tp = 0.0, 0
    i = 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        pos = int(y[i:j].sum())
        tp += pos
        ap += pos / y.sum() * tp / j
        i = j
    return ap


def test_score_maps_match_independent_ap_and_pooled_iou():
    rng = np.random.default_rng(0)
    B, H = 12, 16
    maps = torch.from_numpy(rng.random((B, 4, 4)))
    maps[3] = maps[3].round(decimals=1)                 # ties
    gt = torch.from_numpy(rng.random((B, H, H)) < 0.3)
    gt[5] = False
    gt[5, :3, :3] = True                                # a small object
    s = cs.score_maps(maps, gt)
    up = torch.nn.functional.interpolate(maps[:, None], size=(H, H), mode="nearest")[:, 0]
    up = ((up - up.amin((1, 2), keepdim=True))
          / (up.amax((1, 2), keepdim=True) - up.amin((1, 2), keepdim=True))).numpy()
    for i in range(B):
        y = gt[i].numpy().ravel()
        assert s["ap"][i] == pytest.approx(average_precision_score(y, up[i].ravel()), abs=1e-12)
        assert s["ap"][i] == pytest.approx(_ap_reference(y, up[i].ravel()), abs=1e-12)
    # pooled accuracy and IoU, written here: threshold each low-res map at its mean
    tot = dict(c=0, p=0, i_fg=0, u_fg=0, i_bg=0, u_bg=0)
    for i in range(B):
        m = maps[i].numpy()
        m = (m - m.min()) / (m.max() - m.min())
        pred = np.kron(m > m.mean(), np.ones((4, 4), dtype=bool))
        y = gt[i].numpy()
        tot["c"] += (pred == y).sum()
        tot["p"] += y.size
        tot["i_fg"] += (pred & y).sum()
        tot["u_fg"] += (pred | y).sum()
        tot["i_bg"] += (~pred & ~y).sum()
        tot["u_bg"] += (~pred | ~y).sum()
    rows = [(i, 1, "m", "-", k, float(v[i])) for k, v in s.items() for i in range(B)]
    t = pd.DataFrame(rows, columns=["item", "object", "method", "weighting", "metric", "value"])
    p = cs.pooled_scores(t).loc[("m", "-")]
    assert p["acc"] == pytest.approx(100 * tot["c"] / tot["p"])
    assert p["iou_fg"] == pytest.approx(100 * tot["i_fg"] / tot["u_fg"])
    assert p["iou_bg"] == pytest.approx(100 * tot["i_bg"] / tot["u_bg"])
    assert p["map"] == pytest.approx(100 * np.mean(s["ap"]))


def test_conceptattention_miou_is_a_function_of_accuracy():
    """ConceptAttention stacks (1 - mask, mask) and pools histogram IoUs of both channels; its
    "mIoU" is then acc / (2 - acc). Recomputed here the way their evaluation does it."""
    rng = np.random.default_rng(3)
    inter = np.zeros(2)
    union = np.zeros(2)
    correct = labelled = 0
    for _ in range(6):
        mask = (rng.random((20, 20)) < 0.4).astype(np.int64)
        gt = (rng.random((20, 20)) < 0.3).astype(np.int64)
        pred = np.stack([1 - mask, mask]) + 1
        target = np.stack([1 - gt, gt]) + 1
        correct += ((pred == target) * (target > 0)).sum()
        labelled += (target > 0).sum()
        hit = pred * (pred == target)
        a_i, _ = np.histogram(hit, bins=2, range=(1, 2))
        a_p, _ = np.histogram(pred, bins=2, range=(1, 2))
        a_l, _ = np.histogram(target, bins=2, range=(1, 2))
        inter += a_i
        union += a_p + a_l - a_i
    acc = correct / labelled
    assert (inter / union).mean() == pytest.approx(acc / (2 - acc))
    t = pd.DataFrame([(0, 1, "m", "-", k, v) for k, v in
                      dict(pixels=100, correct=100 * acc, inter_fg=1, union_fg=2, inter_bg=1,
                           union_bg=2, ap=0.5).items()],
                     columns=["item", "object", "method", "weighting", "metric", "value"])
    assert cs.summarise(t).loc[("m", "-"), "miou_ca"] == pytest.approx(100 * acc / (2 - acc))


def test_paper_quotes_conceptattention_pair():
    acc = cs.PAPER.loc["ConceptAttention (quoted)", "acc"]
    assert 100 * acc / (200 - acc) == pytest.approx(cs.PAPER.loc["ConceptAttention (quoted)",
                                                                  "miou"], abs=0.01)


# ----------------------------------------------------------------------------------------------
# capture reduced on the fly equals plain capture
@pytest.fixture(scope="module")
def standin():
    from attnchain.zoo import flux_standin
    return flux_standin.build_pipeline()


def test_accumulator_equals_the_mean_of_plain_captures(standin):
    pipe = standin
    proto = cs.Protocol(resolution=32, seeds=(0, 1), noise_steps=(1, 2),
                        layers=("transformer_blocks.*", "single_transformer_blocks.1.attn"),
                        max_sequence_length=8, eval_size=None)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    prompts = ["a dog", "a cat on grass"]
    chains, layout = cs.joint_chains(pipe, pixels, prompts, proto)
    maps = []
    with torch.no_grad(), ac.capture(pipe.transformer, layers=list(proto.layers),
                                     step_reduce="stack") as rec:
        for step in proto.noise_steps:
            for seed in proto.seeds:
                pipe.transformer(**cs.prepare_inputs(pipe, pixels, prompts, step, seed,
                                                     proto.num_steps, 8))
    for name, A in rec.attentions.items():             # (S, B, H, N, N)
        maps.append(A.double())
    A = torch.cat(maps)                                 # (layers * steps, B, H, N, N)
    uni = A.mean(2).mean(0)
    l2 = torch.stack([ac.head_mean(a, "lambda2", dtype=torch.float64) for a in A]).mean(0)
    torch.testing.assert_close(chains[:, 0].double(), uni, atol=2e-6, rtol=1e-4)
    torch.testing.assert_close(chains[:, 1].double(), l2, atol=2e-5, rtol=1e-3)
    assert layout.grid == (2, 2) and layout.text == tuple(range(8))


def test_prepare_inputs_is_the_schedulers_noising(standin):
    pipe = standin
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    inp = cs.prepare_inputs(pipe, pixels, ["a dog"], noise_step=2, seed=7, num_steps=4,
                            max_sequence_length=8)
    g = torch.Generator().manual_seed(7)
    dist = pipe.vae.encode(pixels).latent_dist
    z = dist.mean + dist.std * torch.randn(dist.mean.shape[1:], generator=g)
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    x0 = pipe._pack_latents(z, 1, 16, 4, 4)
    noise = torch.randn(x0.shape[1:], generator=g)
    sigma = 0.5                                         # linspace(1, 1/4, 4)[2]
    torch.testing.assert_close(inp["hidden_states"], sigma * noise + (1 - sigma) * x0)
    assert float(inp["timestep"][0]) == pytest.approx(sigma)


def test_token_positions_follow_the_tokenizer():
    from attnchain.zoo.registry import _minilm_tokenizer
    tok = _minilm_tokenizer()
    prompt = "a green cross and a turquoise square"
    pos = cs.token_positions(tok, [prompt], [[[(2, 7), (8, 13)], [(20, 29)]]], 16)
    ids = tok(prompt)["input_ids"]
    assert tok.convert_ids_to_tokens([ids[i] for i in pos[0][0]]) == ["green", "cross"]
    assert tok.convert_ids_to_tokens([ids[i] for i in pos[0][1]]) == ["turquoise"]
    with pytest.raises(ValueError, match="cover no token"):
        cs.token_positions(tok, [prompt], [[[(20, 29)]]], 4)


# ----------------------------------------------------------------------------------------------
# the full-profile path end to end: stand-in FluxPipeline, a gtsegs_ijcv.mat-format file
CLASS_MAP = {"Chihuahua": "dog", "dog": "dog", "cat": "cat", "domestic cat": "cat"}
SMALL = cs.Protocol(resolution=32, num_steps=4, noise_steps=(2,), seeds=(4, 5),
                    layers=("transformer_blocks.*",), max_sequence_length=8, max_bounces=3,
                    eval_size=16, pre_resize=48)


@pytest.fixture(scope="module")
def gtsegs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagenet_seg")
    path = IS.write_sample(folder / IS.FILENAME, n=5, seed=1,
                           synsets=("n02085620", "n02084071", "n02121808"))
    cmap = folder / "imagenet_class_map.json"
    cmap.write_text(json.dumps({"categories": CLASS_MAP}))
    return path, cmap


def test_gtsegs_reader_and_source(gtsegs):
    path, cmap = gtsegs
    ds = IS.ImageNetSegmentation(path)
    assert len(ds) == 5 and ds.name(2) == "n02121808_1002"
    image, mask, synset = ds[0]
    assert image.size == (40, 30) and mask.shape == (30, 40) and synset == "n02085620"
    assert 0 < mask.mean() < 1
    src = cs.Source("imagenet-segmentation", n=3, path=path, class_map=cmap, eval_size=16)
    images, prompts, spans, masks = src.batch([0, 1, 2])
    assert prompts == ["a dog", "a dog", "a cat"]
    assert [p[s[0][0][0]:s[0][0][1]] for p, s in zip(prompts, spans)] == ["dog", "dog", "cat"]
    assert masks[0][0].shape == (16, 16)
    with pytest.raises(IndexError):
        ds.mask(5)


def test_full_profile_end_to_end_resume_and_shards(gtsegs, standin, tmp_path, monkeypatch):
    path, cmap = gtsegs
    model = (standin, None)
    kw = dict(model_name="tiny-flux-pipeline", dataset="imagenet-segmentation", batch_size=2,
              protocol=SMALL, model=model, data_path=path, class_map=cmap, progress=False)
    computed = []
    real = cs._batch_rows

    def counting(pipe, source, items, protocol):
        computed.extend(items)
        return real(pipe, source, items, protocol)

    monkeypatch.setattr(cs, "_batch_rows", counting)
    first = cs.evaluate(n=3, results_dir=tmp_path / "a", **kw)       # "interrupted" after 3
    full = cs.evaluate(n=5, results_dir=tmp_path / "a", **kw)        # resumes
    assert computed == [0, 1, 2, 3, 4]
    pd.testing.assert_frame_equal(full[full.item < 3].reset_index(drop=True), first)
    for i in (0, 1):
        cs.evaluate(n=5, results_dir=tmp_path / "b", shard=(i, 2), **kw)
    from attnchain.tasks import Runner
    runner = Runner(cs.TASK, cs.VERSION, dict(model="tiny-flux-pipeline",
                                              dataset="imagenet-segmentation",
                                              **SMALL.settings()), tmp_path / "b",
                    labels=("model", "dataset"), columns=("object",))
    runner.merge()
    merged = runner.table(range(5))
    pd.testing.assert_frame_equal(merged, full)
    assert set(full.method) >= {"row_select", "column_select", "bounce_sink_3",
                                "bounce_source_3"}
    s = cs.summarise(full)
    assert s.loc[("row_select", "uniform"), "n"] == 5
    assert ((s[["acc", "miou", "map"]] >= 0) & (s[["acc", "miou", "map"]] <= 100)).all().all()


# ----------------------------------------------------------------------------------------------
# the scene-flux model, its data and its training
def test_captions_name_every_object():
    from attnchain.data import scenes as S
    sc = S.generate(6, seed=3)
    for (text, spans), names, labels, n in zip(S.captions(sc), S.colour_names(sc), sc.labels,
                                               sc.n_objects):
        assert len(spans) == len(names) == int(n)
        for o, colour, lab in zip(spans, names, labels):
            assert text[slice(*o["colour"])] == colour and colour in S.COLOUR_NAMES
            assert text[slice(*o["shape"])] == S.CLASSES[int(lab)]


def test_pixel_autoencoder_is_exact_and_the_pipeline_is_a_fluxpipeline():
    from diffusers import FluxPipeline
    from attnchain.zoo import scene_flux as SF
    vae = SF.PixelShuffleAutoencoder(factor=4, scaling_factor=2.0, shift_factor=-0.5)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = vae.encode(x).latent_dist.sample()
    assert torch.equal(vae.decode(z).sample, x)
    with pytest.raises(ValueError, match="divisible"):
        vae.encode(torch.zeros(1, 3, 62, 62))
    pipe, pre = SF.build(weights="untrained")
    assert isinstance(pipe, FluxPipeline) and pipe.vae_scale_factor == 4
    out = pipe(["a red circle", "a blue square"], num_inference_steps=2,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()
    states, pooled, _ = pipe.encode_prompt(["a red circle"])
    assert states.shape == (1, SF.MAX_SEQUENCE_LENGTH, 384) and pooled.shape == (1, 384)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(1))
    assert pre(torch.rand(1, 3, 32, 32)).shape == (1, 3, 64, 64)


def test_training_resumes_to_the_same_weights(tmp_path):
    from attnchain.zoo import train_scene_flux as T
    small = dict(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                 axes_dims_rope=[2, 2, 4])
    cfg = T.TrainConfig(steps=3, batch_size=4, chunk_size=8, warmup_steps=1, ckpt_every=1,
                        log_every=1, threads=1, model=small)
    quiet = lambda *a: None  # noqa: E731
    threads = torch.get_num_threads()
    try:
        _train_twice(T, cfg, tmp_path, quiet)
    finally:
        torch.set_num_threads(threads)


def _train_twice(T, cfg, tmp_path, quiet):
    whole = T.train(cfg, tmp_path / "a", log=quiet)
    T.train(cfg, tmp_path / "b", log=quiet, stop_after=2)      # interrupted after step 2
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 2
    resumed = T.train(cfg, tmp_path / "b", log=quiet)          # resumes at step 2
    for k, v in whole["pipe"].transformer.state_dict().items():
        torch.testing.assert_close(v, resumed["pipe"].transformer.state_dict()[k])
    assert len(resumed["history"]) == 3
    info = T.finalise(cfg, whole, tmp_path / "out", log=quiet, attention=False, n_loss=16)
    assert info["loss"]["constant"] > 0 and (tmp_path / "out" / "scene_flux.pt").exists()


def test_repro_segmentation_prints_ours_beside_the_paper(gtsegs, tmp_path, monkeypatch, capsys):
    from attnchain.repro import main
    path, cmap = gtsegs
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "full")      # restored after the test
    monkeypatch.setenv("ATTNCHAIN_WEIGHTS", "random")    # flux-schnell -> the stand-in
    main(["segmentation", "--profile", "full", "--limit", "2", "--data-path", str(path),
          "--class-map", str(cmap), "--out", str(tmp_path), "--resolution", "32",
          "--pre-resize", "48", "--eval-size", "16", "--layers", "transformer_blocks.*",
          "--noise-seeds", "4", "--max-sequence-length", "8", "--max-bounces", "3",
          "--batch-size", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "stand-in" in out and "imagenet-segmentation" in out and "94.29" in out
    assert "changed from the full protocol" in out and "paired differences" in out

