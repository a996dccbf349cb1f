r"""``feature-attention``: a transparent multi-head softmax self-attention with no learned weights.

Every number this model computes can be written down. An image is cut into square pixel
patches, the tokens, in raster order on a ``(rows, cols)`` grid, no CLS token: ``4 x 4`` px
patches for images of at most 128 px per side (a 64 x 64 scene is a 16 x 16 grid), ``8 x 8``
px patches for larger ones (the preprocess shrinks photographs to at most 256 px per side, so
at most 32 x 32 tokens); see :func:`patch_size_for`. Each patch gets a
vector of *named descriptors* (:data:`DESCRIPTORS`):

``L, a, b``
    mean CIE L*a*b* colour of the patch (sRGB, D65 white);
``std_L, std_a, std_b``
    standard deviation of L*, a*, b* inside the patch;
``grad_0, grad_45, grad_90, grad_135``
    mean absolute response of four oriented first-derivative-of-Gaussian filters
    (:math:`\sigma = 1` px, ``5 x 5``, reflect padding) applied to :math:`L^*/100`;
``row, col``
    the patch centre, ``((r + 0.5) / S, (c + 0.5) / S)`` with ``S = max(rows, cols)``.

Descriptors are standardised per image and per *group* (colour = ``L, a, b``; texture = the three
standard deviations and four filter energies; position is left as is): a group's columns are
centred over the patches and divided by one common scale, the root-mean-square spread of the group
``max(sqrt(mean_i ||g_i - mean(g)||^2 / d_g), floor_g)``, so distances inside a group keep their
geometry and a flat image is not blown up to unit variance (the floors are
:data:`GROUP_FLOORS`). Call the standardised descriptor of patch ``i``
:math:`f_i \in \mathbb{R}^{12}` (:func:`standardise`).

The heads (:data:`HEADS`), one layer, queries equal keys:

.. math::

    q_i^{(h)} = k_i^{(h)} = W_h f_i, \qquad
    A^{(h)}_{ij} = \frac{\exp(-\lVert q_i^{(h)} - k_j^{(h)}\rVert^2 / \tau_h)}
                        {\sum_{l} \exp(-\lVert q_i^{(h)} - k_l^{(h)}\rVert^2 / \tau_h)}
                 = \operatorname{softmax}_j\!\Big(\frac{2\, q_i^{(h)} \cdot k_j^{(h)}
                   - \lVert k_j^{(h)}\rVert^2}{\tau_h}\Big),

(the :math:`-\lVert q_i\rVert^2/\tau_h` term is constant along a row and cancels in the softmax),
i.e. ordinary scaled dot-product attention with scale :math:`2/\tau_h` plus the key bias
:math:`-\lVert k_j\rVert^2/\tau_h`. :math:`W_h` is a fixed 0/1 (or scaled) selection matrix of the
head's descriptor group, stored as a buffer:

``colour``
    ``(L, a, b)``, :math:`\tau = 0.5`;
``texture``
    ``(std_L, std_a, std_b, grad_0, grad_45, grad_90, grad_135)``, :math:`\tau = 64`;
``position``
    ``(row, col)``, :math:`\tau = 0.2`;
``colour×position``
    ``(L, a, b)`` and ``3 · (row, col)``, :math:`\tau = 4` (the bilateral kernel of Shi &
    Malik's normalised cut: colour similarity times proximity);
``noise``
    the deliberately noisy head: :math:`q_i = k_i = \xi_i`, ``NOISE_DIM = 64`` i.i.d. standard
    normal numbers per token drawn from a generator seeded with the constant :data:`NOISE_SEED`
    (independent of the image), :math:`\tau = 128`. High-dimensional noise points are all
    about equally far apart (:math:`\lVert \xi_i - \xi_j \rVert^2 \approx 128`), so the head's
    attention is nearly uniform with irregular ripples and no structure: its chain mixes at
    once and its :math:`|\lambda_2|` is small.

The temperatures were set by looking at scenes from seeds other than the benchmark's
(``attnchain.data.scenes.generate(40, 7)``; checked on seeds 11 and 123), never at the
benchmark.

The values of each head are all of :math:`f`; the output concatenates the heads,
``(B, N, H · 12)``: :math:`\mathrm{out}_i = [A^{(1)} F; \dots; A^{(H)} F]_i`.

Why it is worth having: :math:`A^{(h)} = D^{-1} K^{(h)}` with the symmetric Gaussian affinity
:math:`K_{ij} = \exp(-\lVert q_i - q_j\rVert^2/\tau)` and :math:`D = \mathrm{diag}(K 1)`. This is
exactly the random walk whose metastable sets are normalised-cut segments (Meila & Shi, 2001): the
chain is reversible with stationary law :math:`\pi_i \propto D_{ii}`, and its eigenvectors are the
normalised-cut relaxation of Shi & Malik (2000). So everything the book says about attention
chains can be checked here against a chain whose every entry is explained.

Capture: the stacked probabilities ``(B, H, N, N)`` pass through an
:class:`~attnchain.capture.probe.AttentionProbs` at ``model.attn.probs``; ``attnchain.capture``
names the layer ``"attn"`` and reads the token layout (all image tokens, the grid) from
``model.attn.tokens``.

**References**

Meila, M. & Shi, J., "A random walks view of spectral segmentation", AISTATS 2001.
Shi, J. & Malik, J., "Normalized cuts and image segmentation", IEEE TPAMI 22(8), 2000.
CIE 15:2004, Colorimetry (the L*a*b* formulas; sRGB primaries and D65 white, IEC 61966-2-1).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .images import to_chw_float, whole_image_box

from attnchain.capture.probe import AttentionProbs

__all__ = [
    "PATCH_SIZES",
    "SMALL_IMAGE",
    "MAX_GRID",
    "patch_size_for",
    "target_size",
    "DESCRIPTORS",
    "GROUPS",
    "GROUP_FLOORS",
    "HEADS",
    "NOISE_SEED",
    "NOISE_DIM",
    "rgb_to_lab",
    "oriented_filters",
    "PatchDescriptors",
    "KernelHead",
    "NoiseHead",
    "FeatureSelfAttention",
    "FeatureAttentionModel",
    "make_preprocess",
    "build",
]

#: patch sizes: 4 px for images of at most ``SMALL_IMAGE`` px per side, else 8 px
PATCH_SIZES = (4, 8)
SMALL_IMAGE = 128
#: preprocess resizes images to at most ``MAX_GRID * 8`` px per side (a grid of at most 32 x 32)
MAX_GRID = 32
DESCRIPTORS = ("L", "a", "b", "std_L", "std_a", "std_b",
               "grad_0", "grad_45", "grad_90", "grad_135", "row", "col")
GROUPS = {
    "colour": ("L", "a", "b"),
    "texture": ("std_L", "std_a", "std_b", "grad_0", "grad_45", "grad_90", "grad_135"),
    "position": ("row", "col"),
}
#: lower bounds of the per-group scale (Lab units for colour; mixed Lab std / filter units)
GROUP_FLOORS = {"colour": 4.0, "texture": 0.02}
#: head name -> (weights on descriptors, temperature tau)
HEADS = {
    "colour": ({"L": 1.0, "a": 1.0, "b": 1.0}, 0.5),
    "texture": ({d: 1.0 for d in GROUPS["texture"]}, 64.0),
    "position": ({"row": 1.0, "col": 1.0}, 0.2),
    "colour×position": ({"L": 1.0, "a": 1.0, "b": 1.0, "row": 3.0, "col": 3.0}, 4.0),
}
NOISE_SEED = 1234
NOISE_DIM = 64
NOISE_TAU = 128.0

_ORIENTATIONS = (0, 45, 90, 135)
_SIGMA = 1.0
_RADIUS = 2

# sRGB (IEC 61966-2-1) linear RGB -> XYZ, and the D65 reference white
_RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423),
               (0.212671, 0.715160, 0.072169),
               (0.019334, 0.119193, 0.950227))
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    r"""sRGB in [0, 1] -> CIE L*a*b* (D65), ``(..., 3, H, W) -> (..., 3, H, W)``.

    Notes
    -----
    Linearise :math:`c_{lin} = ((c + 0.055)/1.055)^{2.4}` for :math:`c > 0.04045`, else
    :math:`c/12.92`; :math:`XYZ = M\,c_{lin}` divided by the white point; with
    :math:`f(t) = t^{1/3}` for :math:`t > (6/29)^3` else :math:`t/(3 (6/29)^2) + 4/29`:
    :math:`L^* = 116 f(Y) - 16`, :math:`a^* = 500 (f(X) - f(Y))`, :math:`b^* = 200 (f(Y) - f(Z))`.
    """
    c = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = torch.tensor(_RGB_TO_XYZ, dtype=c.dtype, device=c.device)
    xyz = torch.einsum("kc,...chw->...khw", m, c)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=c.dtype, device=c.device).view(3, 1, 1)
    eps = (6 / 29) ** 3
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -3)


def oriented_filters(dtype=torch.float32) -> Tensor:
    r"""The four ``5 x 5`` oriented derivative-of-Gaussian kernels, ``(4, 1, 5, 5)``.

    :math:`k_\theta(x, y) = -\frac{x\cos\theta + y\sin\theta}{\sigma^2} e^{-(x^2+y^2)/2\sigma^2}`
    (``x`` = column offset, ``y`` = row offset, :math:`\sigma = 1`), normalised so that
    :math:`\sum |k_\theta| = 1`; used as a cross-correlation (``torch.conv2d``).
    """
    r = torch.arange(-_RADIUS, _RADIUS + 1, dtype=torch.float64)
    y, x = torch.meshgrid(r, r, indexing="ij")
    g = torch.exp(-(x ** 2 + y ** 2) / (2 * _SIGMA ** 2))
    ks = []
    for deg in _ORIENTATIONS:
        t = math.radians(deg)
        k = -(x * math.cos(t) + y * math.sin(t)) / _SIGMA ** 2 * g
        ks.append(k / k.abs().sum())
    return torch.stack(ks)[:, None].to(dtype)


def patch_size_for(h: int, w: int) -> int:
    """Patch size the model uses for an ``h x w`` image: 4 if ``max(h, w) <= SMALL_IMAGE`` else 8.

    The 64 x 64 scenes get a 16 x 16 grid (fine enough for their objects of 7 to 12 px radius),
    preprocessed photographs (at most 256 px per side) at most 32 x 32 tokens.
    """
    return PATCH_SIZES[0] if max(h, w) <= SMALL_IMAGE else PATCH_SIZES[1]


class PatchDescriptors(nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1] -> raw descriptors ``(B, N, 12)``, :data:`DESCRIPTORS`.

    ``H`` and ``W`` must be multiples of the patch size ``p``; ``N = (H / p) (W / p)`` in raster
    order.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("filters", oriented_filters(), persistent=False)

    def forward(self, images: Tensor, patch_size: int) -> Tensor:
        p = int(patch_size)
        b, _, h, w = images.shape
        gh, gw = h // p, w // p
        x = images.float()
        lab = rgb_to_lab(x)

        def pool(t):  # (B, C, H, W) -> (B, N, C) patch means
            return F.avg_pool2d(t, p).flatten(2).transpose(1, 2)

        mean = pool(lab)
        # two-pass variance (the one-pass form loses digits in float32)
        centred = lab - F.interpolate(mean.transpose(1, 2).reshape(b, 3, gh, gw),
                                      scale_factor=p, mode="nearest")
        var = pool(centred * centred)
        lum = lab[:, :1] / 100.0
        pad = F.pad(lum, (_RADIUS,) * 4, mode="reflect")
        resp = F.conv2d(pad, self.filters.to(lum.dtype)).abs()
        energy = pool(resp)
        r = (torch.arange(gh, dtype=x.dtype, device=x.device) + 0.5) / max(gh, gw)
        c = (torch.arange(gw, dtype=x.dtype, device=x.device) + 0.5) / max(gh, gw)
        pos = torch.stack(torch.meshgrid(r, c, indexing="ij"), -1).reshape(1, gh * gw, 2)
        return torch.cat([mean, var.sqrt(), energy, pos.expand(b, -1, -1)], -1)


def standardise(raw: Tensor) -> Tensor:
    r"""Per-image, per-group standardisation of raw descriptors, ``(B, N, 12) -> (B, N, 12)``.

    Notes
    -----
    For each group ``g`` of :data:`GROUP_FLOORS` (colour, texture) with columns
    :math:`x_i \in \mathbb{R}^{d_g}`: :math:`f_i = (x_i - \bar x) / s_g` with
    :math:`s_g = \max\big(\sqrt{\tfrac{1}{N d_g}\sum_i \lVert x_i - \bar x\rVert^2},
    \mathrm{floor}_g\big)`. Position columns are kept as they are.
    """
    out = raw.clone()
    for group, floor in GROUP_FLOORS.items():
        idx = [DESCRIPTORS.index(d) for d in GROUPS[group]]
        g = raw[..., idx]
        g = g - g.mean(-2, keepdim=True)
        scale = (g.pow(2).sum(-1).mean(-1) / len(idx)).sqrt().clamp_min(floor)
        out[..., idx] = g / scale[:, None, None]
    return out


class KernelHead(nn.Module):
    r"""One Gaussian-kernel head: logits :math:`-\lVert W f_i - W f_j \rVert^2 / \tau`.

    ``W`` (buffer ``(d_h, 12)``) is a fixed weighted selection of descriptors.
    """

    def __init__(self, name: str, weights: dict, tau: float):
        super().__init__()
        self.name, self.tau = name, float(tau)
        self.descriptors = tuple(weights)
        W = torch.zeros(len(weights), len(DESCRIPTORS))
        for row, (d, wgt) in enumerate(weights.items()):
            W[row, DESCRIPTORS.index(d)] = wgt
        self.register_buffer("W", W)

    def queries(self, f: Tensor) -> Tensor:
        """``(B, N, 12) -> (B, N, d_h)``: :math:`q = k = W f`."""
        return f @ self.W.to(f.dtype).T

    def forward(self, f: Tensor) -> Tensor:
        q = self.queries(f)
        k = q
        # 2 q.k - |k|^2: the row-constant -|q|^2 cancels in the softmax
        return (2 * q @ k.transpose(-1, -2) - k.pow(2).sum(-1)[:, None, :]) / self.tau

    def extra_repr(self) -> str:
        return f"name={self.name!r}, descriptors={self.descriptors}, tau={self.tau}"


class NoiseHead(nn.Module):
    r"""The noisy head: :math:`q_i = k_i = \xi_i`, ``dim`` i.i.d. N(0, 1) numbers per token from a
    generator seeded with ``seed`` (the same for every image of a given token count)."""

    def __init__(self, seed: int = NOISE_SEED, dim: int = NOISE_DIM, tau: float = NOISE_TAU):
        super().__init__()
        self.name, self.seed, self.dim, self.tau = "noise", int(seed), int(dim), float(tau)

    def queries(self, f: Tensor) -> Tensor:
        """``(B, N, 12) -> (B, N, dim)`` seeded noise (ignores the descriptors' values)."""
        b, n = f.shape[:2]
        g = torch.Generator().manual_seed(self.seed)
        xi = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        return xi.to(device=f.device, dtype=f.dtype).expand(b, n, self.dim)

    def forward(self, f: Tensor) -> Tensor:
        q = self.queries(f)
        return (2 * q @ q.transpose(-1, -2) - q.pow(2).sum(-1)[:, None, :]) / self.tau

    def extra_repr(self) -> str:
        return f"seed={self.seed}, dim={self.dim}, tau={self.tau}"


class FeatureSelfAttention(nn.Module):
    """The attention layer: named heads (``self.heads[name]``), stacked probabilities through
    ``self.probs`` (an :class:`AttentionProbs`), values = the standardised descriptors."""

    def __init__(self):
        super().__init__()
        heads = {name: KernelHead(name, w, tau) for name, (w, tau) in HEADS.items()}
        heads["noise"] = NoiseHead()
        self.heads = nn.ModuleDict(heads)
        self.probs = AttentionProbs()
        self.grid: tuple[int, int] | None = None

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def tokens(self, n: int) -> dict:
        """Token layout for ``attnchain.capture``: every token is an image patch on the grid
        of the last forward call."""
        grid = self.grid if self.grid is not None and self.grid[0] * self.grid[1] == n else None
        return {"image": tuple(range(n)), "grid": grid, "kind": "feature-attention"}

    def attention(self, f: Tensor) -> Tensor:
        """``(B, N, 12)`` standardised descriptors -> probabilities ``(B, H, N, N)``."""
        logits = torch.stack([head(f) for head in self.heads.values()], 1)
        return torch.softmax(logits, dim=-1)

    def forward(self, f: Tensor) -> Tensor:
        a = self.probs(self.attention(f))
        out = a @ f[:, None]                      # (B, H, N, 12)
        return out.transpose(1, 2).flatten(2)     # (B, N, H * 12)


def _check_images(x: Any, patch_size: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"feature-attention expects a (B, 3, H, W) tensor (use its preprocess), "
                         f"got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"feature-attention expects images of shape (B, 3, H, W), got "
                         f"{tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h < patch_size or w < patch_size or h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} must be a positive multiple of the patch size "
                         f"{patch_size} (the preprocess resizes for you)")
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("image contains NaN or Inf")
    if x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise ValueError(f"float images must be in [0, 1], got range "
                         f"[{x.min().item():.3g}, {x.max().item():.3g}]")
    return x.clamp(0, 1)


class FeatureAttentionModel(nn.Module):
    """Patch descriptors -> one layer of fixed-kernel multi-head self-attention (see module doc).

    ``model(images)``: ``(B, 3, H, W)`` in [0, 1], ``H, W`` multiples of the patch size ->
    ``(B, N, H_heads · 12)`` attended descriptors. ``model.features(images)`` gives the
    standardised descriptors ``(B, N, 12)``, ``model.raw_descriptors(images)`` the raw ones.

    Parameters
    ----------
    patch_size : int, optional
        Fixed patch size; default None = :func:`patch_size_for` of each input.
    """

    def __init__(self, patch_size: int | None = None):
        super().__init__()
        if patch_size is not None and (isinstance(patch_size, bool) or
                                       not isinstance(patch_size, int) or patch_size < 1):
            raise ValueError(f"patch_size must be a positive int or None, got {patch_size!r}")
        self.patch_size = patch_size
        self.descriptors = PatchDescriptors()
        self.attn = FeatureSelfAttention()
        self.descriptor_names = DESCRIPTORS

    @property
    def head_names(self) -> tuple[str, ...]:
        return self.attn.head_names

    def patch_size_of(self, images: Tensor) -> int:
        """The patch size used for ``images`` (fixed, or :func:`patch_size_for` its size)."""
        if self.patch_size is not None:
            return self.patch_size
        return patch_size_for(images.shape[-2], images.shape[-1])

    def raw_descriptors(self, images: Tensor) -> Tensor:
        """Raw descriptors ``(B, N, 12)``, columns :data:`DESCRIPTORS`."""
        if isinstance(images, Tensor) and images.ndim == 4:
            p = self.patch_size_of(images)
        else:
            p = self.patch_size or PATCH_SIZES[0]
        return self.descriptors(_check_images(images, p), p)

    def features(self, images: Tensor) -> Tensor:
        """Standardised descriptors ``f``, ``(B, N, 12)`` (see :func:`standardise`)."""
        return standardise(self.raw_descriptors(images))

    def grid(self, images: Tensor) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` of ``images``."""
        p = self.patch_size_of(images)
        return images.shape[-2] // p, images.shape[-1] // p

    def forward(self, images: Tensor) -> Tensor:
        f = self.features(images)
        self.attn.grid = self.grid(images)
        return self.attn(f)


# ----------------------------------------------------------------------------------------------
# preprocess


def target_size(h: int, w: int, unit: int = PATCH_SIZES[1], max_grid: int = MAX_GRID):
    """Size the preprocess resizes an ``h x w`` image to: sides multiples of ``unit`` (8 px), at
    most ``max_grid * unit`` px per side, aspect ratio kept (to the nearest unit)."""
    s = min(1.0, max_grid * unit / max(h, w))
    gh = min(max_grid, max(1, round(h * s / unit)))
    gw = min(max_grid, max(1, round(w * s / unit)))
    return gh * unit, gw * unit


def make_preprocess(device=None, unit: int = PATCH_SIZES[1], max_grid: int = MAX_GRID):
    """Return ``preprocess(image) -> (B, 3, H', W')`` float32 in [0, 1] on ``device``.

    ``image``: PIL image, ``(H, W, 3)`` numpy array (uint8, or float in [0, 1]), ``(3, H, W)``
    tensor in [0, 1] (uint8 is divided by 255), or a batch ``(B, 3, H, W)`` / ``(B, H, W, 3)``.
    ``(H', W')`` = :func:`target_size`: unchanged for the 64 x 64 scenes (the model then uses
    4 px patches, a 16 x 16 grid); larger images are resized (bilinear, antialiased) to at most
    256 px per side (8 px patches, at most 32 x 32 tokens).
    """

    def preprocess(image) -> Tensor:
        t = to_chw_float(image, allow_gray=True)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        size = target_size(t.shape[-2], t.shape[-1], unit, max_grid)
        if tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        return t.to(device) if device is not None else t

    preprocess.unit = unit
    preprocess.max_grid = max_grid
    preprocess.crop_box = whole_image_box  # resized whole: the model sees all of it
    return preprocess


def build(device=None):
    """The feature-attention model (no weights to load: everything is defined above).

    Parameters
    ----------
    device : str or torch.device, optional
        Where the model and the preprocessed images live (default CPU).

    Returns
    -------
    model : FeatureAttentionModel
        In eval mode, no parameters (only buffers). ``model.attn.heads`` are the named heads,
        ``model.head_names`` their order in the captured ``(B, H, N, N)`` attention.
    preprocess : callable
        See :func:`make_preprocess`.
    """
    model = FeatureAttentionModel().eval()
    for p in model.parameters():  # pragma: no cover - there are none
        p.requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, make_preprocess(device=device)
