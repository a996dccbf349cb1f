"""``scene-vit``: a small timm Vision Transformer trained by this project on synthetic scenes.

The offline profile cannot download pretrained vision checkpoints, so the book's vision chapters
need a model whose attention was *learned* and whose training data has known answers. This module
builds it from the weights shipped in ``attnchain/zoo/weights/`` (``scene_vit.pt``, the state
dicts, and ``scene_vit.json``, the configuration, seed, training time and measured accuracy).

Architecture
    A plain :class:`timm.models.vision_transformer.VisionTransformer` (no project-specific
    layers, so ``attnchain.capture``'s timm adapter reads it like any timm ViT): 64 x 64 RGB input,
    8 x 8 patches (an 8 x 8 grid of 64 patch tokens) plus one CLS token, pre-norm blocks, learned
    position embeddings. Width, depth and number of heads are in the JSON's ``config``.

Objective
    Multi-label classification on the CLS token: which of the shape classes
    ``attnchain.data.scenes.CLASSES`` occur in the scene (one sigmoid per class, binary
    cross-entropy). An auxiliary per-patch head (a linear layer on the final patch tokens, trained
    with cross-entropy against each patch's class composition: the fraction of its pixels that are
    background or belong to an object of each class) gives every patch token a dense target. This
    auxiliary loss is a deliberate choice: it uses the scenes' ground-truth masks, so the attention
    of this model is *supervised-with-dense-labels*, not emergent from image-level labels alone.
    The auxiliary head is shipped but not part of the returned model; see :func:`load_patch_head`.

Training data
    ``attnchain.data.scenes.generate(..., level="easy")`` on seeds disjoint from the held-out
    benchmark seed, fresh scenes every few hundred steps, with flips, 90-degree rotations and
    colour-channel permutations; AdamW with warm-up and a cosine schedule; a fixed seed. The script
    is ``python -m attnchain.zoo.train_scene_vit`` (see that module).

Measured accuracy
    :func:`report` returns the numbers the training script measured on the held-out benchmark
    (``attnchain.data.scenes.benchmark("easy")``): per-label accuracy and exact-match (all labels
    right) accuracy of the model, beside the trivial baselines (always predicting the per-class
    majority answer of the training distribution, and always predicting its most common label
    set). They are read from ``scene_vit.json``; nothing here is typed in by hand.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .images import to_chw_float, whole_image_box

__all__ = [
    "WEIGHTS_DIR",
    "WEIGHTS_FILE",
    "INFO_FILE",
    "DEFAULT_CONFIG",
    "make_model",
    "make_patch_head",
    "make_preprocess",
    "build",
    "load_patch_head",
    "report",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "scene_vit.pt"
INFO_FILE = WEIGHTS_DIR / "scene_vit.json"

#: Architecture of the shipped model (the JSON's ``config`` is authoritative for loading).
DEFAULT_CONFIG = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 3,
    "mlp_ratio": 2.0,
    "num_classes": 4,
    "drop_path_rate": 0.05,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
}


def make_model(config: dict | None = None) -> nn.Module:
    """A randomly initialised timm ``VisionTransformer`` with the scene-vit architecture.

    Parameters
    ----------
    config : dict, optional
        Keys of :data:`DEFAULT_CONFIG` to override.

    Returns
    -------
    timm.models.vision_transformer.VisionTransformer
        CLS-token pooling, ``num_classes`` presence logits, ``(B, 3, S, S) -> (B, num_classes)``.
    """
    from timm.models.vision_transformer import VisionTransformer

    cfg = {**DEFAULT_CONFIG, **(config or {})}
    if cfg["img_size"] % cfg["patch_size"]:
        raise ValueError(
            f"img_size {cfg['img_size']} is not divisible by patch_size {cfg['patch_size']}"
        )
    if cfg["embed_dim"] % cfg["num_heads"]:
        raise ValueError(
            f"embed_dim {cfg['embed_dim']} is not divisible by num_heads {cfg['num_heads']}"
        )
    return VisionTransformer(
        img_size=cfg["img_size"],
        patch_size=cfg["patch_size"],
        num_classes=cfg["num_classes"],
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        class_token=True,
        global_pool="token",
        drop_path_rate=cfg.get("drop_path_rate", 0.0),
    )


def make_patch_head(config: dict | None = None) -> nn.Linear:
    """The auxiliary per-patch head: ``(B, N, D) -> (B, N, num_classes + 1)`` (0 = background)."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    return nn.Linear(cfg["embed_dim"], cfg["num_classes"] + 1)


