"""Datasets: the offline synthetic scenes with known answers."""
from . import scenes

__all__ = ["scenes"]
