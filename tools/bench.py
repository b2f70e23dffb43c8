"""Speed and memory figures for this machine, printed, never asserted. Without --only, every
section runs but prepare_rss, and recipe and sample only with --nanogpt.

    python -m tools.bench                     # everything below, default config
    python -m tools.bench --only=generate     # KV-cache vs full-recompute generation
    python -m tools.bench --only=matmul       # measured matmul peak, fp32 and bf16
    python -m tools.bench --only=train --config=configs/shakespeare_char_cpu.py --dtype=bfloat16 \
        --compile=True
    python -m tools.bench --nanogpt=../nanoGPT     # each figure beside nanoGPT's, in the same run
    # whole-process wall time of the CPU recipe, and of sample.py for 2000 tokens, in both repos:
    python -m tools.bench --only=recipe --nanogpt=../nanoGPT
    python -m tools.bench --only=sample --nanogpt=../nanoGPT
    python -m tools.bench --only=prepare      # prepare.py's tokens/s, 1 and 2 workers, vs tiktoken
    python -m tools.bench --only=prepare_rss  # prepare.py's peak memory on 0.5 and 2 GB (slow)
    python -m tools.bench --only=memory       # every shipped config's memory plan on 3 GPUs
    python -m tools.bench --only=memory_cpu   # the plan beside CPU training steps' peak

The prepare sections generate corpora (shuffled paragraphs of --corpus_from, as parquet and jsonl
files) in a temporary folder. Training figures come from train.py's own loop (its log.jsonl), so
they are what a run gets. Generation figures are medians over repeated runs after a warm-up.
Nothing here is asserted. --nanogpt=PATH (a nanoGPT checkout with data/shakespeare_char prepared)
adds nanoGPT's own generation on the same model shape and its CPU recipe's wall time, run in turn
with ours.
"""
import ast
import contextlib
import importlib.util
import io
import json
import multiprocessing
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from model import GPT, GPTConfig
from tinygpt.common import ConfigError, must, run_cli
from tinygpt.data import split_global_batch
from tinygpt.device import (
    DTYPES,
    Capabilities,
    Dist,
    autocast_context,
    measured_matmul_flops,
    model_dtype,
)
from tinygpt.optim import clip_and_step, make_optimizers
from tinygpt.parallel import fits, grad_scaler, memory_plan, parameter_total, size_text, spread

REPO = Path(__file__).resolve().parent.parent
CORPUS_FROM = "data/shakespeare_char/input.txt,data/tinytalks/train.txt"


@dataclass
class BenchConfig:
    only: str = ""               # train, matmul, generate, recipe, sample, prepare, prepare_rss,
                                 # memory or memory_cpu
    config: str = "configs/shakespeare_char_cpu.py"  # the training config the train section runs
    steps: int = 50              # training steps; the figures are the mean of the second half
    dtype: str = ""              # training dtype override ('' = the config's)
    compile: bool | None = None  # training torch.compile override (None = the config's)
    batch_size: int = 0          # training batch_size override (0 = the config's)
    device: str = ""             # training device override ('' = the config's)
    gen_dtype: str = "auto"      # the generation's weights: 'auto' (as sample.py), or a dtype
    nanogpt: str = ""            # a nanoGPT checkout: its figures are measured beside ours
    corpus_from: str = CORPUS_FROM  # text files whose paragraphs the prepare sections shuffle
    corpus_gb: str = "0.5,2"     # the corpus sizes prepare_rss measures

    def __post_init__(self):
        must(self.only in ("", *SECTIONS),
             f"only={self.only!r}: use one of {', '.join(SECTIONS)}")
        must(self.steps >= 2,
             f"steps={self.steps} must be at least 2 (the figures come from the second half)")
        must(self.gen_dtype in DTYPES,
             f"gen_dtype={self.gen_dtype!r}: use one of {', '.join(DTYPES)}")
        must(not self.nanogpt or (Path(self.nanogpt) / "model.py").is_file(),
             f"nanogpt={self.nanogpt!r}: no model.py there; give the folder of a nanoGPT checkout")
        must(self.only not in ("recipe", "sample") or self.nanogpt,
             f"only={self.only} compares with nanoGPT: give --nanogpt=PATH")


