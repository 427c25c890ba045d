"""Sharing caches through any fsspec URL: verified, resumable push and pull, and the dataset card."""

from logitcache.share.pull import pull
from logitcache.share.push import push

__all__ = ["pull", "push"]
