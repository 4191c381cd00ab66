"""gptcpu.engine."""
