"""Token masking: the removal intervention, the schedule and AUC, the rankings, and the task
end to end (offline scenes; the full-profile code path on toy twins and an ImageNetV2-format
archive written here), with resume and a two-shard merge."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnchain.capture.recorder import TokenLayout
from attnchain.interventions import find_vit, remove_tokens
from attnchain.tasks import token_masking as tm
from attnchain.zoo import classifiers
from attnchain.zoo.registry import build_tiny_timm_vit

G = torch.Generator().manual_seed(0)
X = torch.randn(3, 3, 32, 32, generator=G)


@pytest.fixture(scope="module")
def vit():
    return build_tiny_timm_vit().eval()


def _hooks(vit):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit.modules())


def _manual_removal(vit, x, remove):
    """Reference: the ViT's forward written out, with the kept tokens selected by hand."""
    p = vit.num_prefix_tokens
    t = vit._pos_embed(vit.patch_embed(x))
    rows = []
    for b in range(x.shape[0]):
        keep = [*range(p), *[p + j for j in range(remove.shape[1]) if not remove[b, j]]]
        rows.append(t[b, keep])
    t = vit.norm(vit.blocks(vit.norm_pre(torch.stack(rows))))
    return vit.forward_head(t)


@torch.no_grad()
def test_removing_nothing_is_bit_identical(vit):
    ref = vit(X)
    for mode in ("remove", "mask"):
        with remove_tokens(vit, torch.zeros(3, 16, dtype=torch.bool), mode=mode):
            assert torch.equal(vit(X), ref)
        with remove_tokens(vit, torch.zeros(3, 0, dtype=torch.long), mode=mode):
            assert torch.equal(vit(X), ref)


@torch.no_grad()
def test_removal_matches_the_forward_written_out_and_the_key_mask(vit):
    for k in (1, 5, 15):
        remove = torch.zeros(3, 16, dtype=torch.bool)
        for b in range(3):
            remove[b, torch.randperm(16, generator=G)[:k]] = True
        with remove_tokens(vit, remove):
            removed = vit(X)
        with remove_tokens(vit, remove, mode="mask"):
            masked = vit(X)
        torch.testing.assert_close(removed, _manual_removal(vit, X, remove), rtol=0, atol=1e-6)
        # a CLS-token head: masking the keys is the same intervention as removal
        torch.testing.assert_close(masked, removed, rtol=0, atol=1e-5)
        assert not torch.allclose(removed, vit(X), atol=1e-4)


@torch.no_grad()
def test_key_mask_differs_from_removal_for_a_patch_mean_head():
    model, _ = classifiers.tiny("dino-vitb16-linear")
    remove = torch.zeros(3, 16, dtype=torch.bool)
    remove[:, :8] = True
    with remove_tokens(model, remove):
        removed = model(X)
    with remove_tokens(model, remove, mode="mask"):
        masked = model(X)
    assert not torch.allclose(removed, masked, atol=1e-4)  # the mean still sees masked tokens


@torch.no_grad()
def test_model_is_restored_after_an_exception(vit):
    ref, hooks = vit(X), _hooks(vit)
    for mode in ("remove", "mask"):
        with pytest.raises(KeyError):
            with remove_tokens(vit, torch.tensor([[0, 1]] * 3), mode=mode):
                vit(X)
                raise KeyError("inside")
        assert _hooks(vit) == hooks
        assert torch.equal(vit(X), ref)


@torch.no_grad()
def test_bad_requests_name_the_problem(vit):
    with pytest.raises(ValueError, match="mode"):
        with remove_tokens(vit, torch.tensor([[0]]), mode="drop"):
            pass
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        with remove_tokens(vit, torch.tensor([[16]])):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with remove_tokens(vit, torch.tensor([[2, 2]])):
            pass
    with pytest.raises(ValueError, match="same number"):
        with remove_tokens(vit, torch.tensor([[True] + [False] * 15, [False] * 16])):
            pass
    with pytest.raises(ValueError, match="3 images"):
        with remove_tokens(vit, torch.tensor([[0], [1]])):
            vit(X)
    with pytest.raises(ValueError, match="bool mask"):
        with remove_tokens(vit, torch.rand(3, 16)):
            pass
    with pytest.raises(ValueError, match="VisionTransformer"):
        find_vit(torch.nn.Linear(2, 2))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=12), st.integers(0, 10 ** 6))
def test_auc_is_the_rescaled_trapezoid(values, seed):
    rng = np.random.default_rng(seed)
    f = np.sort(rng.choice(np.linspace(0, 1, 101), size=len(values), replace=False))
    expected = sum((values[i] + values[i + 1]) / 2 * (f[i + 1] - f[i])
                   for i in range(len(f) - 1)) / (f[-1] - f[0])
    assert float(tm.auc(torch.tensor(values, dtype=torch.float64), f.tolist())) == pytest.approx(expected, abs=1e-12)
    assert float(tm.auc(torch.tensor(values, dtype=torch.float64), f.tolist())) == pytest.approx(
        np.trapezoid(values, f) / (f[-1] - f[0]), abs=1e-12)


