"""Text in and out, through the `tokenizers` library and the model folder's tokenizer.json."""

from __future__ import annotations

from pathlib import Path

from .errors import GptcpuError


class Tokenizer:
    def __init__(self, tok):
        self._tok = tok

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(Path(folder) / "tokenizer.json")))
        except Exception as e:
            raise GptcpuError(f"cannot read {folder}/tokenizer.json: {e}") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a byte-level BPE token may be part of a character)."""
        piece = self._tok.id_to_token(int(token))
        if piece is None:
            return b""
        try:
            return bytes(_BYTE_OF[ch] for ch in piece)
        except KeyError:  # an added token, written as itself
            return piece.encode()


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: that character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF = _byte_level_alphabet()


class TextStream:
    """Turns a stream of token ids into a stream of text, never splitting a UTF-8 character and
    never showing text that might turn out to be the start of a stop string.

    `push(id)` returns the text that is now safe to show; `finish()` returns the rest. Text from
    the first stop string on is never shown.
    """

    def __init__(self, tokenizer: Tokenizer, stop=None):
        self.tokenizer = tokenizer
        self.stop = [stop] if isinstance(stop, str) else [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.text = ""       # decoded so far (complete characters only)
        self.done = 0        # tokens whose text is in self.text (byte-level BPE decodes piecewise)
        self.shown = 0       # characters of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        tail = self.tokenizer.decode(self.ids[self.done:])
        if tail.endswith("\ufffd"):
            return ""  # the last token ends inside a UTF-8 character: wait for the rest
        self.text += tail
        self.done = len(self.ids)
        return self._emit(final=False)

    def finish(self) -> str:
        self.text = self.tokenizer.decode(self.ids)
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self.text)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                end, self.stopped = min(end, at), True
        if not self.stopped and not final:
            # hold back a tail that is a prefix of some stop string
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if s.startswith(self.text[-n:]):
                        end = min(end, len(self.text) - n)
                        break
        out = self.text[self.shown:end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return out
