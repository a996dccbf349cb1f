"""Capture of diffusers UNet self-attention and FLUX joint attention, checked against references.

The references are recomputed independently of the adapters: a test hook records the attention
module's *input* hidden states, and the test applies the layer's own weights (``to_q``/``to_k``,
RMSNorm written out by hand, RoPE rebuilt from ``txt_ids``/``img_ids`` with its own formula) in
float64 and takes ``softmax(Q Kᵀ / sqrt(d))``.
"""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

from attnchain.capture import available_layers, capture  # noqa: E402
from attnchain.capture.adapters import diffusers_flux, diffusers_unet  # noqa: E402

ATOL = 2e-5


# ----------------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    return model


@pytest.fixture(scope="module")
def unet_inputs():
    g = torch.Generator().manual_seed(1)
    # non-square latent: the grids must come out as (h, w), not sqrt(N)
    return dict(sample=torch.randn(2, 4, 12, 16, generator=g), timestep=torch.tensor(7),
                encoder_hidden_states=torch.randn(2, 5, 32, generator=g))


FLUX_AXES = (4, 6, 6)
FLUX_GRID = (4, 6)
N_TXT = 7


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=FLUX_AXES,
    ).eval()
    # untrained RMSNorm weights are all ones; make them matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".norm_" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
    return model


def _flux_ids(h, w, n_txt):
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(n_txt, 3)


@pytest.fixture(scope="module")
def flux_inputs():
    g = torch.Generator().manual_seed(2)
    h, w = FLUX_GRID
    img_ids, txt_ids = _flux_ids(h, w, N_TXT)
    return dict(hidden_states=torch.randn(2, h * w, 16, generator=g),
                encoder_hidden_states=torch.randn(2, N_TXT, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g),
                timestep=torch.tensor([0.3, 0.8]), img_ids=img_ids, txt_ids=txt_ids)


def _unet_out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _flux_out(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------
def _lin64(layer, x):
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), b)


def _softmax_ref(q, k):
    """q, k: (B, H, N, d) float64 -> softmax(q k^T / sqrt(d))."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)


@contextlib.contextmanager
def _record_inputs(model, names):
    """Test-owned pre-hooks that keep each named module's call arguments."""
    seen, handles = {}, []
    for name in names:
        def pre(mod, args, kwargs, _n=name):
            seen.setdefault(_n, []).append((args, dict(kwargs)))
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre, with_kwargs=True))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _unet_reference(attn, hs):
    b, n, _ = hs.shape
    q = _lin64(attn.to_q, hs).reshape(b, n, attn.heads, -1).transpose(1, 2)
    k = _lin64(attn.to_k, hs).reshape(b, n, attn.heads, -1).transpose(1, 2)
    return _softmax_ref(q, k)


def _rms64(norm, x):
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    return y if norm.weight is None else y * norm.weight.double()


def _rope_tables(ids, axes, theta=10000.0):
    """cos/sin tables (N, sum(axes)) for FLUX's multi-axis RoPE, float64, written out."""
    cos, sin = [], []
    for i, dim in enumerate(axes):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = ids[:, i].double()[:, None] * freqs[None, :]  # (N, dim/2)
        cos.append(torch.stack([ang.cos(), ang.cos()], -1).flatten(1))
        sin.append(torch.stack([ang.sin(), ang.sin()], -1).flatten(1))
    return torch.cat(cos, -1), torch.cat(sin, -1)


