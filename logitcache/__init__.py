"""Offline teacher caches for knowledge distillation: top-k log-probs plus the exact tail mass."""

__version__ = "0.1.0"
