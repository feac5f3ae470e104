"""Necks: feature pyramids on top of the backbone's C2..C5."""
from .fpn import FPN

__all__ = ["FPN"]
