"""Spindle's hot operations. Each kernel has a torch reference in `reference.py` with the same signature."""

from spindle_kernels import reference

__all__ = ["reference"]
