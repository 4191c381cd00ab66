"""The BLAS behind every f32 GEMM: NumPy's own OpenBLAS, or MKL through its runtime library.

NumPy is linked to OpenBLAS and cannot be pointed at another BLAS, so the MKL backend calls
`cblas_sgemm` in `libmkl_rt` (pip package `mkl`) with ctypes. MKL's threading layer is chosen
once, before its first call, with `MKL_Set_Threading_Layer`, to match the kernels' pool:

    openmp      MKL's GNU OpenMP layer: the same libgomp pool numba's `omp` layer uses
    tbb         MKL's TBB layer (libtbb.so.12 from the `tbb` package, loaded first, or MKL
                fails to find it), the same TBB arena numba's `tbb` layer uses
    sequential  MKL single-threaded; the kernels run on numba's `workqueue`

so the BLAS and the kernels never keep two pools of spinning threads. With OpenBLAS only the
kernels' layer changes: NumPy's OpenBLAS keeps its own pthreads pool (threadpoolctl sets it).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

import numpy as np

from .errors import GptcpuError

BACKENDS = ("openblas", "mkl")
NAMES = {"openblas": "OpenBLAS", "mkl": "MKL"}   # each backend as tables print it
THREADINGS = ("openmp", "tbb", "sequential")
_MKL_LAYER = {"openmp": 3, "sequential": 1, "tbb": 4}  # MKL_THREADING_GNU, _SEQUENTIAL, _TBB
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112


def find_library(name: str) -> str | None:
    """A shared library from the pip packages (installed under <prefix>/lib), else the system's."""
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))]):
        hits = sorted(glob.glob(os.path.join(prefix, "lib", name)))
        if hits:
            return hits[-1]
    return None


class OpenBLAS:
    name = "openblas"

    def __init__(self, threading: str | None = None):
        self.threading = threading

    @staticmethod
    def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(a, b, out=out)

    def set_threads(self, n: int) -> None:
        pass  # NumPy's OpenBLAS pool is set through threadpoolctl (engine.threads)


