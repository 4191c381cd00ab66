"""A Hugging Face GPT-2/GPT-J checkpoint -> ONNX graphs with past key/values, for onnxruntime.

    python -m gptcpu.bench.onnx_export HF_FOLDER OUT_FOLDER

Writes `model.onnx` (f32, exported by torch.onnx's dynamo exporter from transformers' eager
model), `model-opt.onnx` (onnxruntime's transformer optimizer, where its fusions apply) and
`model-int8.onnx` (onnxruntime's dynamic int8 quantization of the optimized graph's MatMul
weights). One graph
serves prefill and decode: its inputs are input_ids [B, T], attention_mask [B, past + T],
position_ids [B, T] and past_key_i / past_value_i [B, H, past, D]; its outputs are the logits
and the presents. Prefill passes a past of one zero slot masked out (the exporter cannot give a
dimension the size 0), so every cache after it carries that slot, masked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {"ort": "model.onnx", "ort-opt": "model-opt.onnx", "ort-int8": "model-int8.onnx"}


def export(hf_dir: Path, out: Path) -> dict[str, Path | str]:
    """-> {variant: path of its graph, or the reason it could not be made}. Reuses what exists."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path | str] = {}
    base = out / VARIANTS["ort"]
    if not base.exists():
        _export_base(hf_dir, base)
    made["ort"] = base
    opt = out / VARIANTS["ort-opt"]
    if not opt.exists():
        try:
            _write_then_move(lambda dst: _optimize(hf_dir, base, dst), opt)
        except Exception as e:  # the optimizer's fusions are pattern matches: report, don't fail
            made["ort-opt"] = f"onnxruntime's optimizer failed: {type(e).__name__}: {e}"
    if opt.exists():
        made["ort-opt"] = opt
    q = out / VARIANTS["ort-int8"]
    if not q.exists():
        # from the optimized graph, where onnxruntime has folded the exporter's Transpose of each
        # weight into the weight (the quantizer only rewrites a MatMul whose B is a constant); in a
        # process of its own: it needs ~4x the f32 graph in memory, and may be killed for it
        source = opt if opt.exists() else base
        r = subprocess.run([sys.executable, "-m", "gptcpu.bench.onnx_export", "--quantize", str(source), str(q)],
                           capture_output=True, text=True)
        if r.returncode:
            why = "killed (out of memory?)" if r.returncode < 0 else (r.stderr.strip().splitlines() or ["?"])[-1]
            made["ort-int8"] = f"onnxruntime's dynamic quantization failed: {why}"
    if q.exists():
        made["ort-int8"] = q
    return made


def _export_base(hf_dir: Path, path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    c = model.config
    L, H = c.num_hidden_layers, c.num_attention_heads
    D = c.hidden_size // H

    class WithPast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(L):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    B, T, P = 2, 3, 4   # sizes above 1, so that the exporter keeps every dimension symbolic
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T)
    past = [torch.zeros(B, H, P, D) for _ in range(2 * L)]
    names = [f"past_{kind}_{i}" for i in range(L) for kind in ("key", "value")]
    Dim = torch.export.Dim
    b, t, p, total = Dim("batch"), Dim("seq"), Dim("past"), Dim("total")
    dynamic = {"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: total}, "position_ids": {0: b, 1: t},
               "past": tuple({0: b, 2: p} for _ in range(2 * L))}
    # optimize=False: onnxscript's constant folding holds extra copies of the weights (GPT-J's
    # width at 4 layers, 4.9 GB, was killed for memory at 23 GB); onnxruntime optimizes on load.
    def write(dst):
        with torch.no_grad():
            torch.onnx.export(WithPast(), (ids, mask, pos, *past), str(dst), dynamo=True,
                              external_data=True, optimize=False,
                              input_names=["input_ids", "attention_mask", "position_ids", *names],
                              output_names=["logits", *[n.replace("past_", "present_") for n in names]],
                              dynamic_shapes=dynamic)
    _write_then_move(write, path)


def _write_then_move(write, path: Path) -> None:
    """write(a path in a folder of its own), then move what it wrote beside path: the graph names
    its weights file, which keeps its name; the graph goes last, so it exists only when complete."""
    tmp = path.parent / (path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp / path.name)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _optimize(hf_dir: Path, base: Path, out: Path) -> None:
    import json

    from onnxruntime.transformers.optimizer import optimize_model

    c = json.loads((hf_dir / "config.json").read_text())
    heads = c.get("n_head") or c.get("num_attention_heads")
    hidden = c.get("n_embd") or c.get("hidden_size")
    # its "gpt2" fusions first; on onnxruntime 1.32 they fail on a head without bias (IndexError in
    # Gpt2OnnxModel.postprocess), and then the generic "bert" fusions (SkipLayerNormalization,
    # FastGelu) still apply to the exported graph
    try:
        m = optimize_model(str(base), model_type="gpt2", num_heads=heads, hidden_size=hidden, opt_level=1)
    except Exception:
        m = optimize_model(str(base), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
    m.save_model_to_file(str(out), use_external_data_format=True)


class Graph:
    """A greedy loop over an exported graph, feeding its presents back as the next past."""

    def __init__(self, session):
        self.s = session
        self.past_names = [i.name for i in session.get_inputs() if i.name.startswith("past_")]
        shape = next(i.shape for i in session.get_inputs() if i.name.startswith("past_"))
        self.heads, self.head_dim = shape[1], shape[3]

    def greedy(self, ids: np.ndarray, new: int, timed: bool = False):
        """-> (start time, time of each new token, the new tokens [B][new])."""
        B, T = ids.shape
        t0 = time.perf_counter()
        past = {n: np.zeros((B, self.heads, 1, self.head_dim), np.float32) for n in self.past_names}
        mask = np.concatenate([np.zeros((B, 1), np.int64), np.ones((B, T), np.int64)], 1)
        feed = {"input_ids": ids.astype(np.int64), "attention_mask": mask,
                "position_ids": np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy(), **past}
        stamps, tokens = [], []
        for k in range(new):
            logits, *presents = self.s.run(None, feed)
            nxt = logits[:, -1].argmax(-1)
            stamps.append(time.perf_counter())
            tokens.append(nxt)
            mask = np.concatenate([mask, np.ones((B, 1), np.int64)], 1)
            feed = {"input_ids": nxt[:, None].astype(np.int64), "attention_mask": mask,
                    "position_ids": np.full((B, 1), T + k, np.int64), **dict(zip(self.past_names, presents))}
        return t0, stamps, np.stack(tokens, 1).tolist()


def quantize(source: Path, q: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(dst):  # (the optimizer's fused ops are outside shape inference: say "float")
        quantize_dynamic(str(source), str(dst), weight_type=QuantType.QInt8, use_external_data_format=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    _write_then_move(write, q)


if __name__ == "__main__":
    if sys.argv[1] == "--quantize":
        quantize(Path(sys.argv[2]), Path(sys.argv[3]))
        sys.exit(0)
    t = time.time()
    for name, r in export(Path(sys.argv[1]), Path(sys.argv[2])).items():
        print(name, r)
    print(f"{time.time() - t:.1f} s")
