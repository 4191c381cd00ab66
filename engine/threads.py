"""Thread pools: one knob sets every pool once, the BLAS's and the kernels'."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from threadpoolctl import threadpool_info, threadpool_limits

from .errors import GptcpuError

_limits = None  # kept alive: the limits hold for the life of the process
_count: int | None = None  # what set_threads asked for, for apply()
_applied = threading.local()  # per Python thread: the kernels' count this module gave numba there


def set_threads(n: int) -> None:
    """n threads for the BLAS (OpenBLAS or MKL), any OpenMP runtime, and the numba kernels."""
    global _limits, _count
    import numba

    from . import blas

    if n < 1:
        raise GptcpuError(f"--threads must be at least 1, got {n}")
    try:  # first: starting numba's layer may load an OpenMP runtime that threadpoolctl then sees
        _give_numba(min(n, numba.config.NUMBA_NUM_THREADS))
    except ValueError as e:  # the threading layer asked for cannot load
        raise GptcpuError(f"numba cannot start its {numba.config.THREADING_LAYER} threading layer: "
                          f"{str(e).splitlines()[0]}") from None
    blas.active().set_threads(n)
    _limits = threadpool_limits(limits=n)
    _count = n


def apply() -> None:
    """Give the calling thread the kernels' thread count. numba keeps that count per Python
    thread: one that did not call set_threads (serve's scheduler, a Ray replica's or a Ray Data
    actor's worker thread) runs every kernel on all NUMBA_NUM_THREADS threads. Two Ray replicas
    of --threads 1 on two cores then ran two threads each, spinning against each other (serve,
    8 clients: 36.3 tok/s; with this, 152.6). Every forward pass calls this, so it remembers,
    per thread, what it has set (numba.get_num_threads takes two locks: ~8 us a decode step)."""
    if _count is not None:
        import numba

        n = min(_count, numba.config.NUMBA_NUM_THREADS)
        if getattr(_applied, "count", None) != n:
            _give_numba(n)


def _give_numba(n: int) -> None:
    """numba.set_num_threads(n) for the calling Python thread, remembered for kernel_threads."""
    import numba

    numba.set_num_threads(n)
    _applied.count = n


def kernel_threads() -> int:
    """The kernels' thread count on the calling Python thread, as set_threads or apply gave it
    (numba's own answer where neither has run). numba.get_num_threads() takes two locks, 0.5 us
    a call from Python, and matvec asks on each of a GPT-2-small token's 49 matrices."""
    n = getattr(_applied, "count", None)
    if n is None:
        import numba

        return numba.get_num_threads()
    return n


_numpy_blas = None   # the thread-count controls of NumPy's own BLAS (OpenBLAS or BLIS), found once


@contextlib.contextmanager
def numpy_blas_on_one_thread():
    """Run NumPy's own BLAS on the calling thread alone for the duration.

    For a forward pass whose GEMMs run on the kernels' pool (bf16, f16, q8 weights): what is
    left on NumPy's BLAS (prefill's attention) would otherwise wake its worker threads against
    the kernels' after each call. GPT-2-small bf16, 128-token prefill, 2 threads, alternating
    in one process (medians of 16): 86.1 ms with two BLAS threads, 72.4 like this; level at
    512 tokens, where attention's GEMMs are larger. Only in the main thread: NumPy's
    OpenBLAS 0.3.31 ignores the count set from any other (under this, a 2048^2 sgemm in a
    worker thread still used 1.98 CPUs per second of wall time), so serve's scheduler thread
    keeps both BLAS threads for prompt attention."""
    global _numpy_blas
    if _numpy_blas is None:
        from threadpoolctl import ThreadpoolController

        _numpy_blas = [c for c in ThreadpoolController().select(user_api="blas").lib_controllers
                       if c.internal_api in ("openblas", "blis")]
    before = [c.get_num_threads() for c in _numpy_blas]
    for c in _numpy_blas:
        c.set_num_threads(1)
    try:
        yield
    finally:
        for c, n in zip(_numpy_blas, before):
            c.set_num_threads(n)


def available_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (what
    `docker run --cpus N` sets; os.cpu_count() sees the host's cores and ignores both)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(n, int(quota))) if quota else n


def cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us), None if unlimited."""
    paths = ["/sys/fs/cgroup/cpu.max"]
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                paths.insert(0, f"/sys/fs/cgroup{line[3:].rstrip('/')}/cpu.max")
    except OSError:
        pass
    for p in paths:
        try:
            quota, period = Path(p).read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        except (OSError, ValueError):
            continue
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 else None
    except (OSError, ValueError):
        return None


def describe() -> list[str]:
    """One line per pool in effect: the BLAS and its threading layer, OpenMP runtimes, the kernels."""
    import numba

    from . import blas, kernels

    b = blas.active()
    lines = [f"backend {b.name}" + (f" ({b.version}), threading {b.threading}" if b.name == "mkl" else "")]
    lines += [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer', '-')}): "
              f"{p.get('num_threads')} threads  [{p.get('filepath')}]" for p in threadpool_info()]
    lines.append(f"kernels: numba {numba.__version__}, layer {kernels.threading_layer()} "
                 f"(asked: {numba.config.THREADING_LAYER}), {numba.get_num_threads()} threads")
    low = ("bf16 on MKL's bf16 GEMM (AMX-BF16, x rounded to bf16); f16 and q8" if getattr(b, "amx_bf16", False)
           else "bf16, f16 and q8")
    lines.append(f"prefill GEMMs: f32 weights on {b.name}'s sgemm; {low} on the compiled kernels")
    return lines
