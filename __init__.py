"""gptcpu: a CPU inference engine for GPT-J and GPT-2 checkpoints, in NumPy.

    import gptcpu
    gptcpu.convert("EleutherAI/gpt-j-6b", "gptj", dtype="f16")   # hub id or local folder
    m = gptcpu.load("gptj", threads=16)
    for token in m.generate(m.tokenizer.encode("Hello"), 32):
        ...

`gptcpu.convert` is both the converter's package and, called, the `convert` function.
"""

from gptcpu import convert  # a callable package: gptcpu.convert(source, out, dtype)
from gptcpu.engine.config import Config
from gptcpu.engine.errors import GptcpuError
from gptcpu.engine.model import Model, load

__version__ = "0.1.0"
__all__ = ["Config", "GptcpuError", "Model", "convert", "load", "__version__"]
