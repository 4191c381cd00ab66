"""gptcpu.bench: measurements, each a script (`python -m gptcpu.bench.NAME --help`):
speed (gptcpu vs transformers), backends (dtypes, BLAS x threading x threads), convert_memory
(the converter's peak RSS), eval_demo (the demo model's perplexity), train_demo (builds it)."""