def median_seconds(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_matmul(cfg):
    for dtype in (torch.float32, torch.bfloat16):
        flops = measured_matmul_flops(dtype)
        print(f"matmul peak {str(dtype):15s} {flops / 1e9:8.1f} GFLOP/s "
              "(the best of 3 runs at 2 sizes)")


def bench_train(cfg):
    """ms/step, tokens/s and MFU of cfg.steps optimizer steps of a config, run by train.py
    itself."""
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = {"dtype": cfg.dtype, "compile": cfg.compile, "batch_size": cfg.batch_size,
                     "device": cfg.device}
        args = [cfg.config, f"--out_dir={out_dir}", f"--max_iters={cfg.steps}",
                f"--log_interval={cfg.steps // 2}", "--eval_interval=1000000", "--eval_iters=1",
                *[f"--{key}={value}" for key, value in overrides.items()
                  if value not in ("", 0, None)]]
        print(f"training: python train.py {' '.join(args[:1] + args[2:])}", flush=True)
        run = subprocess.run([sys.executable, str(REPO / "train.py"), *args], capture_output=True,
                             text=True)
        if run.returncode != 0:
            raise ConfigError(f"train.py failed: {last_line(run.stderr)}")
        log = (Path(out_dir) / "log.jsonl").read_text()
        records = [json.loads(line) for line in log.splitlines()]
    # The last log line covers the second half, which leaves out the warm-up and compiling.
    last = [r for r in records if r["kind"] == "train"][-1]
    mfu = f"{100 * last['mfu']:.2f}%" if last.get("mfu") is not None else "n/a"
    print(f"  {last['ms_per_step']:.1f} ms/step, {last['tokens_per_s']:,.0f} tokens/s, MFU {mfu} "
          f"(steps {cfg.steps // 2 + 1}-{cfg.steps})")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"  peak memory {peak_kib / 2**10:,.0f} MiB RSS of train.py")


def last_line(stderr) -> str:
    """The last line a failed process wrote to stderr: its error."""
    return (stderr.strip().splitlines() or ["?"])[-1]


def generation_model():
    """The reference shape: nanoGPT's shakespeare_char GPU model (6L/384, block 256), at random
    init."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384)
    return GPT(config).eval()


SAMPLE_PY_DEFAULTS = dict(temperature=0.8, top_p=0.95)  # what `python sample.py` samples with


def generation_tokens_per_second(model, new_tokens, batch=1, repeats=3, **options):
    """Generated tokens per second, over all `batch` sequences sampled together (generate's
    options), under inference_mode as sample.py runs."""
    prompt = torch.zeros((batch, 1), dtype=torch.long)

    @torch.inference_mode()
    def run():
        generator = torch.Generator().manual_seed(0)
        model.generate(prompt, new_tokens, generator=generator, **SAMPLE_PY_DEFAULTS, **options)

    return batch * new_tokens / median_seconds(run, repeats)


def bench_generate(cfg, new_tokens=500, rounds=3):
    model = generation_model()
    dtype = getattr(torch, model_dtype(cfg.gen_dtype, "cpu", asdict(model.config)))
    model = model.to(dtype)
    print(f"generation: 6L/6H/384, block 256, vocab 65, random init, {dtype} weights, "
          f"{new_tokens} new tokens, sample.py's default temperature and top_p")
    ways = {"full recompute": dict(use_cache=False), "KV cache": {}}
    ours = {}
    for name, options in ways.items():
        ours[name] = generation_tokens_per_second(model, new_tokens, **options)
        print(f"  {name:18s} 1 sequence {ours[name]:8.1f} tokens/s "
              f"({ours[name] / ours['full recompute']:.1f}x recompute)")
    # As sample.py --num_samples runs: one batch, one token of every sequence per step.
    for batch in (8, 32):
        rate = generation_tokens_per_second(model, new_tokens, batch)
        print(f"  {'KV cache':18s} {batch:2d} sequences {rate:8.1f} tokens/s in all")
    # A machine's memory speed can drift, so each round times both, one after the other.
    if cfg.nanogpt:
        theirs_once = nanogpt_generation(cfg.nanogpt, new_tokens)
        print("  nanoGPT's generate (its model.py, same shape, fp32 as its sample.py runs on a "
              f"CPU), then ours, one sequence, {rounds} rounds:")
        ratios = {"KV cache": []}
        for number in range(1, rounds + 1):
            theirs = new_tokens / median_seconds(theirs_once, repeats=1, warmup=0)
            row = f"  round {number}: nanoGPT {theirs:6.1f} tokens/s"
            for name in ratios:
                mine = generation_tokens_per_second(model, new_tokens, repeats=1, **ways[name])
                ratios[name].append(mine / theirs)
                row += f" | {name} {mine:6.1f} ({mine / theirs:.1f}x)"
            print(row, flush=True)
        for name, values in ratios.items():
            print(f"  ours, {name} ({dtype}): {statistics.median(values):.1f}x nanoGPT's "
                  f"(median of {rounds} rounds)")


def nanogpt_generation(path, new_tokens):
    """A function that runs nanoGPT's own GPT.generate once (new_tokens, one sequence) on the
    reference shape, imported from its checkout, warmed up."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", Path(path) / "model.py")
    theirs = importlib.util.module_from_spec(spec)
    # nanoGPT's GPT prints its parameter count when built, which is no figure of this benchmark.
    with contextlib.redirect_stdout(io.StringIO()):
        spec.loader.exec_module(theirs)
        torch.manual_seed(0)
        config = theirs.GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384,
                                  dropout=0.0, bias=False)
        model = theirs.GPT(config).eval()
    prompt = torch.zeros((1, 1), dtype=torch.long)

    @torch.no_grad()
    def once(tokens=new_tokens):
        model.generate(prompt, tokens, temperature=1.0)

    once(20)  # warm-up
    return once


