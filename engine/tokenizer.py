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
        self.shown = 0       # characters of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # the last token ends inside a UTF-8 character: wait for the rest
        self.text = text
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
