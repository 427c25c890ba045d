"""Produce one cache with Ray: each actor holds a teacher replica and writes shards itself.

Plain Ray actors, not Ray Data: a shard must be computed from its own windows in fixed batches
(batches never straddle shards, so a shard's numbers do not depend on who made it), and Ray Data's
blocks and batches do not line up with shards. Here the unit of work is the shard, exactly as in
the local producer, and each actor runs the local producer's own loop (`producer.run_shards`) with its
own `CacheWriter` on the cache folder. The writer is safe for several processes (shards renamed
into place whole, manifest updates under `flock`); actor `j` of `n` takes the shards left to do at
positions `j, j + n, ...` (as `--num-workers n --worker-index j` would). So the manifest, resume and
checksums are those of a local run, and a killed run resumes with either engine.

The driver tokenizes, fits the encoding and writes the manifest header (as for a local run); it
ships the windows once through Ray's object store and shows progress from the manifest.

Multi-node: the cache folder must be the same shared file system (NFS, Lustre, ...) on every node;
start Ray there (`ray start --head` / `ray start --address=...`) and pass `--ray-address auto`.
GPU actors get one GPU each (Ray sets CUDA_VISIBLE_DEVICES, so the device inside an actor is `cuda`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from logitcache.errors import SettingError, UserError
from logitcache.format.manifest import Manifest
from logitcache.producer.header import with_loaded_model
from logitcache.producer.writer import CacheWriter


class TeacherActor:
    """One teacher replica; `run` computes and writes a list of shards of one cache."""

    def __init__(self, backend: str, teacher: str, backend_args: dict):
        from logitcache.backends import make_backend, quiet_libraries

        quiet_libraries()
        self.model = make_backend(backend, teacher, **backend_args)

    def describe(self) -> tuple[dict, dict]:
        return self.model.describe(), self.model.versions()

    def run(self, cache_dir: str, header: Manifest, tokens: np.ndarray, todo: list[int], batch_size: int,
            sample: int) -> int:
        from logitcache.producer.run import run_shards

        writer = CacheWriter(cache_dir, header)
        run_shards(self.model, writer, tokens, todo, batch_size, progress=False, sample=sample)
        return len(todo)


def _user_error(exc: BaseException) -> BaseException:
    """An actor's UserError reaches the user as itself (one line), not as a remote traceback."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, UserError) else exc


def run_ray(backend: str, teacher: str, backend_args: dict, header: Manifest, cache_dir: Path, tokens: np.ndarray,
            todo: list[int], batch_size: int, *, sample: int = 0, progress: bool = True, actors: int | None = None,
            address: str | None = None, cpus_per_actor: float = 1.0) -> CacheWriter:
    """Compute the shards `todo` of the cache `cache_dir` on Ray actors; returns the cache's writer.

    `actors`: teacher replicas (default: one per GPU of the cluster on a CUDA device, else 1).
    `address`: an existing cluster (`auto`, `ray://host:10001`, ...); without it a local Ray is
    started for this call and shut down after it.
    """
    try:
        import ray
    except ImportError:
        raise SettingError("engine", "ray", "ray is not installed (pip install 'logitcache[ray]')") from None
    from tqdm import tqdm

    gpu = str(backend_args.get("device", "cpu")).startswith("cuda")
    args = dict(backend_args, device="cuda") if gpu else dict(backend_args)
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise SettingError("ray_address", address, f"cannot connect ({exc})") from None
    handles = []
    try:
        n = actors or (int(ray.cluster_resources().get("GPU", 0)) if gpu else 1)
        if n < 1:
            raise SettingError("engine", "ray", "the cluster has no GPU for a cuda teacher; use --device cpu or "
                               "--ray-actors")
        n = min(n, len(todo))
        Actor = ray.remote(num_cpus=cpus_per_actor, num_gpus=1 if gpu else 0)(TeacherActor)
        handles = [Actor.remote(backend, teacher, args) for _ in range(n)]
        try:
            loaded, versions = ray.get([h.describe.remote() for h in handles])[0]
        except ray.exceptions.RayError as exc:
            raise _user_error(exc) from None
        header = with_loaded_model(header, loaded, versions)
        writer = CacheWriter(cache_dir, header)
        done = writer.completed()
        todo = [i for i in todo if i not in done]
        plan = writer.manifest
        seq_len = plan.data.seq_len
        tokens_ref = ray.put(np.ascontiguousarray(tokens))
        refs = [h.run.remote(str(cache_dir), writer.manifest, tokens_ref, todo[j::n], batch_size, sample)
                for j, h in enumerate(handles)]
        total = sum(plan.expected_rows(i) for i in todo) * seq_len
        bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"{Path(cache_dir).name} [ray x{n}]",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)
        start = time.perf_counter()
        try:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, timeout=1.0)
                try:
                    ray.get(ready)
                except ray.exceptions.RayError as exc:
                    raise _user_error(exc) from None
                now = writer.completed()
                bar.update(sum(plan.expected_rows(i) for i in todo if i in now) * seq_len - bar.n)
                bar.set_postfix(tok_s=f"{bar.n / max(time.perf_counter() - start, 1e-9):,.0f}", refresh=False)
        finally:
            bar.close()
        return writer
    finally:
        for h in handles:
            ray.kill(h)
        if started:
            ray.shutdown()
