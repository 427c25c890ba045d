"""Producing caches: rows x teachers -> backend -> shards, resumable and shared between producers."""

from logitcache.producer.pipeline import produce

__all__ = ["produce"]
