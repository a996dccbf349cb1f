"""Synthetic scenes whose right answer is known: images, instance masks and shape classes.

Pretrained vision checkpoints cannot be downloaded in the offline profile, yet the vision chapters
must show measured results. These scenes are drawn by a seeded generator, so every image comes with
its exact per-pixel instance mask and the class of every object.

Scenes are ``IMAGE_SIZE x IMAGE_SIZE`` RGB images (64 x 64 by default; with ``PATCH_SIZE = 8`` a
ViT sees an 8 x 8 grid of 64 tokens) holding 1 to ``MAX_OBJECTS`` non-overlapping shapes from
``CLASSES``. Three difficulty levels:

``"easy"``
    colour-separable: a dark, nearly uniform background and saturated objects of distinct hues.
``"medium"``
    a two-colour gradient background, objects of moderate saturation and shading, more pixel noise.
``"hard"``
    shared-palette clutter: the background is a mosaic of cells in three palette colours, some of
    them striped, and the objects are solid or striped in the same palette colours. Colour alone
    does not separate objects from background; shape and texture do.

Determinism: scene ``i`` of ``generate(n, seed, level)`` depends only on ``(seed, level, i)``
(a :class:`numpy.random.SeedSequence` of those three numbers), so ``generate(k, seed)`` is the first
``k`` scenes of ``generate(n, seed)`` for every ``k <= n``, on every platform.

The held-out benchmark is ``benchmark(level)`` = ``generate(BENCHMARK_SIZE, BENCHMARK_SEED, level)``.
Train on any other seed (``TRAIN_SEED`` is the project's choice).
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "IMAGE_SIZE",
    "PATCH_SIZE",
    "CLASSES",
    "LEVELS",
    "MAX_OBJECTS",
    "BENCHMARK_SEED",
    "BENCHMARK_SIZE",
    "TRAIN_SEED",
    "Scenes",
    "SceneDataset",
    "generate",
    "benchmark",
    "colour_contrast",
    "centre_prior",
    "patch_foreground",
    "mask_to_grid",
    "patch_objects",
    "COLOUR_NAMES",
    "colour_names",
    "captions",
]

IMAGE_SIZE = 64
PATCH_SIZE = 8
CLASSES = ("circle", "square", "triangle", "cross")
LEVELS = ("easy", "medium", "hard")
MAX_OBJECTS = 3
BENCHMARK_SEED = 20250717
BENCHMARK_SIZE = 500
TRAIN_SEED = 0

_LEVEL_ID = {name: i for i, name in enumerate(LEVELS)}


@dataclass
class Scenes:
    """A batch of generated scenes.

    Attributes
    ----------
    images : torch.Tensor
        ``(n, 3, H, W)`` float32 RGB in [0, 1].
    masks : torch.Tensor
        ``(n, H, W)`` int64 instance ids: 0 background, ``1..n_objects[s]`` the objects of scene s.
    labels : torch.Tensor
        ``(n, MAX_OBJECTS)`` int64; ``labels[s, k]`` is the class index (into ``CLASSES``) of
        instance ``k + 1`` of scene ``s``, ``-1`` where scene ``s`` has fewer objects.
    n_objects : torch.Tensor
        ``(n,)`` int64 number of objects per scene.
    levels : tuple of str
        Difficulty level of each scene (all equal unless generated with ``level="mixed"``).
    seed : int
        The seed the scenes were generated from.
    classes : tuple of str
        Class names, ``CLASSES``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    n_objects: torch.Tensor
    levels: tuple
    seed: int
    classes: tuple = field(default=CLASSES)

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def foreground(self) -> torch.Tensor:
        """``(n, H, W)`` bool, True on object pixels."""
        return self.masks > 0

    @property
    def presence(self) -> torch.Tensor:
        """``(n, len(CLASSES))`` float32 multi-hot: 1 where the scene holds an object of that class."""
        out = torch.zeros(len(self), len(self.classes))
        rows, cols = torch.nonzero(self.labels >= 0, as_tuple=True)
        out[rows, self.labels[rows, cols]] = 1.0
        return out

    def __getitem__(self, i: int) -> dict:
        """Scene ``i`` as a dict: image, mask, labels, n_objects, presence, level."""
        return {
            "image": self.images[i],
            "mask": self.masks[i],
            "labels": self.labels[i],
            "n_objects": self.n_objects[i],
            "presence": self.presence[i],
            "level": self.levels[i],
        }


# ----------------------------------------------------------------------------------------------
# drawing


