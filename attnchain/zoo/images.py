"""Image input shared by the project's vision models: one conversion to a float tensor in [0, 1]."""
import numpy as np
import torch
from torch import Tensor

__all__ = ["to_chw_float"]


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
