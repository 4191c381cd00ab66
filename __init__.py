"""gptcpu: a CPU inference engine for GPT-J and GPT-2 checkpoints, in NumPy.

    import gptcpu
    gptcpu.convert("EleutherAI/gpt-j-6b", "gptj", dtype="f16")   # hub id or local folder
    m = gptcpu.load("gptj", threads=16)
    for token in m.generate(m.tokenizer.encode("Hello"), 32):
        ...

Note: `gptcpu.convert` is the function; its package is `gptcpu.convert` too, so import its
modules by their full names (`from gptcpu.convert.maps import ARCHS`).
"""

from gptcpu.engine.config import Config
from gptcpu.engine.errors import GptcpuError
from gptcpu.engine.model import Model, load

from gptcpu.convert import convert  # noqa: E402  (shadows the package name on purpose: the API)

__version__ = "0.1.0"
__all__ = ["Config", "GptcpuError", "Model", "convert", "load", "__version__"]