def make_preprocess(config: dict | None = None, device=None):
    """Return ``preprocess(image) -> (1, 3, S, S)`` normalised float32 tensor on ``device``.

    ``image``: PIL image, ``(H, W, 3)`` numpy array (uint8 in [0, 255] or float in [0, 1]) or
    ``(3, H, W)`` tensor in [0, 1] (a ``(B, 3, H, W)`` tensor gives ``(B, 3, S, S)``). Images of
    another size are resized to ``S = img_size`` (bilinear, antialiased); then
    ``(x - mean) / std`` per channel.
    """
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    size = int(cfg["img_size"])
    mean = torch.tensor(cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(image) -> torch.Tensor:
        t = to_chw_float(image)
        if t.ndim == 3:
            t = t.unsqueeze(0)
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=True).clamp(0.0, 1.0)
        t = (t - mean.to(t.device)) / std.to(t.device)
        return t.to(device) if device is not None else t

    preprocess.image_size = size
    preprocess.crop_box = whole_image_box  # resized whole: the model sees all of it
    return preprocess


def report() -> dict:
    """The JSON shipped next to the weights: config, seed, training time and measured accuracy."""
    if not INFO_FILE.exists():
        raise FileNotFoundError(
            f"{INFO_FILE} is missing; train it with `python -m attnchain.zoo.train_scene_vit`"
        )
    return json.loads(INFO_FILE.read_text())


def _load_state() -> dict:
    if not WEIGHTS_FILE.exists():
        raise FileNotFoundError(
            f"{WEIGHTS_FILE} is missing; train it with `python -m attnchain.zoo.train_scene_vit`"
        )
    return torch.load(WEIGHTS_FILE, map_location="cpu", weights_only=True)


def build(device=None):
    """Load the shipped scene-vit (offline, no downloads).

    Parameters
    ----------
    device : str or torch.device, optional
        Where to put the model and the preprocessed images (default CPU).

    Returns
    -------
    model : timm.models.vision_transformer.VisionTransformer
        In eval mode; ``model(x)`` gives ``(B, len(CLASSES))`` presence logits. ``model.scene_vit``
        holds the JSON report (classes, config, accuracy vs trivial baseline).
    preprocess : callable
        See :func:`make_preprocess`.
    """
    info = report()
    cfg = info["config"]
    model = make_model(cfg)
    state = _load_state()
    model.load_state_dict(state["model"])
    model.eval()
    if device is not None:
        model.to(device)
    model.scene_vit = info
    return model, make_preprocess(cfg, device=device)


def load_patch_head(device=None) -> nn.Linear:
    """The shipped auxiliary per-patch head (class composition of each patch; 0 = background).

    Apply it to ``model.forward_features(x)[:, model.num_prefix_tokens:]``.
    """
    info = report()
    head = make_patch_head(info["config"])
    head.load_state_dict(_load_state()["patch_head"])
    head.eval()
    return head.to(device) if device is not None else head


def _summary(info: dict) -> str:
    """One paragraph of measured numbers, formatted from the JSON report."""
    b, t = info["benchmark"]["model"], info["benchmark"]["trivial"]
    att = info.get("cls_attention_foreground_ap", {})
    text = (
        f"\n\nMeasured (read from ``scene_vit.json`` at import)\n"
        f"    On {info['benchmark']['split']}: per-label accuracy {b['per_label_accuracy']:.3f} "
        f"(trivial {t['per_label_accuracy']:.3f}), exact-match accuracy "
        f"{b['exact_match_accuracy']:.3f} (trivial {t['exact_match_accuracy']:.3f}), mean AP "
        f"{b['mean_average_precision']:.3f} (constant score {t['mean_average_precision']:.3f}). "
        f"Trained for {info['steps']} steps in {info['training_wall_time_s'] / 60:.1f} min on "
        f"{info['training_threads']} CPU threads, seed {info['seed']}."
    )
    if att:
        text += (
            f" CLS-attention foreground AP of the last layer {att['trained'][-1]:.3f} "
            f"(same architecture at initialisation {att['at_init'][-1]:.3f}, chance "
            f"{att['chance']:.3f})."
        )
    return text


if INFO_FILE.exists():  # keep the module docstring's numbers in step with the shipped weights
    try:
        __doc__ = (__doc__ or "") + _summary(json.loads(INFO_FILE.read_text()))
    except (KeyError, TypeError, ValueError):  # a malformed report is reported by report()
        pass