def _shape_mask(kind: int, cx: float, cy: float, r: float, theta: float, yy, xx) -> np.ndarray:
    """Boolean mask of one shape of bounding radius ``r`` centred at ``(cx, cy)``, rotated by theta."""
    c, s = np.cos(theta), np.sin(theta)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    name = CLASSES[kind]
    if name == "circle":
        return u * u + v * v <= r * r
    if name == "square":
        h = r / np.sqrt(2.0)
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if name == "triangle":
        # equilateral triangle with circumradius r: three half-planes at distance r / 2
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):
            a = np.pi / 2 + 2 * np.pi * k / 3
            inside &= u * np.cos(a) + v * np.sin(a) <= r / 2
        return inside
    if name == "cross":
        w = r / 3.0
        h = r / np.sqrt(2.0) * 1.15
        return ((np.abs(u) <= h) & (np.abs(v) <= w)) | ((np.abs(v) <= h) & (np.abs(u) <= w))
    raise ValueError(f"unknown shape class {kind}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


def _stripes(rng, yy, xx) -> np.ndarray:
    """Boolean stripe pattern with random orientation, period 4..7 px and phase."""
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, 7.0)
    t = (xx * np.cos(theta) + yy * np.sin(theta)) / period + rng.uniform()
    return (t - np.floor(t)) < 0.5


def _background(rng, level: str, size: int, yy, xx):
    if level == "easy":
        base = rng.uniform(0.08, 0.3)
        tint = rng.uniform(-0.04, 0.04, size=3)
        img = np.broadcast_to(base + tint, (size, size, 3)).copy()
        return img, None
    if level == "medium":
        c0 = _hsv(rng.uniform(), rng.uniform(0.15, 0.5), rng.uniform(0.3, 0.7))
        c1 = _hsv(rng.uniform(), rng.uniform(0.15, 0.5), rng.uniform(0.3, 0.7))
        theta = rng.uniform(0, 2 * np.pi)
        t = ((xx - size / 2) * np.cos(theta) + (yy - size / 2) * np.sin(theta)) / size + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (1 - t) * c0 + t * c1, None
    # hard: Voronoi mosaic of palette colours, some cells striped
    h0 = rng.uniform()
    palette = np.stack([
        _hsv(h0 + k / 3 + rng.uniform(-0.05, 0.05), rng.uniform(0.4, 0.8), rng.uniform(0.35, 0.9))
        for k in range(3)
    ])
    n_cells = rng.integers(8, 14)
    seeds = rng.uniform(0, size, size=(n_cells, 2))
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    cell = np.argmin(d, axis=-1)
    img = np.zeros((size, size, 3))
    for c in range(n_cells):
        where = cell == c
        col = palette[rng.integers(3)]
        if rng.uniform() < 0.35:
            other = palette[rng.integers(3)]
            st = _stripes(rng, yy, xx)
            img[where & st] = col
            img[where & ~st] = other
        else:
            img[where] = col
    return img, palette


def _object_colour(rng, level: str, hues_used: list, palette):
    """Return a function painting an object's pixels, given its boolean mask."""
    if level == "easy":
        for _ in range(50):
            h = rng.uniform()
            if all(min(abs(h - g), 1 - abs(h - g)) >= 0.15 for g in hues_used):
                break
        hues_used.append(h)
        col = _hsv(h, rng.uniform(0.75, 1.0), rng.uniform(0.85, 1.0))
        return lambda img, m, yy, xx: img.__setitem__(m, col)
    if level == "medium":
        h = rng.uniform()
        col = _hsv(h, rng.uniform(0.4, 0.8), rng.uniform(0.45, 0.95))
        theta = rng.uniform(0, 2 * np.pi)
        amp = rng.uniform(0.05, 0.15)

        def paint(img, m, yy, xx):
            shade = np.cos(theta) * xx[m] + np.sin(theta) * yy[m]
            shade = (shade - shade.mean()) / max(np.ptp(shade), 1.0)
            img[m] = np.clip(col[None, :] * (1 + amp * shade[:, None]), 0, 1)

        return paint
    col = palette[rng.integers(3)]
    if rng.uniform() < 0.5:
        other = palette[rng.integers(3)]
        st_rng = np.random.default_rng(rng.integers(2**32))

        def paint(img, m, yy, xx):
            st = _stripes(st_rng, yy, xx)
            img[m & st] = col
            img[m & ~st] = other

        return paint
    return lambda img, m, yy, xx: img.__setitem__(m, col)


