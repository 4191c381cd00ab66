"""gptcpu: a CPU inference engine for GPT-J and GPT-2 checkpoints, in NumPy.

    import gptcpu
    gptcpu.convert("EleutherAI/gpt-j-6b", "gptj", dtype="f16")   # hub id or local folder
    m = gptcpu.load("gptj", threads=16)
    for token in m.generate(m.tokenizer.encode("Hello"), 32):
        ...

`gptcpu.convert` is both the converter's package and, called, the `convert` function.
"""

import os

# NumPy's OpenBLAS workers spin for ~0.1 s after each GEMM before they sleep (2^28 cycles); a
# decode step right after a prefill then has them spinning against the kernels' own threads
# (serve, 8 streams of GPT-2-small, 2 threads: 1.4 s of one core spun away per 1,024 tokens).
# 2^4 cycles puts them to sleep at once. It is read when OpenBLAS loads: before NumPy's import.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from gptcpu import convert  # noqa: E402  (a callable package: gptcpu.convert(source, out, dtype)
from gptcpu.engine.config import Config  # noqa: E402
from gptcpu.engine.errors import GptcpuError  # noqa: E402
from gptcpu.engine.model import Model, load  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Config", "GptcpuError", "Model", "convert", "load", "__version__"]