def save_same_shaped_checkpoints(folder, meta):
    """folder/ours/ckpt.pt (this repo's format) and folder/nanogpt/ckpt.pt (nanoGPT's: its
    parameter names, its dataset name for meta.pkl) holding the same random weights of the
    reference shape."""
    model = generation_model()
    model_args = {"block_size": 256, "vocab_size": 65, "n_layer": 6, "n_head": 6, "n_embd": 384,
                  "bias": False}
    theirs = {nanogpt_name(k): v for k, v in model.state_dict().items()}
    ours = {"model": model.state_dict(), "model_args": asdict(model.config), "meta": meta,
            "config": {}, "step": 0}
    nanogpt = {"model": theirs, "model_args": {**model_args, "dropout": 0.0},
               "config": {"dataset": "shakespeare_char"}}
    for name, checkpoint in {"ours": ours, "nanogpt": nanogpt}.items():
        (Path(folder) / name).mkdir()
        torch.save(checkpoint, Path(folder) / name / "ckpt.pt")


def nanogpt_name(key) -> str:
    """nanoGPT's name of one of our parameters: under `transformer.`, with `h.` for `blocks.`."""
    if key.split(".")[0] in ("wte", "wpe", "blocks", "ln_f"):
        return "transformer." + key.replace("blocks.", "h.")
    return key


def bench_sample(cfg, new_tokens=2000):
    """Whole-process wall time of sample.py with its defaults and new_tokens, nanoGPT's then ours,
    on checkpoints of the same shape and weights (6L/384, one sample, fp32 for nanoGPT on a CPU,
    ours at dtype=auto)."""
    text = Path(cfg.nanogpt) / "data" / "shakespeare_char" / "input.txt"
    must(text.is_file(), f"{text} not found: prepare nanoGPT's shakespeare_char data first")
    vocab = sorted(set(text.read_text(encoding="utf-8")))  # what its prepare.py puts in meta.pkl
    print(f"sample.py, whole process, {new_tokens} new tokens, one sample, same-shaped "
          "checkpoints (6L/384): nanoGPT's, then ours")
    with tempfile.TemporaryDirectory() as folder:
        meta = {"tokenizer": "char", "vocab": vocab, "vocab_size": len(vocab)}
        save_same_shaped_checkpoints(folder, meta)
        theirs = wall_seconds([sys.executable, "sample.py", f"--out_dir={folder}/nanogpt",
                               "--device=cpu", "--num_samples=1",
                               f"--max_new_tokens={new_tokens}"], cfg.nanogpt)
        ours = wall_seconds([sys.executable, "sample.py", f"--out_dir={folder}/ours",
                             f"--max_new_tokens={new_tokens}"], REPO)
    print("  nanoGPT: python sample.py --device=cpu --num_samples=1 "
          f"--max_new_tokens={new_tokens}  {theirs:6.1f} s")
    print(f"  ours:    python sample.py --max_new_tokens={new_tokens}  {ours:6.1f} s: "
          f"{theirs / ours:.1f}x nanoGPT's speed")