_NOISE = {"easy": 0.02, "medium": 0.04, "hard": 0.04}
_RADIUS = (7.0, 12.0)


def _one_scene(seed: int, level: str, index: int, size: int):
    rng = np.random.default_rng([seed, _LEVEL_ID[level], index])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    img, palette = _background(rng, level, size, yy, xx)
    mask = np.zeros((size, size), dtype=np.int64)
    labels = []
    n_obj = int(rng.integers(1, MAX_OBJECTS + 1))
    scale = size / IMAGE_SIZE
    placed = []  # (cx, cy, r)
    hues_used: list = []
    for _ in range(n_obj):
        for _attempt in range(100):
            r = rng.uniform(*_RADIUS) * scale
            cx, cy = rng.uniform(r + 2, size - r - 2, size=2)
            if all(np.hypot(cx - px, cy - py) >= r + pr + 2 for px, py, pr in placed):
                break
        else:
            break  # no room left for another object
        kind = int(rng.integers(len(CLASSES)))
        theta = rng.uniform(0, 2 * np.pi)
        m = _shape_mask(kind, cx, cy, r, theta, yy, xx)
        if m.sum() == 0:
            continue
        placed.append((cx, cy, r))
        paint = _object_colour(rng, level, hues_used, palette)
        paint(img, m, yy, xx)
        labels.append(kind)
        mask[m] = len(labels)
    img = img + rng.normal(0.0, _NOISE[level], size=img.shape)
    img = np.clip(img, 0.0, 1.0)
    return img.transpose(2, 0, 1).astype(np.float32), mask, labels


