"""Figures and explorers for the book: matrices, spectra, bounce strips, overlays, widgets.

Everything here draws; the Markov-chain math lives in the package's top-level API
(:func:`attnchain.bounce`, :func:`attnchain.planted_chain`, :func:`attnchain.rollout`,
:func:`attnchain.head_mean`, :func:`attnchain.choose_bounces`, ...). Every function accepts
tensors on any device (and arrays) and converts them to NumPy itself (:func:`to_numpy`), so a
chapter hands its tensors to the plots as they are.

**Static mode**

:func:`explorer` and :func:`attention_explorer` show ``ipywidgets`` controls in a live kernel
(Jupyter, Colab). When the environment variable ``ATTNCHAIN_STATIC=1`` is set (the test suite and
the book build set it), or ``ipywidgets`` is not installed, they draw one static figure with the
default control values instead, so an executed notebook stores a picture, not a dead widget.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "is_static",
    "tag",
    "to_numpy",
    "show_matrix",
    "spectrum",
    "overlay",
    "removed_tokens",
    "accuracy_curves",
    "show_labels",
    "label_colors",
    "patch_map",
    "bounce_strip",
    "token_heat",
    "lambda2_heatmap",
    "explorer",
    "attention_explorer",
]


# --------------------------------------------------------------------------------------------
# small utilities
# --------------------------------------------------------------------------------------------
def is_static() -> bool:
    """True when explorers must draw static figures (``ATTNCHAIN_STATIC=1``, or no ipywidgets).

    Examples
    --------
    >>> isinstance(is_static(), bool)   # True in the test suite and the book build
    True

    See Also
    --------
    explorer, attention_explorer
    """
    if os.environ.get("ATTNCHAIN_STATIC", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:  # pragma: no cover - exercised only where ipywidgets is missing
        import ipywidgets  # noqa: F401
    except ImportError:  # pragma: no cover
        return True
    return False


def tag(profile: str, model: str) -> str:
    """The provenance tag every figure title carries, e.g. ``"offline · scene-vit"``.

    Examples
    --------
    >>> tag("offline", "scene-vit")
    'offline · scene-vit'

    See Also
    --------
    attnchain.zoo.profile
    """
    return f"{profile} · {model}"


def to_numpy(x) -> np.ndarray:
    """Detach a tensor (any device/dtype) or array-like to a float64 NumPy array.

    Examples
    --------
    >>> import torch
    >>> to_numpy(torch.tensor([1, 2], dtype=torch.int32))
    array([1., 2.])

    See Also
    --------
    patch_map
    """
    if isinstance(x, Tensor):
        x = x.detach().to("cpu")
        if x.is_complex():
            return x.to(torch.complex128).numpy()
        return x.to(torch.float64).numpy()
    return np.asarray(x)


def _plt():
    import matplotlib.pyplot as plt

    return plt


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def show_matrix(A, ax=None, title: str | None = None, boundaries: Sequence[int] | None = None,
                cmap: str = "viridis", labels: Sequence[str] | None = None, colorbar: bool = True):
    """Draw an attention/transition matrix as a heatmap (rows = queries, columns = keys).

    ``boundaries`` draws block separators after those indices; ``labels`` names the tokens.
    Returns the axes.

    Examples
    --------
    >>> import torch
    >>> ax = show_matrix(torch.eye(3), title="identity chain")
    >>> ax.get_title()
    'identity chain'

    See Also
    --------
    spectrum, lambda2_heatmap
    """
    plt = _plt()
    m = to_numpy(A)
    if m.ndim != 2:
        raise ValueError(f"show_matrix: expected a 2-D matrix, got shape {m.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(m, cmap=cmap, interpolation="nearest", aspect="auto")
    ax.grid(False)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for b in ([] if boundaries is None else list(boundaries)):
        ax.axhline(b - 0.5, color="w", lw=0.8)
        ax.axvline(b - 0.5, color="w", lw=0.8)
    if labels is not None:
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("key j")
    ax.set_ylabel("query i")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def spectrum(eigs, ax=None, title: str | None = None, highlight: int = 0):
    """Eigenvalues in the complex plane with the unit circle; the first ``highlight`` are marked.

    Examples
    --------
    >>> import torch
    >>> ax = spectrum(torch.tensor([1.0, -0.5, 0.2]), highlight=1)
    >>> len(ax.collections)
    2

    See Also
    --------
    attnchain.eigenvalues, show_matrix
    """
    plt = _plt()
    e = to_numpy(eigs).astype(np.complex128).ravel()
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.6))
    t = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(t), np.sin(t), color="0.7", lw=0.8)
    ax.scatter(e.real, e.imag, s=14, color="C0", zorder=3, label="eigenvalues")
    if highlight:
        order = np.argsort(-np.abs(e))[:highlight]
        ax.scatter(e.real[order], e.imag[order], s=40, facecolor="none", edgecolor="C3", zorder=4,
                   label=f"top {highlight} by |λ|")
        ax.legend(fontsize=7, loc="lower left")
    ax.set_aspect("equal")
    ax.set_xlim(-1.1, 1.1)
    ax.set_ylim(-1.1, 1.1)
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def _as_image(image) -> np.ndarray | None:
    if image is None:
        return None
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    img = np.asarray(image)
    if img.dtype.kind in "iu":
        img = img.astype(np.float64) / 255.0
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    lo, hi = float(np.min(img)), float(np.max(img))
    if lo < 0 or hi > 1:
        img = (img - lo) / max(hi - lo, 1e-12)
    return img


def patch_map(v, grid: tuple[int, int], prefix: int = 0) -> np.ndarray:
    """Turn a per-token vector into an ``(h, w)`` patch map.

    ``v`` has ``prefix + h * w`` entries (CLS/register tokens first) or exactly ``h * w``.

    Examples
    --------
    >>> import torch
    >>> patch_map(torch.arange(5.0), (2, 2), prefix=1)
    array([[1., 2.],
           [3., 4.]])

    See Also
    --------
    overlay, show_labels
    """
    x = to_numpy(v).ravel()
    h, w = int(grid[0]), int(grid[1])
    if x.size == prefix + h * w:
        x = x[prefix:]
    if x.size != h * w:
        raise ValueError(f"patch_map: {x.size} values do not fit grid {h}x{w} with prefix {prefix}")
    return x.reshape(h, w)


def _into_box(m: np.ndarray, shape, box, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize map ``m`` onto ``box`` = (top, left, height, width) of an image of ``shape``.

    Returns the map on the image's pixels and the mask of the pixels inside the box."""
    from skimage.transform import resize

    H, W = shape[:2]
    if box is None:
        box = (0, 0, H, W)
    top, left, h, w = (float(b) for b in box)
    R0, C0 = int(round(top)), int(round(left))               # the box on whole pixels
    R1, C1 = int(round(top + h)), int(round(left + w))
    r0, c0, r1, c1 = max(R0, 0), max(C0, 0), min(R1, H), min(C1, W)  # its part in the image
    if r1 <= r0 or c1 <= c0:
        raise ValueError(f"box {tuple(box)} does not overlap the {H} x {W} image")
    big = resize(m, (R1 - R0, C1 - C0), order=order, mode="edge", anti_aliasing=False,
                 preserve_range=True)
    out = np.zeros((H, W), dtype=big.dtype)
    out[r0:r1, c0:c1] = big[r0 - R0:r1 - R0, c0 - C0:c1 - C0]
    inside = np.zeros((H, W), dtype=bool)
    inside[r0:r1, c0:c1] = True
    return out, inside


