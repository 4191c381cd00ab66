"""Chat messages -> one prompt: the model's own chat template when it has one, else a plain one.

The model's template is the Jinja `chat_template` of its tokenizer_config.json (or a
chat_template.jinja file beside it), rendered as transformers renders it: a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, `messages`, `add_generation_prompt=True`,
`bos_token`, `eos_token` and `raise_exception`.

GPT-2 and GPT-J checkpoints have none, so the plain template is the documented fallback:

    <system or developer message>\\n\\n          (each one, if any)
    User: <user message>\\n
    Assistant: <assistant message>\\n
    ...
    Assistant:

and generation stops at "\\nUser:" (the model starting the next user turn), as if the request
had also asked for that stop string.
"""

from __future__ import annotations

import json
from pathlib import Path

from .protocol import ChatMessage, OpenAIError

PLAIN_STOP = "\nUser:"
ROLES = {"user": "User", "assistant": "Assistant", "tool": "Tool"}


def text_of(message: ChatMessage) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


class ChatTemplate:
    def __init__(self, folder: Path | None):
        self.source = None
        self.bos = self.eos = ""
        if folder is None:
            return
        config = {}
        if (folder / "tokenizer_config.json").exists():
            config = json.loads((folder / "tokenizer_config.json").read_text())
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self.source = env.from_string(template)
            self.bos = _token_text(config.get("bos_token"))
            self.eos = _token_text(config.get("eos_token"))

    @property
    def stop(self) -> list[str]:
        """Stop strings the template implies."""
        return [] if self.source else [PLAIN_STOP]

    def render(self, messages: list[ChatMessage]) -> str:
        if self.source is None:
            return plain(messages)
        from jinja2 import TemplateError

        try:
            return self.source.render(messages=[{"role": m.role, "content": text_of(m)} for m in messages],
                                      add_generation_prompt=True, bos_token=self.bos, eos_token=self.eos)
        except TemplateError as e:
            raise OpenAIError(400, f"the model's chat template rejected the messages: {e}", "messages") from None


def plain(messages: list[ChatMessage]) -> str:
    out = []
    for m in messages:
        if m.role in ("system", "developer"):
            out.append(text_of(m) + "\n\n")
        else:
            out.append(f"{ROLES[m.role]}: {text_of(m)}\n")
    return "".join(out) + "Assistant:"


def _raise(message):
    from jinja2 import TemplateError
    raise TemplateError(message)


def _token_text(token) -> str:
    if isinstance(token, dict):  # an AddedToken written out
        return token.get("content", "")
    return token or ""
