"""feature-attention: the documented kernel, recomputed independently in float64, and its chains."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import color
from skimage import data as skdata

import attnchain
from attnchain import zoo
from attnchain.data import scenes as S
from attnchain.spectral import lambda2
from attnchain.zoo import feature_attention as FA

# The documented heads, typed in from the module docstring (not read from the module):
# name -> ({descriptor: weight}, tau)
DOC_HEADS = {
    "colour": ({"L": 1, "a": 1, "b": 1}, 0.5),
    "texture": ({"std_L": 1, "std_a": 1, "std_b": 1, "grad_0": 1, "grad_45": 1, "grad_90": 1,
                 "grad_135": 1}, 64.0),
    "position": ({"row": 1, "col": 1}, 0.2),
    "colour×position": ({"L": 1, "a": 1, "b": 1, "row": 3, "col": 3}, 4.0),
}
DOC_NAMES = ["L", "a", "b", "std_L", "std_a", "std_b", "grad_0", "grad_45", "grad_90",
             "grad_135", "row", "col"]


@pytest.fixture(scope="module")
def loaded():
    return zoo.load("feature-attention", device="cpu")


# ---------------------------------------------------------------------------------------------
# independent float64 reference (numpy, scikit-image, scipy)


def _reference_descriptors(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 RGB in [0, 1] -> (N, 12) raw descriptors, computed with skimage/scipy."""
    h, w, _ = img.shape
    p = 4 if max(h, w) <= 128 else 8                              # documented patch-size rule
    gh, gw = h // p, w // p
    lab = color.rgb2lab(img)                                       # skimage, D65, float64
    blocks = lab.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p, 3)
    mean, std = blocks.mean(1), blocks.std(1)
    r = np.arange(-2, 3, dtype=np.float64)
    y, x = np.meshgrid(r, r, indexing="ij")
    g = np.exp(-(x ** 2 + y ** 2) / 2)
    lum = lab[..., 0] / 100
    energies = []
    for deg in (0, 45, 90, 135):
        t = np.deg2rad(deg)
        k = -(x * np.cos(t) + y * np.sin(t)) * g
        k /= np.abs(k).sum()
        resp = np.abs(ndimage.correlate(lum, k, mode="mirror"))
        energies.append(resp.reshape(gh, p, gw, p).mean((1, 3)).reshape(-1))
    s = max(gh, gw)
    rows, cols = np.meshgrid((np.arange(gh) + 0.5) / s, (np.arange(gw) + 0.5) / s, indexing="ij")
    return np.concatenate([mean, std, np.stack(energies, 1),
                           rows.reshape(-1, 1), cols.reshape(-1, 1)], 1)


def _reference_standardise(raw: np.ndarray) -> np.ndarray:
    f = raw.copy()
    for idx, floor in (([0, 1, 2], 4.0), ([3, 4, 5, 6, 7, 8, 9], 0.02)):
        gcen = raw[:, idx] - raw[:, idx].mean(0)
        scale = max(np.sqrt((gcen ** 2).sum(1).mean() / len(idx)), floor)
        f[:, idx] = gcen / scale
    return f


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def _reference_attention(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (5, N, N): softmax_j(-||W f_i - W f_j||^2 / tau) per documented head."""
    f = _reference_standardise(_reference_descriptors(img))
    out = []
    for weights, tau in DOC_HEADS.values():
        q = np.stack([wgt * f[:, DOC_NAMES.index(d)] for d, wgt in weights.items()], 1)
        d2 = ((q[:, None, :] - q[None, :, :]) ** 2).sum(-1)
        out.append(_softmax_rows(-d2 / tau))
    n = f.shape[0]
    gen = torch.Generator().manual_seed(1234)
    xi = torch.randn(n, 64, generator=gen, dtype=torch.float64).numpy()
    d2 = ((xi[:, None, :] - xi[None, :, :]) ** 2).sum(-1)
    out.append(_softmax_rows(-d2 / 128.0))
    return np.stack(out)


def _capture(model, x):
    with torch.no_grad(), attnchain.capture(model) as rec:
        out = model(x)
    return out, rec


# ---------------------------------------------------------------------------------------------
# tests


def test_loads_offline_without_parameters(loaded):
    model, pre = loaded
    assert isinstance(model, FA.FeatureAttentionModel)
    assert not model.training
    assert list(model.parameters()) == []
    assert model.head_names == ("colour", "texture", "position", "colour×position", "noise")
    assert set(model.attn.heads) == set(model.head_names)
    assert model.descriptor_names == tuple(DOC_NAMES)
    assert "kernel" in FA.__doc__ and "Meila" in FA.__doc__


@pytest.mark.parametrize("level", S.LEVELS)
def test_captured_attention_equals_documented_kernel(loaded, level):
    model, pre = loaded
    sc = S.generate(3, 123, level)
    x = pre(sc.images)
    assert x.shape == (3, 3, 64, 64)
    out, rec = _capture(model, x)
    A = rec.attentions["attn"]
    assert A.shape == (3, 5, 256, 256) and out.shape == (3, 256, 5 * 12)
    layout = rec.tokens["attn"]
    assert layout.grid == (16, 16) and layout.image == tuple(range(256)) and layout.cls == ()
    torch.testing.assert_close(A.sum(-1), torch.ones(3, 5, 256), atol=1e-5, rtol=0)
    for s in range(3):
        img = sc.images[s].permute(1, 2, 0).double().numpy()
        ref = _reference_attention(img)
        np.testing.assert_allclose(A[s].double().numpy(), ref, atol=2e-4, rtol=0)
    # the descriptors themselves match the skimage/scipy reference
    raw = model.raw_descriptors(x)[0].double().numpy()
    want = _reference_descriptors(sc.images[0].permute(1, 2, 0).double().numpy())
    np.testing.assert_allclose(raw, want, atol=2e-3, rtol=1e-4)


def test_output_is_attention_times_descriptors(loaded):
    model, pre = loaded
    x = pre(S.generate(2, 5, "medium").images)
    out, rec = _capture(model, x)
    A = rec.attentions["attn"].double()
    f = model.features(x).double()
    want = torch.einsum("bhij,bjd->bihd", A, f).flatten(2)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)


def test_chain_is_reversible_random_walk_of_the_affinity(loaded):
    """A = D^-1 K with K symmetric: pi_i ∝ sum_l K_il is stationary and detailed balance holds."""
    model, pre = loaded
    img = S.generate(1, 9, "easy").images[0].permute(1, 2, 0).double().numpy()
    f = _reference_standardise(_reference_descriptors(img))
    weights, tau = DOC_HEADS["colour×position"]
    q = np.stack([wgt * f[:, DOC_NAMES.index(d)] for d, wgt in weights.items()], 1)
    K = np.exp(-((q[:, None] - q[None]) ** 2).sum(-1) / tau)
    A = _reference_attention(img)[3]
    pi = K.sum(1) / K.sum()
    np.testing.assert_allclose(pi @ A, pi, atol=1e-12)
    np.testing.assert_allclose(pi[:, None] * A, (pi[:, None] * A).T, atol=1e-12)
    # and the model's float32 chain agrees with it
    _, rec = _capture(model, pre(img))
    np.testing.assert_allclose(rec.attentions["attn"][0, 3].double().numpy(), A, atol=2e-4)


def test_runs_on_photographs(loaded):
    model, pre = loaded
    x = pre(skdata.astronaut())                      # 512 x 512 uint8
    assert x.shape == (1, 3, 256, 256) and x.dtype == torch.float32
    assert 0 <= float(x.min()) and float(x.max()) <= 1
    _, rec = _capture(model, x)
    A = rec.attentions["attn"]
    assert A.shape == (1, 5, 1024, 1024) and rec.tokens["attn"].grid == (32, 32)
    assert torch.isfinite(A).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(1, 5, 1024), atol=1e-4, rtol=0)
    # a non-square photo keeps its aspect ratio on the grid; float and PIL input agree with uint8
    coffee = skdata.coffee()                         # 400 x 600
    y = pre(coffee)
    assert y.shape == (1, 3, 168, 256)
    from PIL import Image
    torch.testing.assert_close(pre(Image.fromarray(coffee)), y)
    torch.testing.assert_close(pre(coffee / 255.0), y, atol=1e-5, rtol=0)
    _, rec = _capture(model, y)
    assert rec.tokens["attn"].grid == (21, 32)
    assert rec.attentions["attn"].shape == (1, 5, 21 * 32, 21 * 32)


def test_noise_head_has_smallest_lambda2(loaded):
    model, pre = loaded
    sc = S.generate(40, 123, "easy")                 # not the benchmark seed
    _, rec = _capture(model, pre(sc.images))
    A = rec.attentions["attn"].double().numpy()
    # |λ2| by a float64 numpy reference (eigenvalues of a reversible chain are real)
    l2 = torch.from_numpy(np.sort(np.abs(np.linalg.eigvals(A)), -1)[..., -2])   # (40, 5)
    torch.testing.assert_close(lambda2(torch.from_numpy(A[:2])), l2[:2], atol=1e-5, rtol=0)
    noise = model.head_names.index("noise")
    rate = (l2.argmin(1) == noise).double().mean().item()
    assert rate >= 0.95, f"noise head smallest |λ2| on only {rate:.0%} of scenes"
    # and the structured heads are not near-uniform
    assert (l2[:, model.head_names.index("colour")] > 0.9).all()


def test_bad_input_raises(loaded):
    model, pre = loaded
    with pytest.raises(ValueError, match="unsupported image type"):
        pre("astronaut.png")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        pre(np.zeros((8, 8, 5)))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pre(np.full((16, 16, 3), 2.0))
    with pytest.raises(ValueError, match="NaN"):
        pre(torch.full((3, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.rand(1, 3, 62, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(torch.rand(1, 3, 64, 64) * 3)
    with pytest.raises(ValueError, match="tensor"):
        model(np.zeros((1, 3, 64, 64)))


def test_capture_leaves_no_hooks(loaded):
    model, pre = loaded
    x = pre(S.generate(1, 3, "hard").images)
    with torch.no_grad():
        before = model(x)
    _, rec = _capture(model, x)
    assert list(rec.attentions) == ["attn"]
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_flat_image_is_not_amplified(loaded):
    """A constant image: colour/texture groups stay at their floors, no NaN, and the colour head
    is uniform (all patches identical)."""
    model, pre = loaded
    _, rec = _capture(model, pre(np.full((32, 32, 3), 0.3)))
    A = rec.attentions["attn"][0]
    assert torch.isfinite(A).all()
    assert A.shape == (5, 64, 64)                    # 32 px: 4 px patches, an 8 x 8 grid
    torch.testing.assert_close(A[0], torch.full((64, 64), 1 / 64), atol=1e-6, rtol=0)
