"""gptcpu.engine: config, weights (mmap), kernels, model, KV cache, sampling, generation,
BLAS backends and thread pools, evaluation, accounting (info) and the CLI."""
