"""The synthetic scenes: deterministic, masks that match their objects, references that are right."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from attnchain.data import scenes


@pytest.mark.parametrize("level", scenes.LEVELS)
def test_generate_is_deterministic_and_prefix_stable(level):
    a = scenes.generate(6, seed=3, level=level)
    b = scenes.generate(6, seed=3, level=level)
    c = scenes.generate(3, seed=3, level=level)
    for x, y in [(a.images, b.images), (a.masks, b.masks), (a.labels, b.labels)]:
        assert torch.equal(x, y)
    assert torch.equal(a.images[:3], c.images) and torch.equal(a.masks[:3], c.masks)
    other = scenes.generate(6, seed=4, level=level)
    assert not torch.equal(a.images, other.images)


@pytest.mark.parametrize("level", scenes.LEVELS)
def test_shapes_ranges_and_labels(level):
    s = scenes.generate(20, seed=1, level=level)
    n, size = 20, scenes.IMAGE_SIZE
    assert s.images.shape == (n, 3, size, size) and s.images.dtype == torch.float32
    assert s.masks.shape == (n, size, size) and s.labels.shape == (n, scenes.MAX_OBJECTS)
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    for i in range(n):
        k = int(s.n_objects[i])
        assert 1 <= k <= scenes.MAX_OBJECTS
        # instance ids are exactly 0..k, every object has pixels and a class, padding is -1
        assert set(torch.unique(s.masks[i]).tolist()) == set(range(k + 1))
        assert (s.labels[i, :k] >= 0).all() and (s.labels[i, :k] < len(scenes.CLASSES)).all()
        assert (s.labels[i, k:] == -1).all()
        assert s.presence[i].sum() == len(set(s.labels[i, :k].tolist()))


def test_masks_match_the_drawn_objects():
    """On the easy level each object is painted in one colour over a dark background: the pixels of
    each instance mask are far from the background colour and homogeneous among themselves."""
    s = scenes.generate(12, seed=5, level="easy")
    for i in range(12):
        img, mask = s.images[i].double().numpy(), s.masks[i].numpy()
        bg = np.median(img[:, mask == 0], axis=1)
        dist = np.linalg.norm(img - bg[:, None, None], axis=0)
        assert np.median(dist[mask > 0]) > 5 * np.median(dist[mask == 0])
        for k in range(1, int(s.n_objects[i]) + 1):
            inside = img[:, mask == k]
            spread = np.linalg.norm(inside - np.median(inside, axis=1, keepdims=True), axis=0)
            assert np.median(spread) < 0.5 * np.linalg.norm(np.median(inside, axis=1) - bg)


@pytest.mark.parametrize("kind,area", [
    (0, np.pi),                    # circle of radius r
    (1, 2.0),                      # square inscribed in the circle: side r * sqrt(2)
    (2, 3 * np.sqrt(3) / 4),       # equilateral triangle with circumradius r
])
def test_shape_primitives_have_their_area(kind, area):
    r, size = 20.0, 64
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    m = scenes._shape_mask(kind, 32.0, 32.0, r, 0.3, yy, xx)
    assert abs(m.sum() / (area * r * r) - 1) < 0.03


def test_easy_objects_are_colour_separable():
    s = scenes.generate(30, seed=2, level="easy")
    from sklearn.metrics import average_precision_score

    cc = scenes.colour_contrast(s.images)
    ap = np.mean([average_precision_score(s.foreground[i].flatten().numpy(),
                                          cc[i].flatten().numpy()) for i in range(30)])
    assert ap > 0.95


def test_colour_contrast_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 16, 20, generator=g)
    out = scenes.colour_contrast(img, border=2)
    for i in range(2):
        x = img[i].numpy().astype(np.float64)
        frame = np.ones((16, 20), bool)
        frame[2:-2, 2:-2] = False
        b = np.array([np.sort(x[c][frame])[(frame.sum() - 1) // 2] for c in range(3)])  # lower median
        d = np.linalg.norm(x - b[:, None, None], axis=0)
        np.testing.assert_allclose(out[i].numpy(), d / d.max(), rtol=1e-5, atol=1e-6)


def test_patch_foreground_is_the_block_mean():
    s = scenes.generate(3, seed=0)
    pf = scenes.patch_foreground(s.masks)
    p = scenes.PATCH_SIZE
    fg = (s.masks > 0).float().numpy()
    direct = fg.reshape(3, 64 // p, p, 64 // p, p).mean(axis=(2, 4))
    np.testing.assert_allclose(pf.numpy(), direct, atol=1e-7)


def test_centre_prior_peaks_in_the_middle():
    c = scenes.centre_prior(2, size=32)
    assert c.shape == (2, 32, 32)
    assert torch.isclose(c[0].max(), c[0, 15:17, 15:17].max())
    assert c[0, 0, 0] < c[0, 16, 16]


def test_benchmark_is_a_fixed_seed_and_dataset_collates():
    b = scenes.benchmark("medium", n=4)
    g = scenes.generate(4, scenes.BENCHMARK_SEED, "medium")
    assert torch.equal(b.images, g.images)
    assert scenes.BENCHMARK_SEED != scenes.TRAIN_SEED
    ds = scenes.SceneDataset(n=5, seed=0, level="hard")
    batch = next(iter(DataLoader(ds, batch_size=5)))
    assert batch["image"].shape == (5, 3, 64, 64) and batch["mask"].shape == (5, 64, 64)
    mixed = scenes.generate(6, seed=0, level="mixed")
    assert mixed.levels == ("easy", "medium", "hard") * 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(n=0, seed=0), "n must be"),
    (dict(n=2, seed=-1), "seed must be"),
    (dict(n=2, seed=0, level="impossible"), "level must be"),
    (dict(n=2, seed=0, size=16), "size must be"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        scenes.generate(**kwargs)


def test_bad_reference_inputs():
    with pytest.raises(ValueError, match="images must have shape"):
        scenes.colour_contrast(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        scenes.patch_foreground(torch.zeros(1, 10, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="SceneDataset needs"):
        scenes.SceneDataset()


def test_mask_to_grid_area_average_batched_and_uneven():
    m = torch.zeros(8, 8, dtype=torch.bool)
    m[:4, :2] = True
    g = scenes.mask_to_grid(m, (2, 2))
    assert g.dtype == torch.float64
    np.testing.assert_allclose(g.numpy(), [[0.5, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(scenes.mask_to_grid(m.numpy(), (2, 2)).numpy(), g.numpy())
    masks = scenes.generate(3, seed=1).masks
    batched = scenes.mask_to_grid(masks == 1, (8, 8))
    one_by_one = torch.stack([scenes.mask_to_grid(x == 1, (8, 8)) for x in masks])
    assert torch.equal(batched, one_by_one)  # bit-identical: the chapters' numbers rely on it
    np.testing.assert_allclose(batched.float().numpy(),
                               scenes.patch_foreground((masks == 1).long()).numpy(), atol=1e-6)
    uneven = scenes.mask_to_grid(torch.ones(64, 64), (37, 37))  # a grid that does not divide
    assert uneven.shape == (37, 37) and torch.allclose(uneven, torch.ones(37, 37, dtype=torch.float64))
    with pytest.raises(ValueError):
        scenes.mask_to_grid(torch.ones(3), (1, 1))


def test_patch_objects_majority_vote():
    masks = torch.zeros(1, 8, 8, dtype=torch.long)
    masks[0, :4, :4] = 1  # object 1 = patch (0, 0) exactly
    masks[0, 4:8, 4:6] = 2  # object 2 = half of patch (1, 1): not more than half
    masks[0, 0:4, 4:7] = 2  # 12 of 16 pixels of patch (0, 1)
    assert scenes.patch_objects(masks, 4).tolist() == [[[1, 2], [0, 0]]]


def _area_share_reference(mask, grid):
    """Exact area shares: nearest-upsample to a common multiple of both sizes, then block means."""
    (H, W), (r, c) = mask.shape, grid
    ly, lx = np.lcm(H, r), np.lcm(W, c)
    up = np.repeat(np.repeat(np.asarray(mask, dtype=np.float64), ly // H, 0), lx // W, 1)
    return up.reshape(r, ly // r, c, lx // c).mean(axis=(1, 3))


@pytest.mark.parametrize("grid", [(37, 37), (5, 7), (64, 64), (1, 1), (3, 64)])
def test_mask_to_grid_exact_area_shares_on_any_grid(grid):
    masks = scenes.benchmark("hard", n=2).masks
    got = scenes.mask_to_grid(masks > 0, grid)
    for m, g in zip(masks, got):
        np.testing.assert_allclose(g.numpy(), _area_share_reference(m > 0, grid), atol=1e-12)
    # fractions of the whole image are kept: the grid mean is the foreground fraction
    np.testing.assert_allclose(got.mean((-2, -1)).numpy(), (masks > 0).double().mean((-2, -1)))


def test_patch_ground_truth_on_a_grid_that_does_not_divide():
    """Regression (issue 18): DINOv2's 37 x 37 grid on a 64-pixel scene.

    The old code took ``patch = 64 // 37 = 1`` and so scored the pixel mask as the patch-grid
    ceiling; the grid ground truth must be the 37 x 37 area shares instead."""
    masks = scenes.benchmark("easy", n=3).masks
    fg = scenes.patch_foreground(masks, grid=(37, 37))
    assert fg.shape == (3, 37, 37) and fg.dtype == torch.float32
    ref = np.stack([_area_share_reference(m > 0, (37, 37)) for m in masks])
    np.testing.assert_allclose(fg.numpy(), ref, atol=1e-6)
    assert ((fg > 0) & (fg < 1)).any()  # cells cut by object edges: not a pixel mask
    obj = scenes.patch_objects(masks, grid=(37, 37))
    for b, m in enumerate(masks):
        for o in range(1, int(m.max()) + 1):
            share = _area_share_reference(m == o, (37, 37))
            assert torch.equal(obj[b] == o, torch.from_numpy(share > 0.5))
    # a grid that divides is the patch size, bit for bit
    assert torch.equal(scenes.patch_foreground(masks, grid=(8, 8)), scenes.patch_foreground(masks, 8))
    assert torch.equal(scenes.patch_objects(masks, grid=(8, 8)), scenes.patch_objects(masks, 8))
    with pytest.raises(ValueError, match="pass grid"):
        scenes.patch_foreground(masks, 37)
    with pytest.raises(ValueError, match="grid must be"):
        scenes.patch_objects(masks, grid=(0, 3))