def _outline(ax, box, shape):
    if box is not None and tuple(float(b) for b in box) != (0.0, 0.0, *map(float, shape[:2])):
        from matplotlib.patches import Rectangle

        top, left, h, w = box
        ax.add_patch(Rectangle((left - 0.5, top - 0.5), w, h, fill=False, ls="--", lw=0.8,
                               ec="white"))


def overlay(heat, image=None, ax=None, alpha: float = 0.55, cmap: str = "inferno",
            title: str | None = None, normalize: bool = True, box=None):
    """Draw an ``(h, w)`` map, upsampled (bilinear) over an image when one is given.

    Parameters
    ----------
    heat : array_like or Tensor, shape (h, w)
        The patch map (any device).
    image : optional
        The photo under it (PIL, array or tensor).
    box : (top, left, height, width), optional
        The part of ``image`` the model saw, in its pixels: ``preprocess.crop_box(image)`` of
        a :func:`attnchain.zoo.load` preprocess (timm's evaluation transforms centre-crop
        non-square photos). The map is drawn over that box only, outlined; default the whole
        image.

    Examples
    --------
    >>> import numpy as np
    >>> ax = overlay(np.eye(2), np.zeros((8, 8, 3)), title="map")
    >>> ax.images[-1].get_array().shape
    (8, 8)

    See Also
    --------
    patch_map, show_labels, attnchain.zoo.images.crop_box
    """
    plt = _plt()
    hm = to_numpy(heat)
    if hm.ndim != 2:
        raise ValueError(f"overlay: expected an (h, w) map, got shape {hm.shape}")
    if normalize:
        lo, hi = hm.min(), hm.max()
        hm = (hm - lo) / (hi - lo) if hi > lo else np.zeros_like(hm)
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    img = _as_image(image)
    if img is not None:
        big, inside = _into_box(hm, img.shape, box, order=1)
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.imshow(np.ma.masked_array(big, ~inside), cmap=cmap, alpha=alpha,
                  vmin=0 if normalize else None, vmax=1 if normalize else None)
        _outline(ax, box, img.shape)
    else:
        ax.imshow(hm, cmap=cmap, interpolation="nearest", vmin=0 if normalize else None,
                  vmax=1 if normalize else None)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def removed_tokens(image, removed, grid: tuple[int, int], ax=None, title: str | None = None,
                   box=None):
    """Draw an image with its removed patch tokens blanked out (mid grey).

    Parameters
    ----------
    image : PIL image, array or Tensor
        The image the model saw (or the photo, with ``box`` as in :func:`overlay`).
    removed : bool array_like or Tensor, shape (h * w,) or (h, w)
        True on the removed patches (grid order, row-major).
    grid : (int, int)
        The patch grid.

    Examples
    --------
    >>> import numpy as np
    >>> ax = removed_tokens(np.ones((8, 8, 3)), np.array([True, False, False, False]), (2, 2))
    >>> float(ax.images[-1].get_array()[0, 0, 0]), float(ax.images[-1].get_array()[7, 7, 0])
    (0.5, 1.0)

    See Also
    --------
    overlay, attnchain.interventions.remove_tokens
    """
    plt = _plt()
    img = _as_image(image)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    gone = patch_map(np.asarray(to_numpy(removed), dtype=np.float64), grid)
    big, inside = _into_box(gone, img.shape, box, order=0)
    out = np.where(((big > 0.5) & inside)[..., None], 0.5, img[..., :3])
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(out)
    _outline(ax, box, img.shape)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def accuracy_curves(table, ax=None, title: str | None = None, metric_prefix: str = "acc@"):
    """Mean accuracy against the removed fraction, one line per ranking, from a task table.

    ``table`` is a token-masking table (:func:`attnchain.tasks.token_masking.evaluate`): rows
    with metrics ``acc@<f>``; each line is the mean over images, its legend the AUC.

    See Also
    --------
    attnchain.tasks.token_masking.auc
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 3.2))
    acc = table[table.metric.str.startswith(metric_prefix)]
    for method, g in acc.groupby("method", sort=False):
        curve = g.groupby("metric", sort=True)["value"].mean()
        f = np.array([float(m[len(metric_prefix):]) for m in curve.index])
        area = table[(table.metric == "auc") & (table.method == method)]["value"].mean()
        ax.plot(f, curve.to_numpy(), marker="o", ms=3, label=f"{method} (AUC {area:.3f})")
    ax.set_xlabel("fraction of image tokens removed")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def label_colors(k: int) -> np.ndarray:
    """``k`` distinct RGB colours (seaborn's husl palette) for label maps.

    Examples
    --------
    >>> label_colors(3).shape
    (3, 3)

    See Also
    --------
    show_labels, token_heat
    """
    import seaborn as sns

    return np.asarray(sns.color_palette("husl", max(int(k), 1)))


def show_labels(labels, image=None, ax=None, alpha: float = 0.5, title: str | None = None,
                box=None, n_colors: int | None = None):
    """Draw an ``(h, w)`` integer label map (e.g. metastable states), over an image if given.

    ``box`` = (top, left, height, width): the part of ``image`` the model saw (see
    :func:`overlay`); default the whole image. ``n_colors``: the size of the palette (at least
    the number of labels), so that several panels give one label one colour.

    Examples
    --------
    >>> import numpy as np
    >>> ax = show_labels(np.array([[0, 1], [1, 0]]))
    >>> ax.images[-1].get_array().shape
    (2, 2, 3)

    See Also
    --------
    label_colors, overlay
    """
    plt = _plt()
    lab = to_numpy(labels).astype(np.int64)
    if lab.ndim != 2:
        raise ValueError(f"show_labels: expected an (h, w) label map, got shape {lab.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    cols = label_colors(max(int(lab.max()) + 1, int(n_colors or 0)))
    rgb = cols[lab]
    img = _as_image(image)
    if img is not None:
        big, inside = _into_box(lab, img.shape, box, order=0)
        big = big.astype(np.int64)
        base = (img if img.ndim == 3 else np.repeat(img[..., None], 3, -1))[..., :3]
        a = np.where(inside, alpha, 0.0)[..., None]
        ax.imshow((1 - a) * base + a * cols[big])
        _outline(ax, box, img.shape)
    else:
        ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def bounce_strip(dists, grid: tuple[int, int] | None = None, image=None, prefix: int = 0,
                 steps: Sequence[int] | None = None, tokens: Sequence[str] | None = None,
                 title: str | None = None, row_label: str | None = None, axes=None,
                 cmap: str = "inferno", groups=None):
    """A strip of maps ``v_0, v_1, ..., v_n`` (the output of :func:`attnchain.bounce`).

    Parameters
    ----------
    dists : (n + 1, N) tensor or array
        One distribution per bounce.
    grid : (h, w), optional
        Draw each distribution as a patch map (after dropping ``prefix`` special tokens) over
        ``image``. Without a grid each panel is a bar chart over tokens (``tokens`` labels it).
    steps : which bounces to draw (default all).
    axes : existing row of axes to draw into (for stacking strips); otherwise a new figure.
    groups : (N,) integer labels, optional
        Colour the bars by group (e.g. planted blocks) when drawing without a grid.

    Returns
    -------
    numpy array of axes

    Examples
    --------
    >>> import attnchain as ac
    >>> A, _ = ac.planted_chain([3, 3], leak=0.1, seed=0)
    >>> axes = bounce_strip(ac.bounce(A, 0, 2))
    >>> [ax.get_title() for ax in axes]
    ['n = 0', 'n = 1', 'n = 2']

    See Also
    --------
    attnchain.bounce, overlay
    """
    plt = _plt()
    d = to_numpy(dists)
    if d.ndim != 2:
        raise ValueError(f"bounce_strip: expected (n + 1, N) distributions, got shape {d.shape}")
    steps = list(range(d.shape[0])) if steps is None else list(steps)
    if axes is None:
        w = 1.9 if grid is not None else 2.6
        fig, axes = plt.subplots(1, len(steps), figsize=(w * len(steps), 2.4 if grid else 2.2),
                                 squeeze=False, layout="constrained")
        axes = axes[0]
        if title:
            fig.suptitle(title, fontsize=10)
    axes = np.asarray(axes).ravel()
    for ax, s in zip(axes, steps):
        if grid is not None:
            overlay(patch_map(d[s], grid, prefix), image, ax=ax, title=f"n = {s}", cmap=cmap)
        else:
            if groups is not None:
                g = to_numpy(groups).astype(np.int64).ravel()
                colours = label_colors(int(g.max()) + 1)[g]
            else:
                colours = "C0"
            ax.bar(np.arange(d.shape[1]), d[s], color=colours, width=1.0)
            ax.set_title(f"n = {s}", fontsize=8)
            ax.set_ylim(0, max(float(d[s].max()) * 1.1, 1e-9))
            if tokens is not None:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
            else:
                ax.set_xticks([])
            ax.tick_params(axis="y", labelsize=6)
    if row_label:
        axes[0].text(-0.08, 0.5, row_label, transform=axes[0].transAxes, rotation=90,
                     va="center", ha="right", fontsize=9)
    return axes


def token_heat(tokens: Sequence[str], values, ax=None, cmap: str = "magma_r",
               title: str | None = None, width: int = 60, colors=None, fontsize: float = 9):
    """Render a sentence with each token's background coloured by a value (or a given colour).

    ``values`` is a per-token vector (normalised to [0, 1] for the colour map) or ``None``;
    ``colors`` an optional list of RGB colours (e.g. ``label_colors(k)[labels]``) that overrides
    it. Tokens flow left to right and wrap at the right edge of the axes (``width`` only sizes a
    new figure).

    Examples
    --------
    >>> ax = token_heat(["the", "cat"], [0.2, 0.8])
    >>> [t.get_text() for t in ax.texts]
    ['the', 'cat']

    See Also
    --------
    label_colors
    """
    plt = _plt()
    import matplotlib as mpl

    toks = list(tokens)
    vals = to_numpy(values).ravel() if values is not None else np.zeros(len(toks))
    if vals.size != len(toks):
        raise ValueError(f"token_heat: {len(toks)} tokens but {vals.size} values")
    if colors is not None and len(colors) != len(toks):
        raise ValueError(f"token_heat: {len(toks)} tokens but {len(colors)} colours")
    lo, hi = float(vals.min()), float(vals.max())
    norm = (vals - lo) / (hi - lo) if hi > lo else np.zeros_like(vals)
    cm = mpl.colormaps[cmap]
    if ax is None:
        n_chars = sum(len(t) + 1 for t in toks)
        n_lines = max(1, math.ceil(n_chars / width))
        _, ax = plt.subplots(figsize=(0.085 * width * fontsize / 9 + 0.4,
                                      0.32 * n_lines * fontsize / 9 + 0.5))
    ax.set_axis_off()
    fig = ax.figure
    from matplotlib.transforms import offset_copy

    renderer = fig.canvas.get_renderer()
    box_w = max(ax.get_window_extent(renderer).width, 1.0)
    pt = 72.0 / fig.dpi  # points per pixel
    line_h = 2.0 * fontsize  # points
    gap = 0.6 * fontsize  # points
    x, y = 0.0, 0.5 * line_h  # points from the top-left corner
    for i, t in enumerate(toks):
        c = colors[i] if colors is not None else cm(0.85 * norm[i])
        lum = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
        txt = ax.text(0.0, 1.0, t, fontsize=fontsize, family="monospace", va="center", ha="left",
                      color="white" if lum < 0.5 else "black",
                      bbox=dict(boxstyle="round,pad=0.15", fc=c, ec="none"))
        w = txt.get_window_extent(renderer).width * pt
        if x > 0 and (x + w) / pt > box_w:
            x, y = 0.0, y + line_h
        txt.set_transform(offset_copy(ax.transAxes, fig=fig, x=x, y=-y, units="points"))
        x += w + gap
    if title:
        ax.set_title(title, fontsize=9, loc="left")
    return ax


def lambda2_heatmap(values, ax=None, title: str | None = None, layer_names: Sequence[str] | None = None,
                    annot: bool | None = None, vmin: float | None = 0.0, vmax: float | None = 1.0,
                    cbar_label: str = "|λ2|"):
    """Seaborn heatmap of a per-(layer, head) quantity, e.g. ``|λ2|``; rows = layers.

    Examples
    --------
    >>> import numpy as np
    >>> ax = lambda2_heatmap(np.array([[0.9, 0.2], [0.5, 0.7]]), layer_names=["l0", "l1"])
    >>> ax.get_ylabel()
    'layer'

    See Also
    --------
    attnchain.lambda2
    """
    plt = _plt()
    import seaborn as sns

    v = to_numpy(values)
    if v.ndim != 2:
        raise ValueError(f"lambda2_heatmap: expected (layers, heads), got shape {v.shape}")
    new = ax is None
    if new:
        _, ax = plt.subplots(figsize=(0.6 * v.shape[1] + 4.5, 0.42 * v.shape[0] + 1.6))
    if annot is None:
        annot = v.size <= 160
    sns.heatmap(v, ax=ax, annot=annot, fmt=".2f", cmap="rocket", vmin=vmin, vmax=vmax,
                annot_kws={"fontsize": 7}, cbar_kws={"label": cbar_label},
                yticklabels=list(layer_names) if layer_names is not None else "auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.tick_params(axis="y", rotation=0, labelsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    if new:
        ax.figure.tight_layout()
    return ax


# --------------------------------------------------------------------------------------------
# explorers
# --------------------------------------------------------------------------------------------
def _default(choices):
    if isinstance(choices, (list, tuple, range)):
        return choices[0]
    if isinstance(choices, Mapping):
        return next(iter(choices.values()))
    return choices


def explorer(draw: Callable[..., object], controls: Mapping[str, object],
             defaults: Mapping[str, object] | None = None, static: bool | None = None):
    """Interactive controls in a live kernel, one static figure in the book.

    Parameters
    ----------
    draw : callable
        ``draw(**values)`` draws one figure (it may create it with ``plt.subplots``).
    controls : mapping name -> choices
        Anything ``ipywidgets.interact`` accepts (a list, a ``range``, a mapping label -> value).
    defaults : mapping name -> value, optional
        Values used for the static figure and as the widgets' initial values
        (default: the first choice of each control).
    static : bool, optional
        Force static mode; by default :func:`is_static` decides (``ATTNCHAIN_STATIC=1``).

    Returns
    -------
    The ``ipywidgets`` interactive object in a live kernel; the matplotlib figure in static mode.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> fig = explorer(lambda n: plt.figure().gca().plot(range(n)), {"n": range(1, 4)}, static=True)
    >>> len(fig.axes[0].lines)
    1

    See Also
    --------
    attention_explorer, is_static
    """
    plt = _plt()
    values = {k: _default(c) for k, c in controls.items()}
    values.update(defaults or {})
    unknown = set(values) - set(controls)
    if unknown:
        raise ValueError(f"explorer: defaults for unknown controls {sorted(unknown)}")
    if is_static() if static is None else static:
        draw(**values)
        fig = plt.gcf()
        return fig

    import ipywidgets as widgets

    ws = {}
    for k, c in controls.items():
        v = values[k]
        if isinstance(c, range) and len(c) > 1:
            ws[k] = widgets.IntSlider(value=v, min=c.start, max=c[-1], step=c.step,
                                      description=k, continuous_update=False)
        elif isinstance(c, Mapping):
            ws[k] = widgets.Dropdown(options=list(c.items()), value=v, description=k)
        elif isinstance(c, (list, tuple)):
            ws[k] = widgets.Dropdown(options=list(c), value=v, description=k)
        else:
            ws[k] = widgets.fixed(c)

    def _show(**kw):
        draw(**kw)
        plt.show()

    return widgets.interactive(_show, **ws)


#: How the explorer names the head weightings of :func:`attnchain.head_mean`.
_WEIGHTING_LABELS = {"uniform": "uniform mean", "lambda2": "λ2-weighted mean"}


def attention_explorer(attentions: Mapping[str, Tensor], image=None, grid=None, prefix: int = 0,
                       positions: Sequence[int] | None = None, tokens: Sequence[str] | None = None, title: str = "",
                       defaults: Mapping[str, object] | None = None, static: bool | None = None,
                       max_bounces: int = 10):
    """Explore captured attention: layer, head, bounce count ``n``, start token, direction.

    Parameters
    ----------
    attentions : mapping layer name -> (H, N, N) or (1, H, N, N) tensor
        E.g. ``rec.attentions`` from :func:`attnchain.capture` (first batch element is used).
    image, grid, prefix :
        For vision models: the image, the patch grid ``(h, w)`` and the number of special tokens
        before the patches; maps are drawn over the image. ``positions`` (e.g.
        ``rec.layout.image``) lists the patch tokens explicitly and overrides ``prefix``. Without a grid, text ``tokens`` are
        drawn with :func:`token_heat`.
    defaults : initial values for ``layer``, ``head`` (a head index, ``"uniform"`` or
        ``"lambda2"``), ``n``, ``start``, ``direction``.

    Returns
    -------
    See :func:`explorer`.

    Notes
    -----
    ``head`` offers each head and the two head weightings of :func:`attnchain.head_mean`,
    ``"uniform"`` and ``"lambda2"``. The panel shows the matrix and ``v_n`` from
    :func:`attnchain.bounce`.

    Examples
    --------
    >>> import torch
    >>> att = {"layer 0": torch.softmax(torch.randn(2, 4, 4), -1)}
    >>> fig = attention_explorer(att, tokens=list("abcd"), defaults={"head": "lambda2"}, static=True)
    >>> fig.axes[0].get_title()
    'layer 0, λ2-weighted mean'

    See Also
    --------
    explorer, attnchain.bounce, attnchain.head_mean
    """
    import attnchain as ac  # imported lazily: viz is importable on its own

    plt = _plt()
    mats = {}
    for k, a in attentions.items():
        a = a.detach()
        if a.ndim == 4:
            a = a[0]
        if a.ndim != 3 or a.shape[-1] != a.shape[-2]:
            raise ValueError(f"attention_explorer: layer {k!r} must be (H, N, N), got {tuple(a.shape)}")
        mats[k] = a.float()
    if not mats:
        raise ValueError("attention_explorer: no attention matrices")
    first = next(iter(mats.values()))
    h, n_tok = first.shape[0], first.shape[-1]
    head_choices = {f"head {i}": i for i in range(h)}
    head_choices.update({label: w for w, label in _WEIGHTING_LABELS.items()})
    controls = {
        "layer": list(mats),
        "head": head_choices,
        "n": range(1, max_bounces + 1),
        "start": range(0, n_tok),
        "direction": ["sink", "source"],
    }

    def _matrix(layer, head):
        a = mats[layer]
        if head in _WEIGHTING_LABELS:
            return ac.head_mean(a, head, head_dim=0)
        return a[head]

    def draw(layer, head, n, start, direction):
        a = _matrix(layer, head)
        v = ac.bounce(a, int(start), int(n), direction=direction)[-1]
        name = _WEIGHTING_LABELS.get(head, f"head {head}")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), gridspec_kw={"width_ratios": [1, 1.3]})
        show_matrix(a, ax=axes[0], title=f"{layer}, {name}")
        axes[0].axhline(int(start), color="c", lw=0.8)
        lab = f"v_{n} ({direction}) from token {start}"
        if grid is not None:
            vv = v[list(positions)] if positions is not None else v
            overlay(patch_map(vv, grid, 0 if positions is not None else prefix), image,
                    ax=axes[1], title=lab)
        elif tokens is not None:
            token_heat(tokens, v, ax=axes[1], title=lab)
        else:
            axes[1].bar(np.arange(v.shape[-1]), to_numpy(v))
            axes[1].set_title(lab, fontsize=8)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig

    return explorer(draw, controls, defaults=defaults, static=static)


# --------------------------------------------------------------------------------------------
# DiffSeg (chapter 11)
# --------------------------------------------------------------------------------------------
def anchors(image, tokens, grid: tuple[int, int], ax=None, title: str | None = None,
            color: str = "cyan", size: float = 12.0):
    """Mark anchor tokens (raster indices on ``grid``) at their cell centres over an image.

    Examples
    --------
    >>> import numpy as np
    >>> ax = anchors(np.zeros((8, 8, 3)), [0, 3], (2, 2))
    >>> ax.collections[0].get_offsets().tolist()
    [[1.5, 1.5], [5.5, 5.5]]

    See Also
    --------
    show_labels, overlay
    """
    plt = _plt()
    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    img = _as_image(image)
    t = to_numpy(tokens).astype(np.int64).ravel()
    h, w = int(grid[0]), int(grid[1])
    H, W = (img.shape[:2] if img is not None else (h, w))
    rows, cols = t // w, t % w
    if img is not None:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.scatter((cols + 0.5) * W / w - 0.5, (rows + 0.5) * H / h - 0.5, s=size, c=color,
               edgecolors="black", linewidths=0.4)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax
