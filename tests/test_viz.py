"""Tests for attnchain.viz: image-grid helpers, plots, explorers."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from attnchain import viz  # noqa: E402
from attnchain.chain import planted_chain  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------ plots
def test_plots_draw_and_validate():
    a, lab = planted_chain([4, 4], leak=0.1)
    ax = viz.show_matrix(a, title="t", boundaries=[4])
    assert ax.get_title() == "t" and len(ax.images) == 1
    np.testing.assert_allclose(ax.images[0].get_array(), a.numpy(), atol=1e-6)
    with pytest.raises(ValueError):
        viz.show_matrix(torch.ones(2, 2, 2))
    ax = viz.spectrum(torch.linalg.eigvals(a.double()), highlight=2)
    assert len(ax.collections) == 2
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    ax = viz.overlay(torch.arange(16.0).reshape(4, 4), img)
    assert ax.images[-1].get_array().shape == (32, 32)
    ax = viz.show_labels(torch.tensor([[0, 1], [1, 0]]), img)
    assert ax.images[-1].get_array().shape == (32, 32, 3)
    with pytest.raises(ValueError):
        viz.overlay(torch.ones(3))
    viz.lambda2_heatmap(torch.rand(3, 4), title="l2")
    with pytest.raises(ValueError):
        viz.lambda2_heatmap(torch.rand(3))
    ax = viz.token_heat(["the", "cat", "sat"], torch.tensor([0.1, 0.5, 0.9]), title="x")
    assert [t.get_text() for t in ax.texts] == ["the", "cat", "sat"]
    with pytest.raises(ValueError):
        viz.token_heat(["a"], torch.tensor([1.0, 2.0]))


def test_patch_map_and_bounce_strip():
    v = torch.arange(1 + 6.0)
    np.testing.assert_array_equal(viz.patch_map(v, (2, 3), prefix=1), np.arange(1, 7).reshape(2, 3))
    with pytest.raises(ValueError):
        viz.patch_map(v, (2, 2), prefix=1)
    d = torch.softmax(torch.randn(4, 7), -1)
    axes = viz.bounce_strip(d, grid=(2, 3), prefix=1, image=np.ones((12, 18, 3)))
    assert len(axes) == 4 and axes[2].get_title() == "n = 2"
    axes = viz.bounce_strip(d, steps=[0, 3], tokens=list("abcdefg"))
    assert [ax.get_title() for ax in axes] == ["n = 0", "n = 3"]


# ------------------------------------------------------------------ explorers
def test_explorer_static_draws_defaults(monkeypatch):
    monkeypatch.setenv("ATTNCHAIN_STATIC", "1")
    seen = {}

    def draw(a, b):
        seen.update(a=a, b=b)
        plt.figure()
        plt.plot([a, b])

    fig = viz.explorer(draw, {"a": range(1, 5), "b": ["x", "y"]}, defaults={"a": 3})
    assert seen == {"a": 3, "b": "x"}
    assert isinstance(fig, matplotlib.figure.Figure)
    with pytest.raises(ValueError):
        viz.explorer(draw, {"a": range(3)}, defaults={"zz": 1})


def test_explorer_live_returns_widget(monkeypatch):
    monkeypatch.delenv("ATTNCHAIN_STATIC", raising=False)
    ipywidgets = pytest.importorskip("ipywidgets")
    w = viz.explorer(lambda a, b: plt.figure(), {"a": range(1, 5), "b": {"one": 1, "two": 2}})
    assert isinstance(w, ipywidgets.interactive)
    names = [getattr(c, "description", None) for c in w.children]
    assert "a" in names and "b" in names


def test_attention_explorer_static(monkeypatch):
    monkeypatch.setenv("ATTNCHAIN_STATIC", "1")
    pytest.importorskip("attnchain.spectral")
    att = {"l0": torch.softmax(torch.randn(1, 2, 5, 5), -1), "l1": torch.softmax(torch.randn(2, 5, 5), -1)}
    fig = viz.attention_explorer(att, grid=(2, 2), prefix=1, image=np.ones((8, 8, 3)),
                                 defaults={"n": 2, "start": 3})
    assert "v_2 (sink) from token 3" in [ax.get_title() for ax in fig.axes]
    fig = viz.attention_explorer(att, tokens=list("abcde"), defaults={"head": "lambda2"})
    assert any("λ2-weighted mean" in ax.get_title() for ax in fig.axes)
    fig = viz.attention_explorer(att, tokens=list("abcde"), defaults={"head": "uniform"})
    assert any("uniform mean" in ax.get_title() for ax in fig.axes)
    with pytest.raises(ValueError, match="unknown controls|not a valid|head"):
        viz.attention_explorer(att, tokens=list("abcde"), defaults={"heads": "l2mean"})
    with pytest.raises(ValueError):
        viz.attention_explorer({"x": torch.rand(5, 5)})


# ------------------------------------------------------------------ devices
def test_plots_take_tensors_that_refuse_numpy(monkeypatch):
    """Plots convert through to_numpy (detach + cpu), never ``tensor.numpy()`` on the input."""
    class DeviceTensor(torch.Tensor):  # stands in for a CUDA tensor: .numpy() refuses
        def numpy(self, *a, **k):
            raise TypeError("can't convert cuda tensor to numpy")

        def cpu(self, *a, **k):
            return super().cpu(*a, **k).as_subclass(torch.Tensor)

        def to(self, *a, **k):
            return super().to(*a, **k).as_subclass(torch.Tensor)

    a = torch.softmax(torch.randn(4, 4), -1).as_subclass(DeviceTensor)
    viz.show_matrix(a)
    viz.overlay(viz.patch_map(a[0], (2, 2)), np.ones((8, 8, 3)))
    viz.bounce_strip(a, steps=[0, 1])
    viz.lambda2_heatmap(a)
    viz.token_heat(list("abcd"), a[0])


def test_overlay_on_a_non_square_photo_matches_the_models_crop():
    """timm's evaluation transform keeps the centre square of a wide photo; the overlay must be
    drawn over that square, not stretched over the whole photo (issue 18)."""
    import attnchain.zoo
    from timm.data import resolve_data_config

    net, pre = attnchain.zoo.load("tiny-timm-vit")
    H, W = 60, 150
    ramp = np.tile(np.linspace(0, 1, W)[None, :, None], (H, 1, 3))  # value = column / (W - 1)
    top, left, h, w = pre.crop_box(ramp)
    assert (top, h) == (0.0, 60.0) and w == pytest.approx(60.0, abs=0.5)
    assert left == pytest.approx((W - w) / 2, abs=1.0)
    # what the model saw: undo the normalisation and read the ramp on its interior columns
    cfg = resolve_data_config({}, model=net)
    x = pre(ramp)[0].cpu() * torch.tensor(cfg["std"])[:, None, None] \
        + torch.tensor(cfg["mean"])[:, None, None]
    S = x.shape[-1]
    cols = np.arange(2, S - 2)
    expected = (left + (cols + 0.5) * w / S - 0.5) / (W - 1)
    np.testing.assert_allclose(x[0, S // 2, 2:S - 2].numpy(), expected, atol=0.02)
    # the overlay's map covers exactly the box; outside it the photo shows through
    heat = np.arange(16.0).reshape(4, 4)
    ax = viz.overlay(heat, ramp, box=(top, left, h, w))
    shown = ax.images[-1].get_array()
    assert shown.shape == (H, W)
    inside = ~np.ma.getmaskarray(shown)
    c0, c1 = int(round(left)), int(round(left + w))
    assert inside[:, c0:c1].all() and not inside[:, :c0].any() and not inside[:, c1:].any()
    assert shown[0, c0] == 0 and shown[-1, c1 - 1] == 1  # the map's corners at the box's corners
    lab = viz.show_labels(np.array([[0, 1], [1, 0]]), ramp, box=(top, left, h, w))
    rgb = lab.images[-1].get_array()
    np.testing.assert_allclose(rgb[:, :c0], ramp[:, :c0])  # outside: the photo unchanged
    for box in [(0.0, 75.36, 300.0, 300.28), (-3.4, 10.6, 70.2, 99.5)]:  # fractional boxes
        viz.overlay(heat, ramp, box=box)
        viz.show_labels(np.array([[0, 1], [1, 0]]), ramp, box=box)
    with pytest.raises(ValueError, match="does not overlap"):
        viz.overlay(heat, ramp, box=(0, W + 5, 10, 10))


def test_whole_image_preprocesses_see_the_whole_photo():
    import attnchain.zoo

    photo = np.zeros((60, 150, 3))
    for name in ("feature-attention", "scene-vit"):
        _, pre = attnchain.zoo.load(name)
        assert pre.crop_box(photo) == (0.0, 0.0, 60.0, 150.0)