NANOGPT_CPU_RECIPE = ["train.py", "config/train_shakespeare_char.py", "--device=cpu",
                      "--compile=False", "--eval_iters=20", "--log_interval=1", "--block_size=64",
                      "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                      "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]


def wall_seconds(command, cwd):
    start = time.perf_counter()
    run = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if run.returncode != 0:
        raise ConfigError(f"{' '.join(command[1:3])} failed: {last_line(run.stderr)}")
    return time.perf_counter() - start


def bench_recipe(cfg, seeds=(1337, 1, 2)):
    """Whole-process wall time of nanoGPT's CPU recipe (its README's command), then ours, then the
    speedrun with three seeds (its goal is their median)."""
    print("CPU recipe, whole process (data prepared): nanoGPT's README command, then ours")
    with tempfile.TemporaryDirectory() as out_dir:
        theirs = wall_seconds([sys.executable, *NANOGPT_CPU_RECIPE, f"--out_dir={out_dir}/nanogpt"],
                              cfg.nanogpt)
        print(f"  nanoGPT                              {theirs:6.1f} s")
        runs = [("configs/shakespeare_char_cpu.py", [])]
        runs += [("configs/speedrun_cpu.py", [f"--seed={s}"]) for s in seeds]
        speedrun = []
        for config, options in runs:  # one out_dir each, so that no run resumes another
            name = Path(config).stem + "".join(options)
            command = [sys.executable, "train.py", config, *options, f"--out_dir={out_dir}/{name}"]
            ours = wall_seconds(command, REPO)
            speedrun += [ours] if options else []
            print(f"  python train.py {config} {' '.join(options):12s} {ours:6.1f} s: "
                  f"{ours / theirs:.3f} of nanoGPT's time")
    median = statistics.median(speedrun)
    print(f"  speedrun, median of {len(seeds)} seeds: {median:.1f} s, "
          f"{median / theirs:.3f} of nanoGPT's time")


# ---------------------------------------------------------------------------------- prepare.py

