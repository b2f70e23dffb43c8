"""Speed and memory figures for this machine, printed, never asserted.

    python bench.py                        # everything below, default config
    python bench.py --only=generate        # KV-cache vs full-recompute generation
    python bench.py --only=matmul          # measured matmul peak, fp32 and bf16
    python bench.py --only=train --config=configs/shakespeare_char_cpu.py --dtype=bfloat16 --compile=True

Every figure is a median over repeated runs after a warm-up, measured in this process.
"""
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from model import GPT, GPTConfig


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak_flops(dtype, n=1024, repeats=10):
    """FLOP/s of an n x n matmul in `dtype` on the CPU: the roofline MFU is measured against."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / median_seconds(lambda: a @ b, repeats, warmup=3)


def bench_matmul():
    for dtype in (torch.float32, torch.bfloat16):
        print(f"matmul peak {str(dtype):15s} {matmul_peak_flops(dtype) / 1e9:8.1f} GFLOP/s (1024x1024, median of 10)")


def generation_model():
    """The issue's reference shape: nanoGPT's shakespeare_char GPU model at random init."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
    return GPT(config).eval()


def generation_tokens_per_second(model, use_cache, new_tokens, autocast=nullcontext):
    prompt = torch.zeros((1, 1), dtype=torch.long)

    def run():
        with autocast():
            model.generate(prompt, new_tokens, temperature=1.0, use_cache=use_cache,
                           generator=torch.Generator().manual_seed(0))

    return new_tokens / median_seconds(run, repeats=3)


def bench_generate(new_tokens=500):
    model = generation_model()
    print(f"generation: 6L/6H/384, block 256, vocab 65, random init, 1 sequence, {new_tokens} new tokens")
    with_cache = generation_tokens_per_second(model, True, new_tokens)
    print(f"  KV cache          {with_cache:8.1f} tokens/s")
    without = generation_tokens_per_second(model, False, new_tokens)
    print(f"  full recompute    {without:8.1f} tokens/s")
    print(f"  speed-up          {with_cache / without:8.1f}x")


SECTIONS = {"matmul": bench_matmul, "generate": bench_generate}


def main(argv):
    only = None
    for arg in argv:
        if arg.startswith("--only="):
            only = arg.split("=", 1)[1]
        else:
            sys.exit(f"error: unknown argument {arg!r}; use --only={'|'.join(SECTIONS)}")
    if only is not None and only not in SECTIONS:
        sys.exit(f"error: --only={only!r} is not a section; use one of {', '.join(SECTIONS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, section in SECTIONS.items():
        if only in (None, name):
            section()


if __name__ == "__main__":
    main(sys.argv[1:])
