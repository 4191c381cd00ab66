"""`gptcpu convert`: a Hugging Face GPT-J or GPT-2 checkpoint -> a gptcpu model folder.

It streams: one output tensor is assembled, written and freed at a time, and the source's pages
are released after use, so peak memory stays near the largest single tensor, not the model.
It writes into a temporary folder beside the output and renames it at the end: an interrupted
or failed convert leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from gptcpu.engine.config import DTYPES as SUPPORTED_DTYPES
from gptcpu.engine.errors import GptcpuError

from .maps import Out, plan
from .sources import open_weights, read_hf_config, resolve
from .tokenizer import write_tokenizer
from .writer import DTYPES, OutOfRange, SafetensorsWriter, cast, q8_scales, quantize

__all__ = ["convert", "default_out"]


def gptcpu_home() -> Path:
    return Path(os.environ.get("GPTCPU_HOME", Path.home() / ".cache" / "gptcpu"))


def default_out(source: str, dtype: str) -> Path:
    return gptcpu_home() / "models" / f"{Path(source.rstrip('/')).name}-{dtype}"


def convert(source: str, out: str | Path | None = None, dtype: str = "f16", revision: str | None = None,
            force: bool = False, progress: bool | None = None) -> Path:
    """Convert SOURCE (a hub id or a local Hugging Face folder) into a gptcpu model folder.

    dtype is the storage type of the weight matrices ("f32", "f16" or "bf16"); norms and biases
    stay f32. Returns the output folder. Raises GptcpuError on bad input, leaving nothing behind.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise GptcpuError(f"unsupported dtype {dtype!r}; supported: {', '.join(SUPPORTED_DTYPES)}")
    out = Path(out) if out is not None else default_out(source, dtype)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise GptcpuError(f"{out} exists and is not empty: pass --force to replace it")

    folder, origin = resolve(source, revision)
    hf_config = read_hf_config(folder)
    weights = open_weights(folder)
    config, outputs = plan(hf_config, dtype, weights.names)
    for o in outputs:
        for p in o.pieces:
            if p.src is not None and weights.shape(p.src) != p.shape:
                raise GptcpuError(f"tensor {p.src} has shape {list(weights.shape(p.src))}, "
                                  f"expected {list(p.shape)} from config.json")
    origin.update(model_type=hf_config.get("model_type"), files=weights.files,
                  torch_dtype=hf_config.get("torch_dtype") or hf_config.get("dtype"))
    config_json = {**config.to_json(), "source": origin}

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise GptcpuError(f"cannot write {out}: {e}") from None
    try:
        origin["tokenizer"] = write_tokenizer(folder, tmp)
        _write_weights(tmp / "model.safetensors", outputs, weights, dtype, progress)
        _verify(tmp / "model.safetensors", outputs, dtype)
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        _replace(tmp, out)
    except OSError as e:   # a full disk, a folder we may not write: one line, nothing left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise GptcpuError(f"converting into {out} failed: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


SLAB_BYTES = 32 << 20  # an output tensor is assembled and written this much at a time


def _pieces(o: Out, sources: list) -> list[np.ndarray]:
    """o's pieces in the output orientation (views: nothing is read yet)."""
    return [np.zeros(p.shape, np.float32) if s is None else (s.T if o.linear else s)
            for p, s in zip(o.pieces, sources)]


