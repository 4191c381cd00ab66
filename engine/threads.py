"""Thread pools: one knob sets every pool once, the BLAS's and the kernels'."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from .errors import GptcpuError

_limits = None  # kept alive: the limits hold for the life of the process


def set_threads(n: int) -> None:
    """n threads for the BLAS (OpenBLAS or MKL), any OpenMP runtime, and the numba kernels."""
    global _limits
    import numba

    from . import blas

    if n < 1:
        raise GptcpuError(f"--threads must be at least 1, got {n}")
    try:  # first: starting numba's layer may load an OpenMP runtime that threadpoolctl then sees
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except ValueError as e:  # the threading layer asked for cannot load
        raise GptcpuError(f"numba cannot start its {numba.config.THREADING_LAYER} threading layer: "
                          f"{str(e).splitlines()[0]}") from None
    blas.active().set_threads(n)
    _limits = threadpool_limits(limits=n)


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
    return lines