def paragraphs(cfg) -> list:
    files = [Path(f) for f in cfg.corpus_from.split(",")]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"corpus_from: {', '.join(missing)} not found; prepare shakespeare_char "
                          "and tinytalks, or give --corpus_from=FILE,... (text files with blank "
                          "lines between paragraphs)")
    return [p for f in files for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def write_corpus(folder, paragraphs, total_bytes, seed=0, file_bytes=64 << 20) -> list:
    """Documents of 1 to 8 random paragraphs, ~total_bytes of text, in files of ~file_bytes
    alternately .parquet (row groups of 4096 documents) and .jsonl; the documents of the first file
    are returned."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng, written, number, first = random.Random(seed), 0, 0, None
    while written < total_bytes:
        docs, size = [], 0
        while size < min(file_bytes, total_bytes - written):
            docs.append("\n\n".join(rng.choices(paragraphs, k=rng.randint(1, 8))))
            size += len(docs[-1])
        path = Path(folder) / f"{number:03d}"
        if number % 2 == 0:
            pq.write_table(pa.table({"text": docs}), f"{path}.parquet", row_group_size=4096)
        else:
            lines = "".join(json.dumps({"text": d}) + "\n" for d in docs)
            Path(f"{path}.jsonl").write_text(lines)
        first, written, number = first or docs, written + size, number + 1
    return first


def tree_rss(pid) -> int:
    """Bytes of resident memory of a process and all its descendants, from /proc (Linux)."""
    parent, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            lines = stat.read_text().splitlines()
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
            pid_of = int(stat.parent.name)
            parent[pid_of] = int(fields["PPid"])
            rss[pid_of] = int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    family = {pid}
    for _ in range(4):  # enough generations for prepare.py, its pool and their workers
        family |= {p for p, pp in parent.items() if pp in family}
    return sum(rss.get(p, 0) for p in family)


def cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def run_prepare(source, data_dir, workers, shard_tokens, sample_rss=False) -> tuple:
    """(wall seconds, peak RSS of prepare.py and its workers together, meta.json, their CPU
    seconds) of one whole prepare.py process."""
    cpu = cpu_seconds(resource.RUSAGE_CHILDREN)
    command = [sys.executable, str(REPO / "prepare.py"), "bench", f"--source={source}",
               f"--data_dir={data_dir}", f"--workers={workers}", f"--shard_tokens={shard_tokens}"]
    start, peak = time.perf_counter(), 0
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid)) if sample_rss else 0
        time.sleep(0.2 if sample_rss else 0.01)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise ConfigError(f"prepare.py failed: {last_line(process.stderr.read())}")
    meta = json.loads((Path(data_dir) / "bench" / "meta.json").read_text())
    return seconds, peak, meta, cpu_seconds(resource.RUSAGE_CHILDREN) - cpu


def bench_prepare(cfg, text_mb=128):
    """Tokens/s of prepare.py, whole process, with 1 and 2 workers, against tiktoken's
    encode_ordinary_batch in one thread on the same documents (held in memory: no reading, no
    writing). The corpus is large enough that the processes' start (their imports) is a small part
    of the time."""
    import tiktoken
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "corpus"
        folder.mkdir()
        docs = write_corpus(folder, paragraphs(cfg), text_mb << 20, file_bytes=text_mb << 20)
        print(f"prepare.py on a {text_mb} MB corpus ({len(docs):,} documents in one parquet "
              "file), whole process:")
        encoding = tiktoken.get_encoding("gpt2")
        start, cpu = time.perf_counter(), cpu_seconds(resource.RUSAGE_SELF)
        encoded = encoding.encode_ordinary_batch(docs, num_threads=1)
        tokens = sum(map(len, encoded)) + len(docs)  # and an end-of-text token per document
        seconds, cpu = time.perf_counter() - start, cpu_seconds(resource.RUSAGE_SELF) - cpu
        baseline = tokens / seconds
        print("  tiktoken encode_ordinary_batch, num_threads=1, in memory: "
              f"{baseline:12,.0f} tokens/s ({seconds:.1f} s, {cpu:.1f} CPU s)")
        for workers in (1, 2):
            seconds, _, meta, cpu = run_prepare(folder, Path(tmp) / f"data{workers}", workers,
                                                1_000_000)
            rate = (meta["train_tokens"] + meta["val_tokens"]) / seconds
            print(f"  python prepare.py --workers={workers}:            {rate:12,.0f} tokens/s "
                  f"({rate / baseline:.2f}x tiktoken's, {seconds:.1f} s, {cpu:.1f} CPU s)",
                  flush=True)


def bench_prepare_rss(cfg):
    """Peak resident memory of prepare.py (2 workers, default shard size) and its workers, sampled
    every 0.2 s, on generated corpora of each size in corpus_gb: flat memory means about the same
    figure for each."""
    print("prepare.py --workers=2, peak RSS of the process and its workers together (sampled "
          "every 0.2 s):")
    for gb in (float(x) for x in cfg.corpus_gb.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "corpus").mkdir()
            write_corpus(Path(tmp) / "corpus", paragraphs(cfg), int(gb * 2**30))
            seconds, peak, meta, _ = run_prepare(Path(tmp) / "corpus", Path(tmp) / "data", 2,
                                                 100_000_000, sample_rss=True)
            tokens = meta["train_tokens"] + meta["val_tokens"]
            shards = len(meta["shards"]["train"]) + 1
            print(f"  {gb:g} GB of text, {tokens:,} tokens in {shards} shards: peak "
                  f"{peak / 2**20:,.0f} MiB RSS, {seconds:.0f} s "
                  f"({tokens / seconds:,.0f} tokens/s)", flush=True)


# ------------------------------------------------------------------------------------ memory

# The vocabulary of each data set a shipped config trains on (what prepare.py writes to meta.json),
# and the shape of the weights a config fine-tunes (the model takes the weights' shape).
VOCAB_SIZES = {"mychat_gpt2": 50304, "shakespeare_char": 65, "shakespeare": 50257,
               "fineweb_edu": 50257, "reverse": 29, "copy": 29, "mixed": 29, "tinytalks": 68,
               "tinytalks_chat": 260,
               "shakespeare_byte": 256}
GPT2_XL = {"n_layer": 48, "n_head": 25, "n_embd": 1600, "block_size": 1024, "bias": True,
           "mlp": "gelu_tanh", "pos": "learned", "tie_weights": True}
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024, "bias": True,
              "mlp": "gelu_tanh", "pos": "learned", "tie_weights": True}
TRAIN_DEFAULTS = {"gradient_accumulation_steps": 1, "batch_size": 64, "muon_lr": 0.0,
                  "dtype": "auto"}
# Free memory when a run starts (the card's memory less about 0.4 GB of CUDA context), and what the
# card offers to dtype=auto.
CARDS = [("T4 16 GB", 15.6e9, Capabilities(bf16=False, fp16=True, compile=True, fused_adamw=True)),
         ("24 GB (L4, A10, 4090)", 23.4e9, Capabilities(True, True, True, True)),
         ("H100 80 GB", 85.0e9, Capabilities(True, True, True, True))]


def config_values(path) -> dict:
    """The `name = value` lines of a config file over train.py's defaults (a tool cannot import a
    script: tests/test_memory.py checks these against train.py's reading)."""
    values = dict(TRAIN_DEFAULTS)
    for node in ast.parse(Path(path).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


def config_model_args(path) -> dict:
    """GPTConfig's fields of the model a config trains: a fine-tune's from the weights it starts
    from (GPT-2 XL, or another shipped config's run, at this config's block_size)."""
    values = config_values(path)
    if values.get("init_from") in ("gpt2", "gpt2-xl"):
        shape = GPT2_XL if values["init_from"] == "gpt2-xl" else GPT2_SMALL
        # the weights' shape, their 1024 positions cropped to the config's block_size (train.py)
        block = min(values.get("block_size", GPTConfig.block_size), 1024)
        values = {**values, **shape, "block_size": block}
    elif str(values.get("init_from", "")).startswith("out-"):
        [source] = [c for c in Path(path).parent.glob("*.py")
                    if config_values(c).get("out_dir") == values["init_from"]]
        values = {**config_values(source), "block_size": values["block_size"],
                  "dataset": values["dataset"]}
    defaults = asdict(GPTConfig())
    return {**defaults, **{k: v for k, v in values.items() if k in defaults},
            "vocab_size": VOCAB_SIZES[values["dataset"]]}


def bench_memory(cfg):
    """The memory plan (tinygpt/memory.py) per GPU of every shipped config as written, on one GPU
    and on 8 with DDP or FSDP, against each card's free memory: the table in docs/gpu.md."""
    print("| config | parameters | GPUs | sequences a micro-step per GPU | "
          + " | ".join(name for name, _, _ in CARDS) + " |")
    print("|---|---|---|---|" + "---|" * len(CARDS))
    for path in sorted((REPO / "configs").glob("*.py")):
        values, model_args = config_values(path), config_model_args(path)
        for world, fsdp in ((1, False), (8, False), (8, True)):
            mode = f"{world}{' FSDP' if fsdp else ' DDP' if world > 1 else ''}"
            try:
                micro_steps, rows = split_global_batch(values["gradient_accumulation_steps"],
                                                       values["batch_size"], world)
            except ConfigError:
                print(f"| {path.name} | | {mode} | its global batch does not split over {world} |"
                      + " |" * len(CARDS))
                continue
            cells = []
            for _, free, can in CARDS:
                dtype = model_dtype(values["dtype"], "cuda", model_args, can)
                plan = memory_plan(model_args, dtype, rows, micro_steps, values["muon_lr"] > 0,
                                   world, fsdp)
                cells.append(f"{size_text(plan.total)} {'fits' if fits(plan, free) else '**no**'}")
            print(f"| {path.name} | {parameter_total(model_args) / 1e6:.1f}M | {mode} | {rows} x "
                  f"{model_args['block_size']} | " + " | ".join(cells) + " |")


# What bench_memory_cpu measures: activations, GPT-2's logits, recomputed blocks, Muon and rope
SMALL = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=65)
CPU_SHAPES = [(SMALL, 16, {}),
              (dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304), 8, {}),
              (SMALL, 16, {"checkpoint_activations": True}),
              ({**SMALL, "pos": "rope", "mlp": "relu2", "qk_norm": True}, 16, {"muon": True})]


