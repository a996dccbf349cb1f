"""Image input shared by the project's vision models: one conversion to a float tensor in [0, 1]."""
import numpy as np
import torch
from torch import Tensor

__all__ = ["to_chw_float", "image_size", "whole_image_box", "crop_box"]


def to_chw_float(image, allow_gray: bool = False) -> Tensor:
    """Any supported image -> ``(3, H, W)`` or ``(B, 3, H, W)`` float32 tensor in [0, 1].

    Accepts a PIL image; an ``(H, W, 3|4)`` or ``(B, H, W, 3|4)`` numpy array, or ``(H, W)`` with
    ``allow_gray`` (uint8, or float in [0, 1]); or a ``(3, H, W)`` / ``(B, 3, H, W)`` tensor (uint8,
    or float in [0, 1]). Anything else raises a ``ValueError`` that names the problem (wrong shape
    or dtype, NaN/Inf, empty, out of range).
    """
    from PIL import Image
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim == 2 and allow_gray:
            image = np.stack([image] * 3, -1)
        if image.ndim not in (3, 4) or image.shape[-1] not in (3, 4):
            raise ValueError(f"numpy images must have shape (H, W, 3), got {image.shape}")
        arr = image[..., :3]
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        else:
            raise ValueError(f"numpy images must be uint8 or float, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
        t = t.permute(2, 0, 1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
    elif isinstance(image, Tensor):
        if image.ndim not in (3, 4) or image.shape[-3] != 3:
            raise ValueError(
                "tensor images must have shape (3, H, W) or (B, 3, H, W), got "
                f"{tuple(image.shape)}")
        t = image.detach()
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    else:
        raise ValueError(
            f"unsupported image type {type(image).__name__}: expected a PIL image, an (H, W, 3) "
            "numpy array or a (3, H, W) tensor")
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or Inf")
    if t.numel() == 0:
        raise ValueError("image is empty")
    if t.min() < -1e-3 or t.max() > 1 + 1e-3:
        raise ValueError("float images must be in [0, 1], got range "
                         f"[{t.min().item():.3g}, {t.max().item():.3g}]")
    return t.clamp(0.0, 1.0)


#: torchvision / timm transforms that do not move pixels (conversion and normalisation).
_NON_GEOMETRIC = ("ToTensor", "MaybeToTensor", "PILToTensor", "MaybePILToTensor", "Normalize",
                  "ConvertImageDtype", "ToDtype", "ToImage")


def image_size(image) -> tuple[int, int]:
    """``(H, W)`` of a PIL image, an ``(H, W[, C])`` array or a ``(..., 3, H, W)`` tensor."""
    if hasattr(image, "size") and not callable(image.size) and hasattr(image, "mode"):
        w, h = image.size  # PIL
        return int(h), int(w)
    if isinstance(image, Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {arr.shape}")
    return int(arr.shape[0]), int(arr.shape[1])


def whole_image_box(image) -> tuple[float, float, float, float]:
    """The box ``(top, left, height, width)`` of the whole image: a preprocess that resizes it.

    Examples
    --------
    >>> import numpy as np
    >>> whole_image_box(np.zeros((400, 600, 3)))
    (0.0, 0.0, 400.0, 600.0)
    """
    h, w = image_size(image)
    return 0.0, 0.0, float(h), float(w)


def crop_box(transform, height: int, width: int) -> tuple[float, float, float, float]:
    """The part of a ``height`` x ``width`` image that a torchvision transform keeps.

    Follows the image through the transform's ``Resize`` (an int resizes the shorter side,
    torchvision's rule; a pair resizes to it) and ``CenterCrop`` steps and maps the crop back to
    the original pixels. Overlays drawn over this box match what the model saw: timm's
    evaluation transform of DINOv2 keeps the centre 400 x 400 of a 400 x 600 photo, and a map
    stretched over the whole photo would be misplaced.

    Parameters
    ----------
    transform : torchvision.transforms.Compose or a single transform
    height, width : int
        The image's size.

    Returns
    -------
    (top, left, height, width) : floats, in the original image's pixels

    Raises
    ------
    ValueError
        A transform step whose geometry this function does not know.

    Examples
    --------
    >>> from torchvision import transforms
    >>> t = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224)])
    >>> crop_box(t, 400, 600)
    (0.0, 100.0, 400.0, 400.0)

    See Also
    --------
    whole_image_box, attnchain.viz.overlay
    """
    steps = getattr(transform, "transforms", [transform])
    top, left, h, w = 0.0, 0.0, float(height), float(width)  # the box, in original pixels
    cur_h, cur_w = int(height), int(width)                      # current image size
    for step in steps:
        name = type(step).__name__
        if name == "Resize":
            size = step.size if not isinstance(step.size, int) else [step.size]
            if len(size) == 1 and getattr(step, "max_size", None) is None:
                short, long = sorted((cur_h, cur_w))
                new_short, new_long = int(size[0]), int(size[0] * long / short)
                new_h, new_w = (new_short, new_long) if cur_h <= cur_w else (new_long, new_short)
            elif len(size) == 2:
                new_h, new_w = int(size[0]), int(size[1])
            else:
                raise ValueError(f"crop_box: Resize({step.size}, max_size={step.max_size}) "
                                 "is not supported")
            cur_h, cur_w = new_h, new_w
        elif name == "CenterCrop":
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            ch, cw = (int(size[0]), int(size[-1]))
            dt, dl = int(round((cur_h - ch) / 2.0)), int(round((cur_w - cw) / 2.0))
            sy, sx = h / cur_h, w / cur_w  # original pixels per current pixel
            top, left, h, w = top + dt * sy, left + dl * sx, ch * sy, cw * sx
            cur_h, cur_w = int(ch), int(cw)
        elif name not in _NON_GEOMETRIC:
            raise ValueError(f"crop_box: does not know the geometry of {name}")
    return float(top), float(left), float(h), float(w)