class MKL:
    name = "mkl"

    def __init__(self, threading: str = "openmp"):
        if threading not in _MKL_LAYER:
            raise GptcpuError(f"unknown threading {threading!r}; choose from {', '.join(THREADINGS)}")
        path = find_library("libmkl_rt.so*")
        if path is None:
            raise GptcpuError("the mkl backend needs MKL: pip install 'gptcpu[mkl]'")
        if threading == "tbb":
            tbb = find_library("libtbb.so.12")
            if tbb is None:
                raise GptcpuError("MKL's TBB layer needs libtbb.so.12: pip install tbb")
            ctypes.CDLL(tbb, mode=ctypes.RTLD_GLOBAL)
        self.threading = threading
        self.rt = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        self.rt.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
        self.rt.MKL_Set_Threading_Layer(_MKL_LAYER[threading])
        self._sgemm, self._bf16_gemm = self._gemm("cblas_sgemm"), self._gemm("cblas_gemm_bf16bf16f32")
        # MKL's bf16 GEMM runs on AMX's tiles where the CPU has them: 1.7-2.7x its sgemm at
        # prefill's shapes on a Xeon (Emerald Rapids). Elsewhere it is not known to pay.
        self.amx_bf16 = "amx_bf16" in cpuinfo("flags").split()
        self.rt.MKL_Set_Num_Threads.argtypes = [ctypes.c_int]
        self.rt.MKL_Get_Version_String.argtypes = [ctypes.c_char_p, ctypes.c_int]

    def _gemm(self, name):   # a cblas_?gemm: order, transa, transb, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc
        f = getattr(self.rt, name)
        f.restype = None
        f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        return f

    @property
    def version(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.rt.MKL_Get_Version_String(buf, 256)
        return buf.value.decode(errors="replace").strip()

    def set_threads(self, n: int) -> None:
        self.rt.MKL_Set_Num_Threads(n)

    def matmul(self, a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """a [M, K] @ b [K, N] (b C- or F-contiguous) -> out [M, N] float32, C-contiguous rows."""
        a = np.ascontiguousarray(a, dtype=np.float32)
        M, K = a.shape
        N = b.shape[1]
        if b.flags.c_contiguous:
            trans_b, ldb = _NO_TRANS, N
        elif b.flags.f_contiguous:
            trans_b, ldb = _TRANS, K
        else:
            b, trans_b, ldb = np.ascontiguousarray(b), _NO_TRANS, N
        if out is None:
            out = np.empty((M, N), np.float32)
        ldc = out.strides[0] // 4
        if out.strides[1] != 4 or out.dtype != np.float32:
            raise ValueError("out must have float32 rows with unit stride")
        self._sgemm(_ROW_MAJOR, _NO_TRANS, trans_b, M, N, K, 1.0, a.ctypes.data, K, b.ctypes.data, ldb,
                    0.0, out.ctypes.data, ldc)
        return out

    def matmul_bf16(self, x: np.ndarray, bits: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        """x [M, K] float32 @ bf16 bits [K, N] + bias -> [M, N] float32, on MKL's bf16 GEMM: x is
        rounded to bf16 (to nearest even, as torch's bf16 models round their activations), the
        sums are f32."""
        from . import kernels
        M, K = x.shape
        N = bits.shape[1]
        bits = np.ascontiguousarray(bits)   # (a stored matrix is already: no copy)
        xb = np.empty((M, K), np.uint16)
        kernels.round_bf16(np.ascontiguousarray(x, dtype=np.float32), xb)
        out = np.empty((M, N), np.float32)
        if bias is not None:
            out[...] = bias
        self._bf16_gemm(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, M, N, K, 1.0, xb.ctypes.data, K,
                        bits.ctypes.data, N, 0.0 if bias is None else 1.0, out.ctypes.data, N)
        return out


_active = OpenBLAS()
_chosen: tuple[str, str | None] | None = None


def pick_backend(vendor: str, has_mkl: bool) -> str:
    """The BLAS a CPU gets by default: MKL on Intel's CPUs where it is installed, else OpenBLAS.
    On a 2-core Xeon (Emerald Rapids) MKL's sgemm (GNU OpenMP layer) ran prefill's GEMMs
    1.15-1.98x faster than OpenBLAS's (128 x 768 .. 16384 shapes, alternating in one process)
    and GPT-2-medium f32 prefill 1.2-1.5x (decode level); on the AMD EPYCs here it lost
    (GPT-J width f32 prefill 85-107 tok/s against 187-192)."""
    return "mkl" if vendor == "GenuineIntel" and has_mkl else "openblas"


def cpuinfo(key: str) -> str:
    """The first value of `key` in /proc/cpuinfo ("vendor_id": "GenuineIntel", "AuthenticAMD";
    "model name"; ...), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith(key)), "")
    except OSError:
        return ""


def default_backend() -> str:
    """$GPTCPU_BACKEND, else pick_backend for this machine."""
    return os.environ.get("GPTCPU_BACKEND") or pick_backend(cpuinfo("vendor_id"), find_library("libmkl_rt.so*") is not None)


def use(backend: str | None = None, threading: str | None = None) -> None:
    """Choose the BLAS for every GEMM on weights and the kernels' threading layer (defaults:
    $GPTCPU_BACKEND, else default_backend's choice; $GPTCPU_THREADING, else numba's own choice
    of layer, with MKL on its GNU OpenMP layer). Once per process: MKL's layer and numba's are
    fixed by their first call, so asking again for something else is an error."""
    global _active, _chosen
    want = (backend or default_backend(), threading or os.environ.get("GPTCPU_THREADING") or None)
    if want == ("mkl", None):   # MKL's GNU OpenMP layer, and the kernels on the same libgomp pool
        want = ("mkl", "openmp")
    if want[0] not in BACKENDS:
        raise GptcpuError(f"unsupported backend {want[0]!r}; choose from {', '.join(BACKENDS)}")
    if want[1] is not None and want[1] not in THREADINGS:
        raise GptcpuError(f"unknown threading {want[1]!r}; choose from {', '.join(THREADINGS)}")
    # libgomp (numba's omp layer, MKL's GNU layer) spins 300,000 times before sleeping; decode
    # wants its workers hot between the ~50 kernels of a token, but prefill alternates kernels
    # with the BLAS's own threads, which the spinning starves. 30,000 keeps both fast (GPT-2
    # small bf16, 2 threads: prefill 850 -> 1,057 tok/s, decode 123 -> 121). Read at load.
    os.environ.setdefault("GOMP_SPINCOUNT", "30000")
    if _chosen is not None:
        if want != _chosen and (backend or threading):
            raise GptcpuError(f"this process already runs {_chosen[0]} with {_chosen[1] or 'default'} "
                              "threading: the BLAS and threading layer are chosen once per process")
        return
    from . import kernels
    kernels.set_threading_layer(want[1])
    _active = MKL(want[1] or "openmp") if want[0] == "mkl" else OpenBLAS(want[1])
    _chosen = want


def active():
    return _active


def matmul(a, b, out=None):
    return _active.matmul(a, b, out)
