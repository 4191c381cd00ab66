"""gptcpu.bench."""
