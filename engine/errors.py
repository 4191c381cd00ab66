"""The one exception type gptcpu raises for bad input: the CLI prints it as one line, exit 2."""


class GptcpuError(Exception):
    """A user-facing error: the message alone must say what is wrong and, where it can, what to do."""
