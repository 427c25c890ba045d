"""Pinning BLAS to one thread around the fits, whose matrices are too small for threads to help."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the enclosed block with one BLAS thread, then restore the previous count.

    scipy's L-BFGS-B calls BLAS on its tiny (<= 10-parameter) matrices; OpenBLAS threads gain
    nothing there, and on a busy machine their spin-waiting slows every iteration (see
    docs/laws.md).  Uses threadpoolctl when installed, else the OpenBLAS builds numpy
    and scipy load; a no-op where neither applies.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
        return
    handles: list[tuple[Callable, int]] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({ln.split()[-1] for ln in maps
                            if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        paths = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            for prefix in ("scipy_openblas", "openblas"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    put.argtypes = [ctypes.c_int]
                    handles.append((put, int(get())))
                    put(1)
                    break
            else:
                continue
            break
    try:
        yield
    finally:
        for put, previous in handles:
            put(previous)
