"""Train gptcpu's embedded demo model: a tiny GPT-2 that writes Python.

The model in `engine/demo/` is a 4-layer, 128-wide GPT-2 with a 4,096-token byte-level BPE
vocabulary, trained from scratch on CPU on the Python standard library's own `.py` sources
(those of the interpreter that runs this script). Rebuild it with

    python -m gptcpu.bench.train_demo --out engine/demo
    # or: python bench/train_demo.py --out engine/demo

It needs the `bench` extra (torch, transformers) and `tokenizers`, runs on one thread
(`torch.set_num_threads(1)`) and takes about half an hour. What it does:

1. Data. Every `.py` file under `sysconfig.get_paths()["stdlib"]`, except site-packages, the test
   suites (any `test/`, `tests/` or `idle_test/` folder) and files over 200 KB, sorted by relative
   path. A file goes to the held-out test split when sha1(relative path) % 20 == 0 (about 5%);
   the list is written to `test_files.txt`.
2. Tokenizer. A byte-level BPE (`tokenizers`), vocabulary 4,096, trained on the train files only,
   with `<|endoftext|>` as id 0. decode(encode(s)) == s for any text. Saved as `tokenizer.json`.
3. Model. `transformers.GPT2LMHeadModel`, n_positions 256, n_embd 128, n_layer 4, n_head 4,
   tied embeddings, gelu_new, no dropout. Files are joined with `<|endoftext|>`; each step
   trains on a batch of random 256-token windows of that stream.
4. Training. AdamW (lr 3e-3, linear warm-up then cosine decay to 10%, weight decay 0.1 on the
   matrices, gradient clip 1.0), fixed seed. Stops after `--steps` steps or `--max-minutes`
   minutes, whichever comes first.
5. Evaluation and output. Mean cross-entropy (nats) and perplexity over the non-overlapping
   256-token windows of the test stream and over a sample of train windows; the model
   (`model.save_pretrained`, f32 safetensors), tokenizer.json, TRAINING.md and training_log.txt.

The result is deterministic for a given Python standard library, seed and library versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
import tokenize
from pathlib import Path

EOT = "<|endoftext|>"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "engine" / "demo"
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test"}
MAX_FILE_BYTES = 200_000


# ----------------------------------------------------------------------------------- data

def stdlib_files(root: Path) -> list[str]:
    """Relative paths of the stdlib's .py files worth training on, sorted."""
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        if SKIP_DIRS & set(rel.split("/")[:-1]):
            continue
        if not p.is_file() or p.stat().st_size > MAX_FILE_BYTES:
            continue
        out.append(rel)
    return sorted(out)


def is_test_file(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20 == 0


def read_source(path: Path) -> str | None:
    try:
        with tokenize.open(path) as f:  # honours a `# -*- coding: ... -*-` line
            return f.read()
    except (SyntaxError, UnicodeDecodeError, OSError):
        return None


# ------------------------------------------------------------------------------ tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_stream(tok, texts: list[str], eot_id: int):
    """All texts encoded and joined with <|endoftext|>, as one int64 array."""
    import numpy as np

    ids: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot_id)
    return np.asarray(ids, dtype=np.int64)


# -------------------------------------------------------------------------- train / eval