def _rows_per_slab(o: Out) -> int:
    return max(1, SLAB_BYTES // (4 * max(1, int(np.prod(o.shape[1:], dtype=np.int64)))))


def _slabs(o: Out, sources: list, convert_rows):
    """The output tensor o as row slabs, convert_rows(rows of one piece, first row) applied to
    each piece's rows; pieces come from the (transposed) sources."""
    pieces, rows = _pieces(o, sources), _rows_per_slab(o)
    if o.axis == 0:   # pieces stacked along the rows: each one in turn
        at = 0
        for piece in pieces:
            for r in range(0, piece.shape[0], rows):
                yield convert_rows(piece[r:r + rows], at + r, slice(None))
            at += piece.shape[0]
    else:             # pieces side by side: every slab takes its rows from each of them
        for r in range(0, o.shape[0], rows):
            parts, col = [], 0
            for piece in pieces:
                parts.append(convert_rows(piece[r:r + rows], r, slice(col, col + piece.shape[1])))
                col += piece.shape[1]
            yield np.concatenate(parts, axis=1)


def _absmax(o: Out, sources: list) -> np.ndarray:
    """The largest |weight| of each output channel of o (a first pass over its sources, a slab
    of rows at a time)."""
    pieces, rows = _pieces(o, sources), _rows_per_slab(o)
    if o.per_row:
        return np.concatenate([np.abs(p[r:r + rows]).max(axis=1) for p in pieces
                               for r in range(0, p.shape[0], rows)]).astype(np.float32)
    maxima = []
    for p in pieces:
        m = np.zeros(p.shape[1], np.float32)
        for r in range(0, p.shape[0], rows):
            np.maximum(m, np.abs(p[r:r + rows]).max(axis=0), out=m)
        maxima.append(m)
    # side by side, each piece has its own columns; stacked, they share them
    return np.concatenate(maxima) if o.axis == 1 else np.maximum.reduce(maxima)


def _write_weights(path: Path, outputs: list[Out], weights, dtype: str, progress: bool | None) -> None:
    from tqdm import tqdm

    st_dtype, np_dtype = DTYPES[dtype]
    specs = [(o.name, st_dtype if o.is_weight else "F32", o.shape) for o in outputs]
    by_name = {o.name: o for o in outputs}
    scales = {}  # q8: name -> the per-channel scales, written (f32 first) before the int8 weights
    if dtype == "q8":
        specs += [(o.name + ".scale", "F32", (o.channels,)) for o in outputs if o.is_weight]
        by_name.update({o.name + ".scale": o for o in outputs if o.is_weight})
    writer = SafetensorsWriter(path, specs, {"format": "pt", "gptcpu": "1"})
    show = sys.stderr.isatty() if progress is None else progress
    try:
        with tqdm(total=writer.nbytes, unit="B", unit_scale=True, desc="convert", disable=not show) as bar:
            for name in writer.order:
                o = by_name[name]
                sources = [None if p.src is None else weights.get(p.src) for p in o.pieces]
                if name.endswith(".scale"):
                    scales[o.name] = q8_scales(_absmax(o, sources))
                    bar.update(writer.write(name, [scales[o.name]]))
                elif dtype == "q8" and o.is_weight:
                    s = scales[o.name]
                    rows = (lambda b, r, c: quantize(b, s[r:r + len(b), None])) if o.per_row else \
                           (lambda b, r, c: quantize(b, s[c]))
                    bar.update(writer.write(name, _slabs(o, sources, rows)))
                else:
                    to = np_dtype if o.is_weight else np.float32
                    try:
                        bar.update(writer.write(name, _slabs(o, sources, lambda b, r, c: cast(b, to))))
                    except OutOfRange as e:
                        raise GptcpuError(f"tensor {name}: {e}; convert with --dtype bf16 or f32") from None
                del sources
                for p in o.pieces:
                    if p.src is not None:
                        weights.release(p.src)
    except BaseException:
        writer.abort()
        raise
    writer.close()


def _verify(path: Path, outputs: list[Out], dtype: str) -> None:
    """The file must open with the safetensors library itself and hold exactly what we meant."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    want = {o.name: o.shape for o in outputs}
    if dtype == "q8":
        want.update({o.name + ".scale": (o.channels,) for o in outputs if o.is_weight})
    if got != want:
        raise GptcpuError(f"internal error: {path} does not hold the tensors it should")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder into place; an existing one (--force) is swapped out, then removed."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


class _CallableModule(type(sys)):
    """`gptcpu.convert(...)` is the API (DESIGN.md) and `gptcpu.convert` is also this package:
    calling the package calls `convert`, so both hold without one shadowing the other."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