def _rope64(x, cos, sin):
    """Rotate consecutive pairs (x0, x1) of x (B, N, H, d) by the angles in cos/sin (N, d)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], -1).flatten(-2)


def _flux_reference(attn, call, ids):
    args, kwargs = call
    hs = kwargs.get("hidden_states", args[0] if args else None)
    ehs = kwargs.get("encoder_hidden_states")
    b = hs.shape[0]

    def heads(layer, norm, x):
        return _rms64(norm, _lin64(layer, x).reshape(b, x.shape[1], attn.heads, -1))

    q, k = heads(attn.to_q, attn.norm_q, hs), heads(attn.to_k, attn.norm_k, hs)
    if ehs is not None:
        q = torch.cat([heads(attn.add_q_proj, attn.norm_added_q, ehs), q], 1)
        k = torch.cat([heads(attn.add_k_proj, attn.norm_added_k, ehs), k], 1)
    cos, sin = _rope_tables(ids, FLUX_AXES)
    q, k = _rope64(q, cos, sin), _rope64(k, cos, sin)
    return _softmax_ref(q.transpose(1, 2), k.transpose(1, 2))


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _processors(model):
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "processor")}


def _check_exception_restores(model, run, block):
    """An error raised by ``block`` inside ``capture`` leaves no hook behind, the processors
    unchanged and the outputs as before."""
    base = run()
    hooks0, procs0 = _hook_count(model), _processors(model)

    def boom(mod, args, output):
        raise RuntimeError("boom inside a block")

    h = model.get_submodule(block).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside"):
            with capture(model):
                run()
    finally:
        h.remove()
    assert _hook_count(model) == hooks0
    assert all(a is b for a, b in zip(_processors(model).values(), procs0.values()))
    assert torch.equal(run(), base)


UNET_LAYERS = {  # layer -> factor by which its grid is smaller than the latent
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1": 1,
    "mid_block.attentions.0.transformer_blocks.0.attn1": 2,
    "up_blocks.1.attentions.0.transformer_blocks.0.attn1": 1,
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1": 1,
}
FLUX_LAYERS = ["transformer_blocks.0.attn", "transformer_blocks.1.attn",
               "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"]


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------
def test_matches(unet, flux):
    assert diffusers_unet.matches(unet) and not diffusers_unet.matches(flux)
    assert diffusers_flux.matches(flux) and not diffusers_flux.matches(unet)
    assert not diffusers_unet.matches(torch.nn.Linear(2, 2))
    assert not diffusers_flux.matches(torch.nn.Linear(2, 2))


def test_unet_maps_match_reference(unet, unet_inputs):
    base = _unet_out(unet, unet_inputs)
    hooks0, procs0 = _hook_count(unet), _processors(unet)
    with _record_inputs(unet, UNET_LAYERS) as seen, \
            _record_inputs(unet, {n.split(".transformer_blocks")[0] for n in UNET_LAYERS}) as par:
        with capture(unet) as rec:
            out = _unet_out(unet, unet_inputs)
    assert torch.equal(out, base)  # observation only: bit-identical output
    assert _hook_count(unet) == hooks0
    assert all(a is b for a, b in zip(_processors(unet).values(), procs0.values()))
    assert set(rec.attentions) == set(UNET_LAYERS)
    assert list(rec.attentions) == available_layers(unet)
    H, W = unet_inputs["sample"].shape[-2:]
    for name, f in UNET_LAYERS.items():
        attn = unet.get_submodule(name)
        A = rec.attentions[name]
        ref = _unet_reference(attn, seen[name][0][0][0])
        assert A.shape == ref.shape == (2, attn.heads, (H // f) * (W // f), (H // f) * (W // f))
        assert A.dtype == torch.float32
        torch.testing.assert_close(A.double(), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:-1]), atol=1e-5, rtol=0)
        # the grid, independently: the spatial size of the enclosing Transformer2DModel's input
        parent_in = par[name.split(".transformer_blocks")[0]][0][0][0]
        assert rec.tokens[name]["grid"] == tuple(parent_in.shape[-2:]) == (H // f, W // f)


def test_unet_selection_and_steps(unet, unet_inputs):
    """layers/heads/steps selection; one UNet forward call = one denoising step."""
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    g = torch.Generator().manual_seed(3)
    calls = [dict(unet_inputs, sample=torch.randn(unet_inputs["sample"].shape, generator=g))
             for _ in range(3)]
    with _record_inputs(unet, [layer]) as seen:
        with capture(unet, layers=[layer], heads=[1, 3], steps=[0, 2], step_reduce="stack") as rec:
            for inputs in calls:  # three denoising steps
                _unet_out(unet, inputs)
    assert list(rec.attentions) == [layer]
    assert rec.steps == [0, 2]
    got = rec.attentions[layer]
    attn = unet.get_submodule(layer)
    refs = [_unet_reference(attn, seen[layer][i][0][0])[:, [1, 3]] for i in range(3)]
    assert got.shape == (2,) + refs[0].shape and refs[0].shape[1] == 2
    torch.testing.assert_close(got[0].double(), refs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1].double(), refs[2], atol=ATOL, rtol=0)
    assert (refs[1] - refs[2]).abs().max() > 1e-3  # the skipped step would have been different


def test_pipeline_like_objects(unet, flux, unet_inputs, flux_inputs):
    """capture(pipe) works for objects holding the denoiser (``pipe.unet`` / ``pipe.transformer``):
    the adapter counts the denoiser's calls as steps itself."""
    from types import SimpleNamespace

    pipe = SimpleNamespace(unet=unet)
    assert diffusers_unet.matches(pipe) and not diffusers_flux.matches(pipe)
    layer = "mid_block.attentions.0.transformer_blocks.0.attn1"
    with capture(pipe, layers=layer, steps=[1]) as rec:
        for _ in range(3):
            _unet_out(unet, unet_inputs)
    assert rec.steps == [1] and list(rec.attentions) == [layer]
    fpipe = SimpleNamespace(transformer=flux)
    assert diffusers_flux.matches(fpipe) and not diffusers_unet.matches(fpipe)
    with capture(fpipe, layers=FLUX_LAYERS[-1]) as rec:
        _flux_out(flux, flux_inputs)
    assert tuple(rec.tokens[FLUX_LAYERS[-1]]["grid"]) == FLUX_GRID
    assert _hook_count(unet) == 0 and _hook_count(flux) == 0