def resident_bytes(field) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise ConfigError(f"/proc/self/status has no {field}: the CPU memory figures need Linux")


def train_steps(model_args, dtype, rows, checkpoint_activations, muon, steps=2):
    """steps training steps of a new GPT with model_args on rows random sequences, as train.py
    takes them: its optimizers, autocast, clipping and step."""
    shape = (rows, model_args["block_size"])
    x, y = (torch.randint(0, model_args["vocab_size"], shape) for _ in range(2))
    model = spread(GPT(GPTConfig(**model_args)), Dist(),
                        checkpoint_activations=checkpoint_activations)
    optimizers = make_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu", muon_lr=0.02 * muon)
    scaler = grad_scaler("cpu", dtype)
    for _ in range(steps):
        with autocast_context("cpu", dtype):
            loss = model(x, y)[1]
        loss.backward()
        clip_and_step(optimizers, scaler, model.parameters(), 1.0)


def peak_of_two_steps(model_args, dtype, rows, checkpoint_activations, muon) -> int:
    """In a fresh process: how far its peak resident memory rises over two training steps of a GPT
    with model_args, from building it on. A tiny model trains first, so that what torch sets up
    once (thread pools, kernels' caches: tens of MB, whatever the model) is not counted."""
    torch.set_num_threads(1)
    model_args = {**asdict(GPTConfig()), **model_args}
    tiny = {**model_args, "n_layer": 1, "n_embd": 2 * model_args["n_head"], "block_size": 8,
            "vocab_size": 16}
    train_steps(tiny, dtype, 2, checkpoint_activations, muon)
    start = resident_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from here
    train_steps(model_args, dtype, rows, checkpoint_activations, muon)
    return resident_bytes("VmHWM") - start