def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def evaluate(model, windows, batch: int) -> float:
    """Mean next-token cross-entropy (nats) over the given [N, ctx+1] windows."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            x = torch.from_numpy(windows[i:i + batch])
            logits = model(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += x[:, 1:].numel()
    model.train()
    return total / count


def non_overlapping(stream, ctx: int):
    """Windows of ctx+1 tokens with stride ctx: every token after the first is predicted once."""
    import numpy as np

    n = (len(stream) - 1) // ctx
    return np.stack([stream[i * ctx:i * ctx + ctx + 1] for i in range(n)])


def greedy(model, tok, prompt: str, n: int) -> str:
    import torch

    ids = tok.encode(prompt, add_special_tokens=False).ids
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.eos_token_id)
    return tok.decode(out[0].tolist(), skip_special_tokens=False)


# ---------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: engine/demo)")
    p.add_argument("--steps", type=int, default=2700, help="optimizer steps (the cosine schedule's length)")
    p.add_argument("--max-minutes", type=float, default=35.0, help="stop training after this many minutes")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--ctx", type=int, default=256, help="sequence length = n_positions")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--train-eval-windows", type=int, default=128, help="train windows to evaluate at the end")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one thread too
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import numpy as np
    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log_lines: list[str] = []

    def log(msg: str):
        print(msg, flush=True)
        log_lines.append(msg)

    # 1. data
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, test_files, train_texts, test_texts = [], [], [], []
    for rel in stdlib_files(root):
        text = read_source(root / rel)
        if not text:
            continue
        (test_files if is_test_file(rel) else train_files).append(rel)
        (test_texts if is_test_file(rel) else train_texts).append(text)
    (out / "test_files.txt").write_text("".join(r + "\n" for r in test_files))
    log(f"data: {root} (Python {platform.python_version()}): "
        f"{len(train_files)} train files, {len(test_files)} test files")

    # 2. tokenizer
    tok = train_tokenizer(train_texts, args.vocab)
    eot_id = tok.token_to_id(EOT)
    for s in ["def f(x):\n    return x  # ok\n", "héllo wörld ✓ 日本語 🙂\r\n\t\x00", "  a\n\n  "]:
        assert tok.decode(tok.encode(s, add_special_tokens=False).ids, skip_special_tokens=False) == s
    tok.save(str(out / "tokenizer.json"))
    train_ids = token_stream(tok, train_texts, eot_id)
    test_ids = token_stream(tok, test_texts, eot_id)
    n_bytes = sum(len(t.encode()) for t in train_texts)
    log(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}, {EOT} = {eot_id}; "
        f"{len(train_ids):,} train tokens ({n_bytes / len(train_ids):.2f} bytes/token), "
        f"{len(test_ids):,} test tokens ({time.time() - t_start:.0f}s)")

    # 3. model
    config = GPT2Config(
        vocab_size=tok.get_vocab_size(), n_positions=args.ctx, n_embd=args.n_embd,
        n_layer=args.n_layer, n_head=args.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).float()
    n_params = sum(p.numel() for p in model.parameters())  # tied: wte counted once
    log(f"model: gpt2, n_positions {args.ctx}, n_embd {args.n_embd}, n_layer {args.n_layer}, "
        f"n_head {args.n_head}, {n_params:,} parameters")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    # 4. train
    rng = np.random.default_rng(args.seed)
    offsets = np.arange(args.ctx + 1)
    t_train = time.time()
    deadline = t_train + args.max_minutes * 60
    model.train()
    step, running, n_running, last_loss = 0, 0.0, 0, float("nan")
    stop_reason = "steps"
    while step < args.steps:
        if time.time() >= deadline:
            stop_reason = "time"
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        starts = rng.integers(0, len(train_ids) - args.ctx - 1, size=args.batch)
        x = torch.from_numpy(train_ids[starts[:, None] + offsets])
        logits = model(input_ids=x[:, :-1]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        running += loss.item()
        n_running += 1
        if step % args.log_every == 0 or step == args.steps or step == 1:
            last_loss = running / n_running
            log(f"step {step:5d}  loss {last_loss:.4f}  lr {lr_at(step - 1, args):.2e}  "
                f"elapsed {time.time() - t_train:7.1f}s")
            running, n_running = 0.0, 0
    if n_running:
        last_loss = running / n_running
        log(f"step {step:5d}  loss {last_loss:.4f}  elapsed {time.time() - t_train:7.1f}s")
    if stop_reason == "time":
        log(f"stopped by the time budget ({args.max_minutes:g} min) after {step} of {args.steps} steps")
    train_seconds = time.time() - t_train

    # 5. evaluate
    test_w = non_overlapping(test_ids, args.ctx)
    train_w = non_overlapping(train_ids, args.ctx)
    train_w = train_w[np.sort(np.random.default_rng(args.seed + 1).choice(
        len(train_w), size=min(args.train_eval_windows, len(train_w)), replace=False))]
    test_loss = evaluate(model, test_w, args.batch)
    train_eval_loss = evaluate(model, train_w, args.batch)
    log(f"eval: test {test_loss:.4f} nats (ppl {math.exp(test_loss):.2f}) over {len(test_w)} windows; "
        f"train sample {train_eval_loss:.4f} nats (ppl {math.exp(train_eval_loss):.2f}) "
        f"over {len(train_w)} windows")

    # 6. save
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
        "unk_token": EOT, "model_max_length": args.ctx, "add_prefix_space": False,
    }, indent=2) + "\n")
    samples = {p: greedy(model, tok, p, 60) for p in ["def fib(n):", "import os\n"]}
    wall = time.time() - t_start
    log(f"done: {step} steps, training {train_seconds / 60:.1f} min, total {wall / 60:.1f} min")
    (out / "training_log.txt").write_text("\n".join(log_lines) + "\n")

    cmd = "python -m gptcpu.bench.train_demo --out engine/demo"
    defaults = vars(parse_args([]))
    extra = [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v != defaults[k]]
    if extra:
        cmd += " " + " ".join(extra)
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != "TRAINING.md"}
    md = f"""# The demo model