def test_unet_mask_and_qk(unet, unet_inputs):
    """keep="qk" gives the kernel's Q, K; a boolean mask reaches the recomputed softmax."""
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    attn = unet.get_submodule(layer)
    with _record_inputs(unet, [layer]) as seen:
        with capture(unet, layers=layer, keep="qk") as rec:
            _unet_out(unet, unet_inputs)
    qk = rec.qk[layer]
    ref = _unet_reference(attn, seen[layer][0][0][0])
    torch.testing.assert_close(qk.probs(torch.float64)[0], ref, atol=ATOL, rtol=0)  # S = 1
    # a key mask passed to the attention module: blocked keys get exactly zero probability
    hs = seen[layer][0][0][0]
    keep = torch.rand(hs.shape[0], 1, hs.shape[1], generator=torch.Generator().manual_seed(4)) > 0.3
    bias = torch.zeros(keep.shape).masked_fill(~keep, -10000.0)
    with torch.no_grad():
        plain = attn(hs, attention_mask=bias)
        with capture(unet, layers=layer) as rec:
            masked = attn(hs, attention_mask=bias)
    assert torch.equal(plain, masked)
    A = rec.attentions[layer]
    scores = ref.log() + bias[:, None].double()  # log-softmax + bias, renormalised
    torch.testing.assert_close(A.double(), torch.softmax(scores, -1), atol=ATOL, rtol=0)
    assert A.masked_select(~keep[:, None].expand_as(A)).abs().max() < 1e-6


@pytest.mark.parametrize("variant", ["classic", "fused"])
def test_unet_other_processors(unet, unet_inputs, variant):
    """The same maps through diffusers' classic (explicit softmax) and fused-QKV processors."""
    from diffusers.models.attention_processor import AttnProcessor

    model = copy.deepcopy(unet)
    if variant == "classic":
        model.set_attn_processor(AttnProcessor())
    else:
        model.fuse_qkv_projections()
    layer = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    base = _unet_out(model, unet_inputs)
    with _record_inputs(model, [layer]) as seen:
        with capture(model, layers=layer) as rec:
            out = _unet_out(model, unet_inputs)
    assert torch.equal(out, base)
    ref = _unet_reference(unet.get_submodule(layer), seen[layer][0][0][0])  # unfused weights
    torch.testing.assert_close(rec.attentions[layer].double(), ref, atol=ATOL, rtol=0)


