"""Datasets: the offline synthetic scenes with known answers; ImageNet-class test sets."""
from . import imagenet, scenes

__all__ = ["imagenet", "scenes"]