def generate(n: int, seed: int, level: str = "easy", size: int = IMAGE_SIZE) -> Scenes:
    """Generate ``n`` scenes deterministically from ``seed``.

    Parameters
    ----------
    n : int
        Number of scenes (>= 1).
    seed : int
        Non-negative integer. Scene ``i`` depends only on ``(seed, level, i)``.
    level : {"easy", "medium", "hard", "mixed"}
        Difficulty; ``"mixed"`` gives scene ``i`` the level ``LEVELS[i % 3]``.
    size : int
        Image height = width in pixels (>= 32; object sizes scale with it). Default 64.

    Returns
    -------
    Scenes
        ``images (n, 3, size, size)`` float32 in [0, 1], ``masks (n, size, size)`` int64 instance
        ids (0 = background), ``labels (n, MAX_OBJECTS)`` class per instance (-1 padding),
        ``n_objects (n,)``.

    Examples
    --------
    >>> s = generate(4, seed=0, level="easy")
    >>> s.images.shape, s.masks.shape, s.labels.shape
    (torch.Size([4, 3, 64, 64]), torch.Size([4, 64, 64]), torch.Size([4, 3]))

    See Also
    --------
    benchmark, SceneDataset
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if level != "mixed" and level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS + ('mixed',)}, got {level!r}")
    if not isinstance(size, (int, np.integer)) or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size!r}")
    imgs = np.empty((n, 3, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    labels = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    counts = np.empty(n, dtype=np.int64)
    levels = []
    for i in range(n):
        lv = LEVELS[i % len(LEVELS)] if level == "mixed" else level
        img, m, lab = _one_scene(int(seed), lv, i, int(size))
        imgs[i], masks[i] = img, m
        labels[i, : len(lab)] = lab
        counts[i] = len(lab)
        levels.append(lv)
    return Scenes(
        images=torch.from_numpy(imgs),
        masks=torch.from_numpy(masks),
        labels=torch.from_numpy(labels),
        n_objects=torch.from_numpy(counts),
        levels=tuple(levels),
        seed=int(seed),
    )


def benchmark(level: str = "easy", n: int = BENCHMARK_SIZE, size: int = IMAGE_SIZE) -> Scenes:
    """The held-out benchmark split: ``generate(n, BENCHMARK_SEED, level, size)``.

    Never train on ``BENCHMARK_SEED``. ``n`` below ``BENCHMARK_SIZE`` gives a prefix of the split.

    Examples
    --------
    >>> s = benchmark("hard", n=2)
    >>> s.seed == BENCHMARK_SEED, s.levels
    (True, ('hard', 'hard'))

    See Also
    --------
    generate
    """
    return generate(n, BENCHMARK_SEED, level, size)


class SceneDataset(Dataset):
    """A PyTorch ``Dataset`` over generated scenes.

    Parameters
    ----------
    n, seed, level, size
        As in :func:`generate`; or pass ``scenes=`` an existing :class:`Scenes`.
    transform : callable, optional
        Applied to the ``(3, H, W)`` image tensor of each item.

    Each item is a dict with ``image (3, H, W)``, ``mask (H, W)``, ``labels (MAX_OBJECTS,)``,
    ``n_objects``, ``presence (len(CLASSES),)`` and ``level``; the default collate stacks them.
    """

    def __init__(self, n: int | None = None, seed: int | None = None, level: str = "easy",
                 size: int = IMAGE_SIZE, transform=None, scenes: Scenes | None = None):
        if scenes is None:
            if n is None or seed is None:
                raise ValueError("SceneDataset needs n and seed, or scenes=")
            scenes = generate(n, seed, level, size)
        self.scenes = scenes
        self.transform = transform
        self._presence = scenes.presence

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict:
        s = self.scenes
        image = s.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return {
            "image": image,
            "mask": s.masks[i],
            "labels": s.labels[i],
            "n_objects": s.n_objects[i],
            "presence": self._presence[i],
            "level": s.levels[i],
        }


# ----------------------------------------------------------------------------------------------
# references


def colour_contrast(images: torch.Tensor, border: int = 2) -> torch.Tensor:
    """Colour-contrast foreground map: distance of each pixel's colour to the border colour.

    Parameters
    ----------
    images : torch.Tensor
        ``(..., 3, H, W)`` RGB in [0, 1].
    border : int
        Width in pixels of the frame whose per-channel median is taken as the background colour.

    Returns
    -------
    torch.Tensor
        ``(..., H, W)`` map in [0, 1]: ``||x_p - b||_2 / max_p ||x_p - b||_2`` with ``b`` the
        per-channel median of the border pixels (0 where the image is constant).

    Notes
    -----
    The classic background prior of salient-object detection: the frame is assumed to be
    background. It is the baseline that any attention-based foreground map should beat.

    Examples
    --------
    >>> m = colour_contrast(generate(2, seed=0).images)
    >>> m.shape, bool(m.max() <= 1)
    (torch.Size([2, 64, 64]), True)

    See Also
    --------
    centre_prior, patch_foreground
    """
    if images.ndim < 3 or images.shape[-3] != 3:
        raise ValueError(f"images must have shape (..., 3, H, W), got {tuple(images.shape)}")
    h, w = images.shape[-2:]
    if not 0 < border < min(h, w) / 2:
        raise ValueError(f"border must be in (0, min(H, W)/2), got {border}")
    x = images.float()
    frame = torch.ones(h, w, dtype=torch.bool, device=x.device)
    frame[border:-border, border:-border] = False
    b = x[..., frame].median(dim=-1).values  # (..., 3)
    d = (x - b[..., None, None]).norm(dim=-3)
    top = d.flatten(-2).amax(-1).clamp_min(1e-12)
    return d / top[..., None, None]


def centre_prior(n: int, size: int = IMAGE_SIZE, sigma: float = 0.25) -> torch.Tensor:
    """Centre prior ``exp(-||p - c||^2 / (2 (sigma * size)^2))``, shape ``(n, size, size)``.

    Examples
    --------
    >>> c = centre_prior(1, size=4)
    >>> c.shape, bool(c[0, 1, 1] > c[0, 0, 0])
    (torch.Size([1, 4, 4]), True)

    See Also
    --------
    colour_contrast
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    c = (torch.arange(size, dtype=torch.float32) + 0.5 - size / 2) / (sigma * size)
    g = torch.exp(-0.5 * (c[:, None] ** 2 + c[None, :] ** 2))
    return g.expand(n, size, size).clone()


def _grid_arg(shape, patch_size, grid):
    """The patch size when it tiles ``shape`` (``patch_size`` or ``grid`` given), else None."""
    h, w = shape
    if grid is None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if h % patch_size or w % patch_size:
            raise ValueError(f"mask size {(h, w)} is not divisible by patch_size {patch_size}; "
                             f"pass grid=(rows, cols) to area-average onto any grid")
        return patch_size
    r, c = (int(g) for g in grid)
    if r < 1 or c < 1:
        raise ValueError(f"grid must be two positive ints, got {grid!r}")
    return h // r if h % r == 0 and w % c == 0 and h // r == w // c else None