A {n_params:,}-parameter GPT-2 trained from scratch on CPU on the Python standard library, so
that `gptcpu generate "def fib(n):"` continues with plausible Python. It is a demo, not a
useful code model: expect repetition and invented names. Built by `bench/train_demo.py`.

## Data

- Source: the `.py` files of `{root}` (Python {platform.python_version()}, {sys.implementation.name}),
  without site-packages, test suites (`test/`, `tests/`, `idle_test/` folders) and files over
  {MAX_FILE_BYTES // 1000} KB, sorted by relative path.
- Split by file: held out for test when `int(sha1(relative path), 16) % 20 == 0`.
  Train: {len(train_files)} files, {len(train_ids):,} tokens ({n_bytes / 1e6:.1f} MB).
  Test: {len(test_files)} files, {len(test_ids):,} tokens (listed in `test_files.txt`).
- Files are joined with `{EOT}` between them.

## Tokenizer

Byte-level BPE (`tokenizers` {tokenizers.__version__}, ByteLevel pre-tokenizer and decoder, no
prefix space), trained on the train files only; vocabulary {tok.get_vocab_size()} including
`{EOT}` (id {eot_id}, also bos and eos). decode(encode(s)) == s for any string.
{n_bytes / len(train_ids):.2f} bytes per token on the train split.

## Model

`GPT2LMHeadModel`: vocab_size {config.vocab_size}, n_positions {config.n_positions},
n_embd {config.n_embd}, n_layer {config.n_layer}, n_head {config.n_head}, n_inner {4 * config.n_embd},
activation gelu_new, tied input/output embeddings, no dropout; {n_params:,} parameters, stored f32.

## Training

- torch {torch.__version__} (CPU, `torch.set_num_threads(1)`), transformers {transformers.__version__}, seed {args.seed}.
- {step} steps{" (stopped by the time budget)" if stop_reason == "time" else ""} of {args.batch} random
  {args.ctx}-token windows ({step * args.batch * args.ctx / 1e6:.1f}M tokens,
  {step * args.batch * args.ctx / len(train_ids):.1f} passes over the train tokens).
- AdamW, betas (0.9, 0.95), weight decay {args.weight_decay} on the matrices (none on biases and
  norms), gradient clipping 1.0; lr {args.lr:g}, linear warm-up over {args.warmup} steps, then cosine
  decay to {args.min_lr_frac * args.lr:g} at step {args.steps}.
- Wall time: {train_seconds / 60:.1f} min training, {wall / 60:.1f} min in all (tokenizer, evaluation).

## Results

| | cross-entropy (nats/token) | perplexity |
|---|---|---|
| train, last {args.log_every} steps (running mean) | {last_loss:.4f} | {math.exp(last_loss):.2f} |
| train, {len(train_w)} sampled windows | {train_eval_loss:.4f} | {math.exp(train_eval_loss):.2f} |
| held-out test, {len(test_w)} non-overlapping windows | {test_loss:.4f} | {math.exp(test_loss):.2f} |

Greedy continuations (transformers, 60 new tokens):

""" + "\n".join(f"```python\n{s}\n```\n" for s in samples.values()) + """
Per-step losses: `training_log.txt`.

## Files

""" + "\n".join(f"- `{k}`: {v:,} bytes" for k, v in sizes.items()) + f"""

## Rebuild

From the repository root, with the `bench` extra installed:

    {cmd}

The data is this interpreter's standard library, so another Python version gives another model.
"""
    (out / "TRAINING.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
