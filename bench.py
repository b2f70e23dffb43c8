"""Speed and memory figures for this machine, printed, never asserted.

    python bench.py                        # everything below, default config
    python bench.py --only=generate        # KV-cache vs full-recompute generation
    python bench.py --only=matmul          # measured matmul peak, fp32 and bf16
    python bench.py --only=train --config=configs/shakespeare_char_cpu.py --dtype=bfloat16 --compile=True

Training figures come from train.py's own loop (its log.jsonl), so they are what a run gets.
Generation figures are medians over repeated runs after a warm-up. Nothing here is asserted.
"""
import json
import resource
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from model import GPT, GPTConfig
from train import ConfigError, load_config, measured_matmul_flops, train


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_matmul(options):
    for dtype in (torch.float32, torch.bfloat16):
        print(f"matmul peak {str(dtype):15s} {measured_matmul_flops(dtype) / 1e9:8.1f} GFLOP/s (1024x1024, best of 5)")


def bench_train(options):
    """ms/step, tokens/s and MFU of `steps` optimizer steps of a config, run by train.py itself."""
    steps = int(options.get("steps", 50))
    with tempfile.TemporaryDirectory() as out_dir:
        args = [options.get("config", "configs/shakespeare_char_cpu.py"), f"--out_dir={out_dir}",
                f"--max_iters={steps}", f"--log_interval={steps // 2}", "--eval_interval=1000000",
                "--eval_iters=1", "--final_eval_full=False", "--save_latest=False", "--always_save_checkpoint=False"]
        args += [f"--{key}={options[key]}" for key in ("dtype", "compile", "batch_size", "device") if key in options]
        cfg = load_config(args)
        print(f"training: {args[0]}, {steps} steps, dtype {cfg.dtype}, compile {cfg.compile}")
        train(cfg, args)
        records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]  # the second half: warm-up and compile left out
    mfu = f"{100 * last['mfu']:.2f}%" if last.get("mfu") is not None else "n/a"
    print(f"  {last['ms_per_step']:.1f} ms/step, {last['tokens_per_s']:,.0f} tokens/s, MFU {mfu} "
          f"(steps {steps // 2 + 1}-{steps})")
    if torch.cuda.is_available() and cfg.device != "cpu":
        print(f"  peak memory {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB allocated on the GPU")
    print(f"  peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB RSS of this process")


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


def bench_generate(options, new_tokens=500):
    dtype = getattr(torch, options.get("gen_dtype", "float32"))
    model = generation_model().to(dtype)
    print(f"generation: 6L/6H/384, block 256, vocab 65, random init, {dtype} weights, 1 sequence, "
          f"{new_tokens} new tokens")
    with_cache = generation_tokens_per_second(model, True, new_tokens)
    print(f"  KV cache          {with_cache:8.1f} tokens/s")
    without = generation_tokens_per_second(model, False, new_tokens)
    print(f"  full recompute    {without:8.1f} tokens/s")
    print(f"  speed-up          {with_cache / without:8.1f}x")


SECTIONS = {"train": bench_train, "matmul": bench_matmul, "generate": bench_generate}
OPTIONS = ("only", "config", "steps", "dtype", "compile", "batch_size", "device", "gen_dtype")


def parse_options(argv) -> dict:
    options = {}
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in OPTIONS or not value:
            raise ConfigError(f"cannot read {arg!r}; use --key=value with key in {', '.join(OPTIONS)}")
        options[key] = value
    if options.get("only", "train") not in SECTIONS:
        raise ConfigError(f"--only={options['only']}: use one of {', '.join(SECTIONS)}")
    return options


def main(argv):
    try:
        options = parse_options(argv)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        for name, section in SECTIONS.items():
            if options.get("only", name) == name:
                section(options)
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
