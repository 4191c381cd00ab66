"""The model folder's tokenizer: `tokenizer.json` copied, or built from `vocab.json` + `merges.txt`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from gptcpu.engine.errors import GptcpuError

EXTRA_FILES = ["tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja"]


def _special_tokens(folder: Path) -> list[str]:
    """The bos/eos/unk/pad strings the source declares (GPT-2: just <|endoftext|>)."""
    found = []
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            d = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = d.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str) and v not in found:
                found.append(v)
    return found or ["<|endoftext|>"]


def build_byte_level_bpe(folder: Path):
    """GPT-2's tokenizer (byte-level BPE) from the slow-tokenizer files, as `tokenizers` builds it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
    except Exception as e:
        raise GptcpuError(f"cannot build a tokenizer from {folder}/vocab.json + merges.txt: {e}") from None
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    try:  # GPT-J's extra tokens (<|extratoken_1|> ...), in id order
        added = json.loads((folder / "added_tokens.json").read_text())
        tok.add_tokens([AddedToken(t, normalized=False) for t, _ in sorted(added.items(), key=lambda kv: kv[1])])
    except (OSError, ValueError):
        pass
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _special_tokens(folder)])
    return tok


def write_tokenizer(src: Path, out: Path) -> str:
    """Write out/tokenizer.json (+ the source's special-token settings) -> how it was made."""
    if (src / "tokenizer.json").exists():
        shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
        how = "copied"
    elif (src / "vocab.json").exists() and (src / "merges.txt").exists():
        build_byte_level_bpe(src).save(str(out / "tokenizer.json"))
        how = "built from vocab.json + merges.txt"
    else:
        raise GptcpuError(f"{src} has no tokenizer: expected tokenizer.json or vocab.json + merges.txt")
    for name in EXTRA_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    return how
