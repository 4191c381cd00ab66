"""Thread pools: one knob sets the BLAS pool (and any OpenMP pool) through threadpoolctl."""

from __future__ import annotations

from threadpoolctl import threadpool_info, threadpool_limits

from .errors import GptcpuError

_limits = None  # kept alive: the limits hold for the life of the process


def set_threads(n: int) -> None:
    global _limits
    if n < 1:
        raise GptcpuError(f"--threads must be at least 1, got {n}")
    _limits = threadpool_limits(limits=n)


def describe() -> list[str]:
    """One line per loaded pool: library, version, threading layer, threads."""
    return [f"{p.get('internal_api')} {p.get('version')} ({p.get('threading_layer', '-')}): "
            f"{p.get('num_threads')} threads" for p in threadpool_info()]