def measured_peak(model_args, dtype, rows, checkpoint_activations=False, muon=False) -> int:
    """peak_of_two_steps in a fresh process whose malloc maps every block of 64 kB or more and
    unmaps it when freed, so that its resident memory follows the tensors alive (glibc's default
    keeps freed blocks for reuse)."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the new process's malloc
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            work = (model_args, dtype, rows, checkpoint_activations, muon)
            return pool.apply(peak_of_two_steps, work)
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def bench_memory_cpu(cfg):
    """The memory plan beside the rise of a fresh process's peak memory over two training steps."""
    dtype = cfg.dtype or "float32"
    print(f"memory plan vs the measured peak of two CPU training steps ({dtype}):")
    for model_args, rows, options in CPU_SHAPES:
        plan = memory_plan({**asdict(GPTConfig()), **model_args}, dtype, rows, **options)
        peak = measured_peak(model_args, dtype, rows, **options)
        print(f"  {model_args} {rows} x {model_args['block_size']} {options or ''}: plan "
              f"{size_text(plan.total)} (activations {size_text(plan.activations)}), measured "
              f"{size_text(peak)}: {plan.total / peak:.2f}x", flush=True)


SECTIONS = {"train": bench_train, "matmul": bench_matmul, "generate": bench_generate,
            "recipe": bench_recipe, "sample": bench_sample, "prepare": bench_prepare,
            "prepare_rss": bench_prepare_rss, "memory": bench_memory,
            "memory_cpu": bench_memory_cpu}


def runs_by_default(name, cfg) -> bool:
    """Every section but prepare_rss (slow), and the nanoGPT comparisons only with --nanogpt."""
    return name != "prepare_rss" and (name not in ("recipe", "sample") or bool(cfg.nanogpt))


def bench(cfg):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, section in SECTIONS.items():
        if cfg.only == name or (not cfg.only and runs_by_default(name, cfg)):
            section(cfg)


def main(argv) -> int:
    usage = "usage: python -m tools.bench [--key=value ...]"
    return run_cli(BenchConfig, argv, usage, __doc__.split("\n\n")[0], bench)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
