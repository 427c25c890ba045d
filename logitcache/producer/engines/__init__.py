"""Where the teacher runs: `local` (this process, logitcache.producer.run.run_shards) or `ray` (actors
holding teacher replicas across a Ray cluster, engines/ray.py). Every engine writes through
CacheWriter into the same folder, so the manifest, resume and checksums are the same whichever ran."""

from __future__ import annotations


def run_engine(engine: str, *args, **kwargs):
    """Run the shards `todo` of one cache on a non-local engine; returns the cache's CacheWriter."""
    if engine == "ray":
        from logitcache.producer.engines.ray import run_ray

        return run_ray(*args, **kwargs)
    raise ValueError(f"unknown engine {engine!r}")
