"""Reading caches: a validated open (local folder or URL), streaming batches, the DDP-aware dataset, summaries."""

from logitcache.read.dataset import CacheDataset
from logitcache.read.reader import CacheReader, RemoteCacheReader, open_cache
from logitcache.read.summary import inspect_cache

__all__ = ["CacheDataset", "CacheReader", "open_cache", "RemoteCacheReader", "inspect_cache"]
