"""Datasets: the offline synthetic scenes with known answers; ImageNet-class test sets."""
from . import imagenet, imagenet_seg, scenes

__all__ = ["imagenet", "imagenet_seg", "scenes"]