def test_unet_exception_restores(unet, unet_inputs):
    _check_exception_restores(unet, lambda: _unet_out(unet, unet_inputs),
                              "up_blocks.1.attentions.0.transformer_blocks.0.ff")


# ----------------------------------------------------------------------------------------------
# FLUX
# ----------------------------------------------------------------------------------------------
def _ids(inputs):
    return torch.cat([inputs["txt_ids"], inputs["img_ids"]], 0)


def test_flux_maps_match_reference(flux, flux_inputs):
    base = _flux_out(flux, flux_inputs)
    hooks0, procs0 = _hook_count(flux), _processors(flux)
    with _record_inputs(flux, FLUX_LAYERS) as seen:
        with capture(flux) as rec:
            out = _flux_out(flux, flux_inputs)
    assert torch.equal(out, base)
    assert _hook_count(flux) == hooks0
    assert all(a is b for a, b in zip(_processors(flux).values(), procs0.values()))
    assert list(rec.attentions) == FLUX_LAYERS
    n_img = FLUX_GRID[0] * FLUX_GRID[1]
    for name in FLUX_LAYERS:
        A = rec.attentions[name]
        ref = _flux_reference(flux.get_submodule(name), seen[name][0], _ids(flux_inputs))
        assert A.shape == ref.shape == (2, 2, N_TXT + n_img, N_TXT + n_img)
        torch.testing.assert_close(A.double(), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(A.sum(-1), torch.ones(A.shape[:-1]), atol=1e-5, rtol=0)
        tok = rec.tokens[name]
        assert tuple(tok["text"]) == tuple(range(N_TXT))
        assert tuple(tok["image"]) == tuple(range(N_TXT, N_TXT + n_img))
        assert tuple(tok["grid"]) == FLUX_GRID


def test_flux_reference_catches_rope(flux, flux_inputs):
    """The reference is sensitive to RoPE: dropping it changes the maps (the test can fail)."""
    name = FLUX_LAYERS[0]
    with _record_inputs(flux, [name]) as seen:
        with capture(flux, layers=[name]) as rec:
            _flux_out(flux, flux_inputs)
    zero_ids = torch.zeros_like(_ids(flux_inputs))
    no_rope = _flux_reference(flux.get_submodule(name), seen[name][0], zero_ids)
    assert (rec.attentions[name].double() - no_rope).abs().max() > 1e-3


def test_flux_qk_mode_after_rope(flux, flux_inputs):
    with capture(flux) as rec_p:
        _flux_out(flux, flux_inputs)
    with capture(flux, keep="qk") as rec:
        out = _flux_out(flux, flux_inputs)
    assert torch.equal(out, _flux_out(flux, flux_inputs))
    for name in FLUX_LAYERS:
        q, k = rec.qk[name].q, rec.qk[name].k
        assert q.shape == k.shape == (1, 2, 2, N_TXT + 24, 16)  # "stack": S = 1
        q, k = q[0], k[0]
        A = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 4.0, -1)
        torch.testing.assert_close(A, rec_p.attentions[name].double(), atol=ATOL, rtol=0)


def test_flux_half_precision_and_heads(flux, flux_inputs):
    with capture(flux) as full:
        _flux_out(flux, flux_inputs)
    with capture(flux, dtype=torch.float16, heads=[1], layers=FLUX_LAYERS[2:]) as rec:
        _flux_out(flux, flux_inputs)
    assert list(rec.attentions) == FLUX_LAYERS[2:]
    for name in FLUX_LAYERS[2:]:
        A = rec.attentions[name]
        assert A.dtype == torch.float16 and A.shape[1] == 1
        torch.testing.assert_close(A.float(), full.attentions[name][:, 1:2], atol=1e-3, rtol=0)


