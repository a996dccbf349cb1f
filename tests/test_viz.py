"""Tests for attnchain.viz: example chains against independent references, plots, explorers."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnchain import viz  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ------------------------------------------------------------------ planted_chain
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       leak=st.floats(0.0, 1.0), conc=st.floats(0.1, 5.0), shuffle=st.booleans(),
       seed=st.integers(0, 10_000))
def test_planted_chain_rows_and_leak(sizes, leak, conc, shuffle, seed):
    a, lab = viz.planted_chain(sizes, leak=leak, concentration=conc, shuffle=shuffle, seed=seed,
                               dtype=torch.float64)
    n = sum(sizes)
    assert a.shape == (n, n) and lab.shape == (n,)
    assert (a >= 0).all()
    np.testing.assert_allclose(a.sum(-1).numpy(), 1.0, atol=1e-12)
    same = (lab[:, None] == lab[None, :]).double()
    out = (a * (1 - same)).sum(-1).numpy()
    np.testing.assert_allclose(out, leak, atol=1e-9)
    assert np.bincount(lab.numpy()).tolist() == sizes


def test_planted_chain_deterministic_and_seed_sensitive():
    a1, _ = viz.planted_chain([3, 4], leak=0.2, seed=1)
    a2, _ = viz.planted_chain([3, 4], leak=0.2, seed=1)
    a3, _ = viz.planted_chain([3, 4], leak=0.2, seed=2)
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_planted_chain_lumped_eigenvalue_matches_theory():
    # With huge concentration, rows are uniform inside and outside: the lumped chain of k equal
    # blocks has second eigenvalue 1 - leak * k / (k - 1); compare with numpy's dense eig.
    k, leak = 3, 0.3
    a, _ = viz.planted_chain([5] * k, leak=leak, concentration=1e6, seed=0, dtype=torch.float64)
    ev = np.sort(np.abs(np.linalg.eigvals(a.numpy())))[::-1]
    assert ev[0] == pytest.approx(1.0, abs=1e-9)
    assert ev[1] == pytest.approx(1 - leak * k / (k - 1), abs=1e-3)
    assert ev[2] == pytest.approx(1 - leak * k / (k - 1), abs=1e-3)
    assert ev[3] < 1e-2


@pytest.mark.parametrize("kw", [dict(sizes=[]), dict(sizes=[0, 2]), dict(sizes=[2, 2], leak=1.5),
                                dict(sizes=[3], leak=0.1), dict(sizes=[2, 2], concentration=0)])
def test_planted_chain_rejects_bad_input(kw):
    with pytest.raises(ValueError):
        viz.planted_chain(**kw)


# ------------------------------------------------------------------ bipartite_chain
def test_bipartite_chain_structure_against_numpy():
    rng = np.random.default_rng(0)
    w = rng.random((3, 5))
    a = w / w.sum(1, keepdims=True)
    p = viz.bipartite_chain(torch.tensor(a)).numpy()
    assert p.shape == (8, 8)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[:3, 3:], a)
    assert np.all(p[:3, :3] == 0) and np.all(p[3:, 3:] == 0)
    b = a.T / a.T.sum(1, keepdims=True)
    np.testing.assert_allclose(p[3:, :3], b)
    # period 2: -1 is an eigenvalue
    ev = np.linalg.eigvals(p)
    assert np.min(np.abs(ev + 1)) < 1e-9


def test_bipartite_chain_unattended_key_and_batch():
    a = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]]).repeat(2, 1, 1)
    p = viz.bipartite_chain(a)
    assert p.shape == (2, 5, 5)
    torch.testing.assert_close(p[0, 4, :2], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 5))
    with pytest.raises(ValueError):
        viz.bipartite_chain(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError):
        viz.bipartite_chain(-a)


# ------------------------------------------------------------------ rollout
def test_rollout_matches_explicit_products():
    rng = np.random.default_rng(3)
    mats = []
    for _ in range(3):
        w = rng.random((4, 4))
        mats.append(w / w.sum(1, keepdims=True))
    r = viz.rollout([torch.tensor(m) for m in mats], residual=0.5).numpy()
    hat = [0.5 * np.eye(4) + 0.5 * m for m in mats]
    np.testing.assert_allclose(r, hat[2] @ hat[1] @ hat[0], atol=1e-12)
    np.testing.assert_allclose(r.sum(1), 1.0, atol=1e-12)
    # residual = 0 is the plain product; a mapping keeps its order
    r0 = viz.rollout({"a": torch.tensor(mats[0]), "b": torch.tensor(mats[1])}, residual=0.0)
    np.testing.assert_allclose(r0.numpy(), mats[1] @ mats[0], atol=1e-12)
    with pytest.raises(ValueError):
        viz.rollout([])
    with pytest.raises(ValueError):
        viz.rollout([torch.ones(2, 3)])


# ------------------------------------------------------------------ plots
def test_plots_draw_and_validate():
    a, lab = viz.planted_chain([4, 4], leak=0.1)
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
    fig = viz.attention_explorer(att, tokens=list("abcde"), defaults={"head": "l2mean"})
    assert any("λ2-mean" in ax.get_title() or "l2mean" in ax.get_title() for ax in fig.axes)
    with pytest.raises(ValueError):
        viz.attention_explorer({"x": torch.rand(5, 5)})


# ------------------------------------------------------------------ choose_bounces / mask_to_grid
def test_choose_bounces_matches_formula():
    pytest.importorskip("attnchain.spectral")
    a, _ = viz.planted_chain([10, 10, 10], leak=0.05, concentration=0.3, seed=4, dtype=torch.float64)
    ev = np.sort(np.abs(np.linalg.eigvals(a.numpy())))[::-1]
    gaps = ev[:16] - ev[1:17]
    k = int(np.argmax(gaps)) + 1
    assert k == 3
    expect = int(np.clip(np.ceil(np.log(0.1) / np.log(ev[k])), 1, 10))
    assert int(viz.choose_bounces(a)) == expect
    # batched, and a structureless chain (uniform rows: |λ2| = 0, k = 1) gets row select
    u = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    both = viz.choose_bounces(torch.stack([a[:6, :6] / a[:6, :6].sum(-1, keepdim=True), u]))
    assert both.shape == (2,) and int(both[1]) == 1
    with pytest.raises(ValueError):
        viz.choose_bounces(a, eps=1.5)


def test_mask_to_grid_area_average():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:4, :2] = True
    g = viz.mask_to_grid(m, (2, 2))
    np.testing.assert_allclose(g.numpy(), [[0.5, 0.0], [0.0, 0.0]])
    with pytest.raises(ValueError):
        viz.mask_to_grid(torch.ones(3), (1, 1))