def patch_foreground(masks: torch.Tensor, patch_size: int = PATCH_SIZE, *,
                     grid=None) -> torch.Tensor:
    """Fraction of object pixels in each patch: ``(..., H, W)`` masks -> ``(..., rows, cols)``.

    This is the ground truth on the token grid (the best any patch-level map can do).

    Parameters
    ----------
    masks : Tensor, shape (..., H, W)
        Instance ids (or 0/1), 0 = background.
    patch_size : int
        Patch side in pixels; it must divide ``H`` and ``W``.
    grid : (int, int), optional
        The token grid instead of a patch size, for grids that do not divide the image (DINOv2's
        37 x 37 on a 64-pixel scene): each cell is the exact area share of the foreground in it
        (:func:`mask_to_grid`); a grid that does divide gives the same as its ``patch_size``.

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> masks[0, :2, :1] = 1
    >>> patch_foreground(masks, 2)
    tensor([[[0.5000, 0.0000],
             [0.0000, 0.0000]]])
    >>> patch_foreground(masks, grid=(3, 3)).shape
    torch.Size([1, 3, 3])

    See Also
    --------
    mask_to_grid, patch_objects
    """
    p = _grid_arg(masks.shape[-2:], patch_size, grid)
    if p is None:
        return mask_to_grid(masks > 0, grid).to(torch.float32)
    h, w = masks.shape[-2:]
    fg = (masks > 0).float()
    lead = fg.shape[:-2]
    fg = fg.reshape(*lead, h // p, p, w // p, p)
    return fg.mean(dim=(-3, -1))


def mask_to_grid(mask, grid) -> torch.Tensor:
    """Area-average ``(..., H, W)`` boolean / 0-1 masks onto a patch grid: ``(..., h, w)`` fractions.

    Parameters
    ----------
    mask : Tensor or array_like, shape (..., H, W)
        Masks (any device); True / 1 = inside.
    grid : (int, int)
        The patch grid ``(h, w)``; it need not divide ``(H, W)``: cell ``(i, j)`` covers the
        rectangle ``[i H / h, (i + 1) H / h) x [j W / w, (j + 1) W / w)`` and its value is the
        exact area share of the mask inside it (pixels cut by a cell edge count by the part
        inside), which is what a model sees after resizing the image to ``h`` x ``w`` patches.

    Returns
    -------
    Tensor, shape (..., h, w)
        float64 fraction of each patch inside the mask, on the mask's device.

    Raises
    ------
    ValueError
        A mask with fewer than two dimensions.

    Examples
    --------
    >>> import torch
    >>> m = torch.zeros(4, 4, dtype=torch.bool)
    >>> m[:2, :1] = True
    >>> mask_to_grid(m, (2, 2))
    tensor([[0.5000, 0.0000],
            [0.0000, 0.0000]], dtype=torch.float64)

    See Also
    --------
    patch_foreground, patch_objects
    """
    m = mask.detach() if isinstance(mask, torch.Tensor) else torch.as_tensor(np.asarray(mask))
    m = m.to(torch.float64)
    if m.ndim < 2:
        raise ValueError(f"mask_to_grid: expected (..., H, W) masks, got shape {tuple(m.shape)}")
    (H, W), (r, c) = m.shape[-2:], (int(g) for g in grid)
    if H % r == 0 and W % c == 0:  # whole pixels per patch: the block mean
        flat = m.reshape(-1, 1, H, W)
        out = torch.nn.functional.adaptive_avg_pool2d(flat, (r, c))
        return out.reshape(*m.shape[:-2], r, c)
    return _overlap(r, H, m.device) @ m @ _overlap(c, W, m.device).T


def _overlap(cells: int, pixels: int, device) -> torch.Tensor:
    """(cells, pixels) share of pixel ``j`` in cell ``i`` when ``cells`` cells tile ``pixels``.

    Cell ``i`` covers ``[i P / C, (i + 1) P / C)`` in pixel units; row ``i`` holds the length of
    its overlap with each pixel ``[j, j + 1)``, divided by the cell length ``P / C``.
    """
    edges = torch.arange(cells + 1, dtype=torch.float64, device=device) * (pixels / cells)
    j = torch.arange(pixels, dtype=torch.float64, device=device)
    lo = torch.maximum(edges[:-1, None], j[None])
    hi = torch.minimum(edges[1:, None], j[None] + 1)
    return (hi - lo).clamp_min(0) * (cells / pixels)


def patch_objects(masks: torch.Tensor, patch_size: int = PATCH_SIZE, *,
                  grid=None) -> torch.Tensor:
    """Object id of each patch: the instance covering more than half of its pixels, else 0.

    Parameters
    ----------
    masks : LongTensor, shape (B, H, W)
        Instance ids, 0 = background.
    patch_size : int
        Patch side in pixels; it must divide ``H`` and ``W``.
    grid : (int, int), optional
        The token grid instead of a patch size, for grids that do not divide the image: the
        covered fractions are exact area shares (:func:`mask_to_grid`).

    Returns
    -------
    LongTensor, shape (B, rows, cols)
        On the masks' device.

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros(1, 4, 4, dtype=torch.long)
    >>> masks[0, :2, :2] = 1
    >>> masks[0, 2:, 2:3] = 2          # half of a patch: not more than half
    >>> patch_objects(masks, 2)
    tensor([[[1, 0],
             [0, 0]]])
    >>> patch_objects(masks, grid=(3, 3))[0, 0, 0].item()
    1

    See Also
    --------
    patch_foreground, mask_to_grid
    """
    p = _grid_arg(masks.shape[-2:], patch_size, grid)
    k = int(masks.max()) + 1
    oh = torch.nn.functional.one_hot(masks, k).float().permute(0, 3, 1, 2)  # (B, k, H, W)
    if p is None:
        frac = mask_to_grid(oh, grid).to(torch.float32)
    else:
        frac = torch.nn.functional.avg_pool2d(oh, p)  # (B, k, r, c)
    frac[:, 0] = 0.0
    val, idx = frac.max(1)
    return torch.where(val > 0.5, idx, torch.zeros_like(idx))


# ----------------------------------------------------------------------------------------------
# captions: every object named by colour and shape (the text stream of the FLUX-class model)

#: Colour names of :func:`colour_names`, with the hue ranges (degrees) they cover; every name is
#: one token of the MiniLM (BERT) vocabulary. Objects with saturation below 0.2 are ``"grey"``.
COLOUR_NAMES = ("red", "orange", "yellow", "green", "turquoise", "blue", "purple", "pink",
                "grey")
_HUE_EDGES = (15.0, 40.0, 70.0, 160.0, 200.0, 260.0, 290.0, 340.0)  # upper edges, red wraps


def colour_names(sc: Scenes) -> list:
    """The colour name of every object: a list (one per scene) of names, in instance order.

    The name comes from the hue of the object's mean RGB over its mask (:data:`COLOUR_NAMES`):
    red below 15 degrees and from 340, orange to 40, yellow to 70, green to 160, turquoise to
    200, blue to 260, purple to 290, pink to 340; ``"grey"`` below saturation 0.2.

    Examples
    --------
    >>> colour_names(generate(3, seed=0))
    [['pink'], ['green', 'yellow', 'blue'], ['blue', 'green']]

    See Also
    --------
    captions
    """
    out = []
    for s in range(len(sc)):
        names = []
        for k in range(int(sc.n_objects[s])):
            m = sc.masks[s] == k + 1
            rgb = sc.images[s][:, m].mean(1).tolist()
            h, sat, _ = colorsys.rgb_to_hsv(*rgb)
            if sat < 0.2:
                names.append("grey")
                continue
            deg = h * 360.0
            idx = int(np.searchsorted(_HUE_EDGES, deg, side="right"))
            names.append(COLOUR_NAMES[idx % 8])
        out.append(names)
    return out


def captions(sc: Scenes) -> list:
    """One caption per scene naming every object by colour and shape, with character spans.

    The caption lists the objects in instance order: ``"a red circle"``, ``"a red circle and a
    blue square"``, ``"a red circle, a blue square and a green cross"``.

    Returns
    -------
    list of (str, list of dict)
        Per scene the caption and, per object (instance ``k + 1``), ``{"colour": (start, end),
        "shape": (start, end)}``: the character spans of its two words.

    Examples
    --------
    >>> text, spans = captions(generate(2, seed=0))[1]
    >>> text
    'a green circle, a yellow square and a blue triangle'
    >>> [text[slice(*s["shape"])] for s in spans]
    ['circle', 'square', 'triangle']

    See Also
    --------
    colour_names
    """
    out = []
    for s, names in enumerate(colour_names(sc)):
        parts, spans, pos = [], [], 0
        n = len(names)
        for k, colour in enumerate(names):
            sep = "" if k == 0 else (" and " if k == n - 1 else ", ")
            shape = sc.classes[int(sc.labels[s, k])]
            pos += len(sep) + 2  # "a "
            spans.append({"colour": (pos, pos + len(colour)),
                          "shape": (pos + len(colour) + 1, pos + len(colour) + 1 + len(shape))})
            parts.append(f"{sep}a {colour} {shape}")
            pos += len(colour) + 1 + len(shape)
        out.append(("".join(parts), spans))
    return out