def test_flux_attention_mask(flux, flux_inputs):
    """A boolean key mask (joint_attention_kwargs) reaches the recomputed softmax."""
    n = N_TXT + FLUX_GRID[0] * FLUX_GRID[1]
    keep = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keep[0, ..., 2:5] = False   # drop three text tokens of sample 0
    keep[1, ..., N_TXT + 3] = False  # and one image token of sample 1
    inputs = dict(flux_inputs, joint_attention_kwargs={"attention_mask": keep})
    base = _flux_out(flux, inputs)
    with _record_inputs(flux, FLUX_LAYERS) as seen:
        with capture(flux) as rec:
            out = _flux_out(flux, inputs)
    assert torch.equal(out, base)
    for name in FLUX_LAYERS:
        A = rec.attentions[name]
        assert A.masked_select(~keep.expand_as(A)).abs().max() == 0
        ref = _flux_reference(flux.get_submodule(name), seen[name][0], _ids(flux_inputs))
        ref = ref * keep
        torch.testing.assert_close(A.double(), ref / ref.sum(-1, keepdim=True), atol=ATOL, rtol=0)


def test_flux_fused_projections(flux, flux_inputs):
    model = copy.deepcopy(flux)
    model.fuse_qkv_projections()
    assert model.get_submodule(FLUX_LAYERS[0]).fused_projections
    with capture(flux) as ref:
        _flux_out(flux, flux_inputs)
    with capture(model) as rec:
        _flux_out(model, flux_inputs)
    for name in FLUX_LAYERS:
        torch.testing.assert_close(rec.attentions[name], ref.attentions[name], atol=1e-5, rtol=0)


def test_flux_exception_restores(flux, flux_inputs):
    _check_exception_restores(flux, lambda: _flux_out(flux, flux_inputs),
                              "single_transformer_blocks.0.proj_out")


def test_flux_grid_from_ids():
    img, _ = _flux_ids(3, 5, 0)
    assert diffusers_flux.image_grid(img, 15) == (3, 5)
    assert diffusers_flux.image_grid(img[[1, 0] + list(range(2, 15))], 15) is None
    assert diffusers_flux.image_grid(img.flip(0), 15) is None
    assert diffusers_flux.image_grid(img, 16) is None


def test_flux_single_block_called_positionally(flux, flux_inputs):
    """Blocks called with positional arguments (as under gradient checkpointing) still give the
    text/image split; the grid is unknown without the model's img_ids."""
    name = "single_transformer_blocks.1.attn"
    block = flux.get_submodule(name.rsplit(".", 1)[0])
    g = torch.Generator().manual_seed(5)
    hs, ehs, temb = (torch.randn(1, 24, 32, generator=g), torch.randn(1, 3, 32, generator=g),
                     torch.randn(1, 32, generator=g))
    with torch.no_grad(), capture(flux, layers=name) as rec:
        block(hs, ehs, temb, None)
    tok = rec.tokens[name]
    assert tok["text"] == (0, 1, 2) and tok["image"] == tuple(range(3, 27)) and tok["grid"] is None
    A = rec.attentions[name]
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 2, 27), atol=1e-5, rtol=0)


def test_flux_bad_head_is_valueerror_and_restores(flux, flux_inputs):
    hooks0 = _hook_count(flux)
    with pytest.raises(ValueError, match="head 5 out of range"):
        with capture(flux, heads=[5]):
            _flux_out(flux, flux_inputs)
    assert _hook_count(flux) == hooks0


def test_unet_layers_are_in_computation_order(unet, unet_inputs):
    # a UNet registers mid_block after its up blocks; layers=-1 must still be the last layer the
    # UNet computes (the highest-resolution up block), not the 8x8 mid block (issue 18)
    fired = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: fired.append(n))
             for n, m in unet.named_modules() if n.endswith("attn1")]
    try:
        with torch.no_grad():
            _unet_out(unet, unet_inputs)
    finally:
        for h in hooks:
            h.remove()
    assert available_layers(unet) == list(dict.fromkeys(fired))
    with torch.no_grad(), capture(unet, layers=-1) as rec:
        _unet_out(unet, unet_inputs)
    (name,) = rec.attentions
    assert name == fired[-1] and name.startswith("up_blocks.")