def test_auc_rejects_bad_schedules():
    with pytest.raises(ValueError, match="increase"):
        tm.auc(torch.ones(3), [0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="last axis"):
        tm.auc(torch.ones(4), [0.0, 0.5, 1.0])


def test_rankings_seeded_per_image_and_known_orders():
    layout = TokenLayout(n=10, cls=(0,), image=tuple(range(1, 10)), grid=(3, 3))
    M = torch.softmax(torch.randn(2, 10, 10, generator=G), -1)
    a = tm.rank_scores(M, layout, items=[4, 9], seeds=3)
    b = tm.rank_scores(M[1:], layout, items=[9], seeds=3)  # another batch composition
    assert torch.equal(a["random"][:, 1], b["random"][:, 0])
    assert not torch.equal(a["random"][0], a["random"][1])  # seeds differ
    assert tm.removal_order(a["centre"])[0, 0] == 4  # the centre patch of a 3x3 grid first
    torch.testing.assert_close(a["column_sum"], M.sum(-2)[:, 1:])
    torch.testing.assert_close(a["cls"], M[:, 0, 1:])
    assert tm.removal_order(torch.tensor([[1.0, 2.0, 2.0, 0.0]])).tolist() == [[1, 2, 0, 3]]


def test_offline_evaluation_resumes_and_merges_shards(tmp_path):
    kw = dict(n=6, batch_size=2, seeds=2, progress=False)
    whole = tm.evaluate("scene-vit", **kw)
    # an interrupted run: the second batch fails; the rerun computes only what is missing
    calls = []
    real = tm._batch_rows

    def flaky(*args):
        calls.append(list(args[3]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    tm._batch_rows = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            tm.evaluate("scene-vit", results_dir=tmp_path / "r", **kw)
        resumed = tm.evaluate("scene-vit", results_dir=tmp_path / "r", **kw)
    finally:
        tm._batch_rows = real
    assert calls == [[0, 1], [2, 3], [2, 3], [4, 5]]
    np.testing.assert_array_equal(resumed.value, whole.value)
    for i in range(2):
        tm.evaluate("scene-vit", results_dir=tmp_path / "s", shard=(i, 2), **kw)
    from attnchain.tasks import Runner
    merged = tm.evaluate("scene-vit", results_dir=tmp_path / "s", **kw)
    assert not list((tmp_path / "s").glob("*.shard-*"))
    np.testing.assert_array_equal(merged.value, whole.value)
    assert Runner  # the merge is the runner's (attnchain.tasks.Runner.merge)
    s = tm.summarise(whole, n_boot=200)
    assert list(s.index) == list(tm.METHODS) and s.paper.isna().all()
    # at f = 0 every ranking sees the same unmasked images
    f0 = whole[whole.metric == "acc@0.00"].pivot(index="item", columns="method", values="value")
    assert (f0.nunique(axis=1) == 1).all()


@pytest.mark.parametrize("family", classifiers.FAMILIES)
def test_full_profile_code_path_on_toy_twins(tmp_path, family, monkeypatch):
    from attnchain.data import imagenet

    archive = imagenet.write_imagenetv2_sample(tmp_path, classes=(0, 2, 10), per_class=2, size=40)
    root = tmp_path / "data"
    imagenet.imagenetv2(root=root, archive=archive)
    name = {"vit-b16": "tiny-vit-in1k", "clip-vitb16-zeroshot": "tiny-clip-in1k",
            "dino-vitb16-linear": "tiny-dino-in1k", "dinov2-reg-vitb14-linear": "tiny-dinov2-in1k"}
    kw = dict(dataset="imagenetv2-matched-frequency", data_root=root, batch_size=2, seeds=2,
              progress=False)
    tm.evaluate(name[family], n=3, results_dir=tmp_path / "r", **kw)  # stopped after 3 images
    computed = []
    real = tm._batch_rows
    monkeypatch.setattr(tm, "_batch_rows", lambda *a: computed.append(list(a[3])) or real(*a))
    t = tm.evaluate(name[family], n=6, results_dir=tmp_path / "r", **kw)
    assert computed == [[3, 4], [5]]  # resumed: only the images not yet in the results file
    monkeypatch.setattr(tm, "_batch_rows", real)
    assert t.item.nunique() == 6 and "oracle" not in set(t.method)
    assert set(t.method) == set(tm.METHODS) - {"oracle"}
    for i in range(2):
        tm.evaluate(name[family], n=6, results_dir=tmp_path / "s", shard=(i, 2), **kw)
    merged = tm.evaluate(name[family], n=6, results_dir=tmp_path / "s", **kw)
    np.testing.assert_array_equal(merged.value, t.value)
