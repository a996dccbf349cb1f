"""Image preprocessing for evaluating hub checkpoints on the synthetic scenes.

(It belongs with the zoo's image helpers, :mod:`attnchain.zoo.images`; it lives here until it
moves there.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..zoo.images import whole_image_box

__all__ = ["whole_image_preprocess"]


def whole_image_preprocess(net):
    """Resize the *whole* image to a timm model's input size and normalise it (no centre crop).

    A hub checkpoint's own evaluation transform (resize, then centre crop) would cut off part of
    the scene, and the patch grid would no longer line up with the masks. This preprocess maps
    ``(B, 3, h, w)`` images in [0, 1] to ``(B, 3, H, W)`` with bilinear upsampling and the model's
    ``mean`` / ``std``, so every patch covers a known block of the scene.

    Parameters
    ----------
    net : timm model
        Its data config gives the input size, mean and std; a fixed-size model's
        ``patch_embed.img_size`` wins.

    Returns
    -------
    callable
        ``preprocess(images) -> Tensor (B, 3, H, W)`` on the model's device and in its dtype.

    Examples
    --------
    >>> import attnchain
    >>> net, _ = attnchain.zoo.load("tiny-timm-vit")
    >>> pre = whole_image_preprocess(net)
    >>> tuple(pre(torch.rand(2, 3, 64, 64)).shape[-2:]) == tuple(net.patch_embed.img_size)
    True

    See Also
    --------
    attnchain.tasks.scene_saliency.evaluate
    """
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=net)
    size = tuple(cfg["input_size"][1:])
    pe = getattr(net, "patch_embed", None)
    if getattr(pe, "img_size", None) is not None and not getattr(net, "dynamic_img_size", False):
        size = tuple(pe.img_size)  # a fixed-size model: its own input size
    p = next(net.parameters())
    mean = torch.tensor(cfg["mean"], device=p.device)[:, None, None]
    std = torch.tensor(cfg["std"], device=p.device)[:, None, None]

    def preprocess(images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(p.device)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
        return ((x - mean) / std).to(p.dtype)

    preprocess.crop_box = whole_image_box  # resized whole: the model sees all of it
    return preprocess
