"""Train a GPT from a config file, on one device or many.

    python train.py configs/shakespeare_char.py                      # one GPU (or whatever device='auto' finds)
    python train.py configs/shakespeare_char_cpu.py --max_iters=500  # a config file, then overrides
    torchrun --standalone --nproc_per_node=4 train.py configs/shakespeare_char.py
    python train.py configs/shakespeare_char.py --init_from=resume   # continue out_dir/ckpt.pt exactly

Reads top to bottom: errors -> TrainConfig and its parser -> device and precision -> checkpoints ->
batches -> evaluation and the attention-task score -> distributed set-up -> the Trainer loop -> main.
"""
import ast
import difflib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig
from prepare import DATASETS, DataError, load_meta, qa_pairs, qa_prompt, tokenizer_from_meta
from prepare import prepare as prepare_dataset


class ConfigError(Exception):
    """A config file or --key=value override is wrong; the message says which and how to fix it."""


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable or does not fit the requested model."""


class NonFiniteLossError(Exception):
    """Training produced a nan/inf loss; the run stops before it can save bad weights."""


# -------------------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    log_interval: int = 10
    eval_iters: int = 200
    eval_only: bool = False             # evaluate (the checkpoint, with init_from='resume') and exit
    always_save_checkpoint: bool = True  # write ckpt.pt at every eval, not only when val improves
    save_latest: bool = True            # write ckpt.pt at the end of the run even if val did not improve
    init_from: str = "scratch"          # 'scratch' or 'resume' (out_dir/ckpt.pt)
    final_eval_full: bool = True        # at the end, loss over the whole val split, not a sample
    # logging
    wandb_log: bool = False
    wandb_project: str = "gpt"
    wandb_run_name: str = "run"
    # data
    dataset: str = "shakespeare_char"
    data_dir: str = "data"
    data_source: str = ""               # local copy/URL given to prepare.py when the data is missing
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, over all processes
    batch_size: int = 64                # sequences per micro-step per process
    block_size: int = 256
    # model (GPTConfig; vocab_size comes from the data set)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    pos: str = "learned"
    tie_weights: bool = True
    attention: bool = True              # False is the ablation: tokens cannot see each other
    mlp: str = "gelu"
    qk_norm: bool = False
    zero_init_proj: bool = False
    # AdamW
    learning_rate: float = 1e-3
    max_iters: int = 5000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # 0 = no clipping
    muon_lr: float = 0.0                # > 0: Muon (torch >= 2.9) for the 2-D weights in the blocks, at this peak lr
    muon_momentum: float = 0.95
    # learning-rate schedule: linear warmup, then decay to min_lr at lr_decay_iters
    decay_lr: bool = True
    lr_schedule: str = "cosine"         # 'cosine' or 'linear' decay after the warmup
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    min_lr: float = 1e-4
    # system
    device: str = "auto"                # 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'
    dtype: str = "auto"                 # 'auto', 'float32', 'bfloat16', 'float16'
    compile: bool = False
    threads: int = 0                    # CPU threads for torch; 0 = torch's default (one per core)
    seed: int = 1337
    val_loss_bar: float = 0.0           # a published result to reach: the final full-split val loss is judged PASS/FAIL against it (0 = none)
    peak_flops: float = 0.0             # FLOP/s that MFU is measured against; 0 = measured (CPU) or known (GPU)


MODEL_FIELDS = [f.name for f in fields(GPTConfig) if f.name != "vocab_size"]


TYPE_NAMES = {int: "an int", float: "a float", bool: "True or False", str: "a string"}


def field_defaults(cfg) -> dict:
    return {f.name: f.default for f in fields(cfg)}


def unknown_key_message(name, known, where) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
    return f"{where}unknown config key '{name}'{hint}"


def checked_value(cfg, name, value, where):
    """value converted to the type of the field's default, or a ConfigError naming both."""
    defaults = field_defaults(cfg)
    if name not in defaults:
        raise ConfigError(unknown_key_message(name, list(defaults), where))
    expected = type(defaults[name])
    if expected is float and type(value) is int:
        value = float(value)
    if type(value) is not expected:  # `type is`, so True is not accepted as an int
        raise ConfigError(f"{where}{name} takes {TYPE_NAMES.get(expected, expected.__name__)}, "
                          f"got {value!r} ({type(value).__name__}); the default is {defaults[name]!r}")
    return value


def override_value(cfg, name, text):
    """The value of --name=text: a Python literal, or for string fields the bare text."""
    expected = type(field_defaults(cfg).get(name, ""))
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word; fine for strings, and reported below for other types
    if expected is str and not isinstance(value, str):
        value = text  # --wandb_run_name=123 means the string '123'
    return value


def parse_overrides(cfg, args):
    """cfg (any dataclass) with each `--key=value` in args applied, type-checked."""
    for arg in args:
        if arg.startswith("--") and "=" not in arg and type(field_defaults(cfg).get(arg[2:])) is bool:
            arg += "=True"  # a bare --flag switches a boolean on
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"cannot read argument {arg!r}; use --key=value (e.g. --max_iters=100)")
        name, text = arg[2:].split("=", 1)
        value = checked_value(cfg, name, override_value(cfg, name, text), f"--{name}={text}: ")
        cfg = replace(cfg, **{name: value})
    return cfg


def config_assignment(node, path):
    """(name, value) of one `name = literal` line of a config file."""
    where = f"{path} line {node.lineno}: "
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
        raise ConfigError(f"{where}only `name = value` assignments are allowed, got `{ast.unparse(node)}`")
    try:
        return node.targets[0].id, ast.literal_eval(node.value)
    except ValueError:
        raise ConfigError(f"{where}{node.targets[0].id} must be a plain value (number, string, True/False), "
                          f"got `{ast.unparse(node.value)}`") from None


def apply_config_file(cfg, path):
    """cfg with the assignments of a config file applied. The file is parsed, never executed."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise ConfigError(f"{path} line {e.lineno}: not valid Python ({e.msg})") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # a docstring
        name, value = config_assignment(node, path)
        cfg = replace(cfg, **{name: checked_value(cfg, name, value, f"{path} line {node.lineno}: ")})
    return cfg


def load_config(argv) -> TrainConfig:
    """TrainConfig from `[CONFIG_FILE ...] [--key=value ...]`, applied left to right, then checked."""
    cfg = TrainConfig()
    for arg in argv:
        cfg = parse_overrides(cfg, [arg]) if arg.startswith("--") else apply_config_file(cfg, arg)
    check_config(cfg)
    return cfg


def check_config(cfg):
    choices = {"init_from": ("scratch", "resume"), "dtype": ("auto", "float32", "bfloat16", "float16"),
               "lr_schedule": ("cosine", "linear")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: use one of {', '.join(allowed)}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"device={cfg.device!r}: use auto, cpu, cuda, cuda:N or mps")
    positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                "block_size", "n_layer", "n_head", "n_embd")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be at least 1")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate={cfg.learning_rate} must be positive (the schedule scales from it)")
    if cfg.muon_lr > 0 and not hasattr(torch.optim, "Muon"):
        raise ConfigError(f"muon_lr={cfg.muon_lr} needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
    for name in ("max_iters", "warmup_iters", "seed", "grad_clip", "peak_flops", "muon_lr", "threads"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name}={getattr(cfg, name)} must not be negative")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ConfigError(f"dropout={cfg.dropout} must be in [0, 1)")
    try:
        GPTConfig(**model_args_of(cfg, vocab_size=1))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_args_of(cfg, vocab_size) -> dict:
    return {**{name: getattr(cfg, name) for name in MODEL_FIELDS}, "vocab_size": vocab_size}


def format_config(cfg) -> str:
    """The config as a config file: what is printed at start can be saved and run again."""
    return "\n".join(f"{name} = {value!r}" for name, value in asdict(cfg).items())


# --------------------------------------------------------------------------- device, precision

def resolve_device(name="auto") -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). mkldnn's own check also says
    yes on plain AVX-512, where bf16 is emulated and slower than float32, so read the CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name, device) -> str:
    """'float32', 'bfloat16' or 'float16' for dtype=name ('auto' picks the fastest safe one)."""
    if name != "auto":
        return name
    kind = device.split(":")[0]
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if kind == "cpu" and cpu_has_fast_bf16():
        return "bfloat16"
    return "float32"


def autocast_context(device, dtype):
    """Mixed precision for forward passes: autocast to dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=getattr(torch, dtype))


def enable_tf32():
    # TF32 matmuls keep float32's range with a 10-bit mantissa: much faster, fine for training
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# Dense tensor-core peaks from the vendors' datasheets: (bf16/fp16, tf32) FLOP/s.
GPU_PEAK_FLOPS = {"H100": (989e12, 494e12), "A100": (312e12, 156e12), "L4": (121e12, 60e12),
                  "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12)}


def measured_matmul_flops(dtype) -> float:
    """FLOP/s of a square matmul in dtype on this CPU, best of a few: the CPU's practical peak."""
    n = 256 if dtype == torch.float16 else 1024  # CPU float16 matmuls are emulated and very slow
    gen = torch.Generator().manual_seed(0)  # its own generator: the global one drives dropout
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def default_peak_flops(device, dtype) -> float:
    """Peak FLOP/s of one device for MFU: measured on CPU, looked up on known GPUs, else 0 (unknown)."""
    kind = device.split(":")[0]
    if kind == "cpu":
        return measured_matmul_flops(getattr(torch, dtype))
    if kind == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAK_FLOPS.items():
            if key in name:
                return tf32 if dtype == "float32" else half
    return 0.0


# --------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, checkpoint):
    """Write checkpoint to path atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # same folder, so os.replace is a rename
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def keep_as(path, keep_path):
    """Make keep_path a second name for the file at path (a hard link: no copy, and path never
    disappears), so replacing path later leaves keep_path with the old content."""
    tmp = keep_path.with_name(f".{keep_path.name}.tmp{os.getpid()}")
    try:
        os.link(path, tmp)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, tmp)
    os.replace(tmp, keep_path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The checkpoint dict at path, loaded with weights_only=True (no code runs on load)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zips, foreign pickles, random bytes: all end here
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason}); "
                              "it may be truncated or not from train.py") from None
    missing = [k for k in ("model", "model_args", "config", "step") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return checkpoint


def clean_state_dict(state_dict) -> dict:
    """state_dict without the `_orig_mod.` (torch.compile) and `module.` (DDP) key prefixes."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def model_from_checkpoint(checkpoint, device="cpu") -> GPT:
    """The checkpoint's GPT on device, in eval mode."""
    try:
        model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args "
                              f"({str(e).strip().splitlines()[0][:160]})") from None
    return model.to(device).eval()


def check_resumable(checkpoint, model_args, meta, path, data_folder):
    """Raise CheckpointError unless the checkpoint has the requested model shape and vocabulary."""
    saved = checkpoint["model_args"]
    differ = [f"{k} {saved.get(k)!r} in the checkpoint vs {v!r} requested"
              for k, v in model_args.items() if k != "dropout" and saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{path} does not match this config: {'; '.join(differ)}. "
                              "Use the checkpoint's model settings, or another out_dir to start afresh")
    saved_vocab = (checkpoint.get("meta") or {}).get("vocab")
    if saved_vocab is not None and meta.get("vocab") is not None and saved_vocab != meta["vocab"]:
        raise CheckpointError(f"{path} was trained on another vocabulary than {data_folder}; "
                              "resume with the data it was trained on")
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} has no optimizer state, so training cannot resume exactly from it")


def rng_states() -> dict:
    """Every random state a run draws from: torch (dropout), CUDA, numpy and Python's random."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            # weights_only loading accepts tensors, not numpy arrays
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
            "python": random.getstate()}


def restore_rng_states(states):
    torch.set_rng_state(states["torch"].cpu())
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])


# ------------------------------------------------------------------------------------- batches

TRAIN_STREAM, EVAL_STREAM = 0, 1


def batch_rng(seed, stream, step, part=0):
    """The random generator of one step's batches. Derived from (seed, stream, step) alone, so a
    resumed run draws the same batches as an uninterrupted one, and extra or missing evaluations
    (their own stream) never shift the training batches."""
    return np.random.default_rng((seed, stream, step, part))


class Batches:
    """Batches of token ids from data/<name>/{train,val}.bin.

    Text: random windows of block_size tokens, targets shifted by one. Task data sets (meta has
    "task"): whole random examples of example_len tokens, x = ex[:-1], y = ex[1:], with the targets
    of the prompt set to -1 so the loss falls on the answer only.
    """

    def __init__(self, folder, meta, block_size, device):
        self.folder, self.meta, self.device = Path(folder), meta, device
        self.task = meta.get("task")
        self.example_len = meta.get("example_len", 0)
        self.prompt_len = meta.get("prompt_len", 0)
        self.seq_len = self.example_len - 1 if self.task else block_size
        for split in ("train", "val"):
            self.check_size(split)

    def tokens(self, split):
        # a fresh memmap per batch: a long-lived one keeps every page it touched in memory
        return np.memmap(self.folder / f"{split}.bin", dtype=np.dtype(self.meta["dtype"]).newbyteorder("<"), mode="r")

    def count(self, split) -> int:
        """How many different batch rows the split offers: windows or examples."""
        n = len(self.tokens(split))
        return n // self.example_len if self.task else n - self.seq_len

    def check_size(self, split):
        path, n = self.folder / f"{split}.bin", len(self.tokens(split))
        if self.task and n % self.example_len:
            raise DataError(f"{path} holds {n} tokens, not whole {self.example_len}-token examples; prepare it again")
        if self.count(split) < 1:
            raise DataError(f"{path} has {n} tokens, too few for block_size={self.seq_len}; lower block_size")

    def rows(self, split, picks) -> np.ndarray:
        """(len(picks), seq_len + 1) token ids: the windows starting at picks, or the examples picks."""
        data = self.tokens(split)
        if self.task:
            data = data.reshape(-1, self.example_len)
            return data[picks].astype(np.int64)
        return data[picks[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)

    def batch(self, split, picks):
        """(x, y) on the device for the given window offsets / example indices."""
        rows = torch.from_numpy(self.rows(split, np.asarray(picks)))
        x, y = rows[:, :-1], rows[:, 1:].clone()
        if self.task:
            y[:, :self.prompt_len - 1] = -1  # no loss on predicting the prompt
        if self.device.startswith("cuda"):
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def random_picks(self, split, rng, shape):
        return rng.integers(0, self.count(split), size=shape)

    def examples(self, split) -> np.ndarray:
        """All examples of a task split, (n, example_len)."""
        return np.array(self.tokens(split)).reshape(-1, self.example_len).astype(np.int64)


def micro_batch_picks(batches, cfg, step, rank, world_size):
    """This process's picks for each of its micro-steps of optimizer step `step`.

    Every process draws the same global (gradient_accumulation_steps, batch_size) picks and takes
    its own consecutive slice, so any number of processes sees exactly the batches of one process.
    """
    picks = batches.random_picks("train", batch_rng(cfg.seed, TRAIN_STREAM, step),
                                 (cfg.gradient_accumulation_steps, cfg.batch_size))
    per_rank = cfg.gradient_accumulation_steps // world_size
    return picks[rank * per_rank:(rank + 1) * per_rank]


def learning_rate_at(step, cfg) -> float:
    """Linear warmup over warmup_iters, then cosine (or linear) decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


# ---------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def estimate_loss(model, batches, cfg, step, ctx) -> dict:
    """Mean loss over eval_iters random batches of each split, from the eval stream of `step`."""
    model.eval()
    losses = {}
    for part, split in enumerate(("train", "val")):
        picks = batches.random_picks(split, batch_rng(cfg.seed, EVAL_STREAM, step, part),
                                     (cfg.eval_iters, cfg.batch_size))
        total = torch.zeros((), device=batches.device)
        for row in picks:
            x, y = batches.batch(split, row)
            with ctx:
                total += model(x, y)[1].detach()
        losses[split] = (total / cfg.eval_iters).item()
    model.train()
    return losses


@torch.no_grad()
def full_split_loss(model, batches, split, batch_size, ctx):
    """(mean loss, tokens scored) over the whole split: every example of a task, or
    non-overlapping windows of text (the last partial window is left out)."""
    model.eval()
    if batches.task:
        picks = np.arange(batches.count(split))
    else:
        picks = np.arange(0, len(batches.tokens(split)) - batches.seq_len, batches.seq_len)
    total, scored = 0.0, 0
    for start in range(0, len(picks), batch_size):
        x, y = batches.batch(split, picks[start:start + batch_size])
        with ctx:
            loss = model(x, y)[1]
        n = int((y != -1).sum())
        total, scored = total + loss.item() * n, scored + n
    return total / scored, scored


def verdict_text(val_loss, bar) -> str:
    """' (bar B): PASS' when val_loss <= bar, FAIL above it; '' when there is no bar."""
    if not bar:
        return ""
    return f" (bar {bar}): {'PASS' if val_loss <= bar else 'FAIL'}"


TASK_BARS = {"reverse": 0.95, "copy": 0.95, "mixed": 0.90}  # exact-match pass marks from DESIGN.md


@torch.no_grad()
def exact_match_accuracy(model, examples, prompt_len, batch_size=512, device="cpu") -> float:
    """Fraction of examples (n, example_len) whose greedy continuation of the first prompt_len
    tokens equals the rest of the example exactly. Puts the model in eval mode."""
    model.eval()
    examples = torch.as_tensor(np.asarray(examples), dtype=torch.long)
    correct = 0
    for chunk in examples.split(batch_size):
        chunk = chunk.to(device)
        answer_len = chunk.size(1) - prompt_len
        out = model.generate(chunk[:, :prompt_len], answer_len, temperature=0)
        correct += int((out[:, prompt_len:] == chunk[:, prompt_len:]).all(dim=1).sum())
    return correct / len(examples)


QA_SHOWN = 8  # held-out questions whose answers are printed next to the reference answers


@torch.no_grad()
def qa_answer_loss(model, tokenizer, pairs, ctx, device) -> float:
    """Mean cross-entropy on the answer tokens (" answer\n") of held-out Q&A pairs, given the question."""
    model.eval()
    total, scored = 0.0, 0
    for question, answer in pairs:
        prompt = tokenizer.encode(qa_prompt(question))
        ids = torch.tensor(prompt + tokenizer.encode(f" {answer}\n"), device=device)
        x, y = ids[:-1], ids[1:].clone()
        y[:len(prompt) - 1] = -1  # no loss on the question
        x, y = x[-model.config.block_size:], y[-model.config.block_size:]
        with ctx:
            loss = model(x[None], y[None])[1]
        n = int((y != -1).sum())
        total, scored = total + loss.item() * n, scored + n
    return total / scored


@torch.no_grad()
def greedy_answer(model, tokenizer, question, device, max_tokens=200) -> str:
    """The model's greedy answer to a question, up to the newline that ends answers in the data."""
    idx = torch.tensor([tokenizer.encode(qa_prompt(question))], device=device)
    answer = []
    for token in model.generate_stream(idx, max_tokens, temperature=0):
        text = tokenizer.decode([token.item()])
        if text == "\n":
            break
        answer.append(text)
    return "".join(answer).strip()


def qa_report(model, tokenizer, test_text, ctx, device):
    """Held-out answer loss, and the first QA_SHOWN answers next to the references; returns the loss."""
    pairs = qa_pairs(test_text)
    loss = qa_answer_loss(model, tokenizer, pairs, ctx, device)
    print(f"held-out test answers: loss {loss:.4f} over {len(pairs)} pairs; greedy answers to the first {QA_SHOWN}:")
    for question, reference in pairs[:QA_SHOWN]:
        print(f"  Q: {question}\n     model: {greedy_answer(model, tokenizer, question, device)}\n     reference: {reference}")
    return loss


# --------------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    """Where this process sits in a torchrun job (a single process is rank 0 of 1)."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    device: str = "cpu"

    @property
    def is_master(self):
        return self.rank == 0


def start_distributed(cfg) -> Dist:
    """Join the torchrun job if RANK is set (NCCL on CUDA, gloo on CPU); pick this process's device."""
    device = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be divisible by "
                          f"the {world} processes (it counts micro-steps per optimizer step over all of them)")
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return Dist(rank, local_rank, world, True, device)


def any_rank(flag, dist) -> bool:
    """True when flag is true on any process (every process must call this at the same point)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([float(flag)], device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(values, dist):
    if dist.enabled:  # gloo has no AVG, so sum and divide
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
        values = values / dist.world_size
    return values


def broadcast_from_master(value, dist):
    if not dist.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------ data

def prepare_command(cfg) -> str:
    if cfg.dataset in DATASETS:
        parts = ["python", "prepare.py", cfg.dataset] + (["--source", cfg.data_source] if cfg.data_source else [])
    else:
        parts = ["python", "prepare.py", "text", "--source", cfg.data_source or "YOUR_TEXT_FILE", "--name", cfg.dataset]
    if cfg.data_dir != "data":
        parts += ["--data-dir", cfg.data_dir]
    return shlex.join(parts)


def build_missing_dataset(cfg):
    """Run prepare.py's prepare() for the config's data set; a one-line error message, or None."""
    print(f"{Path(cfg.data_dir) / cfg.dataset} is not prepared yet; preparing it now")
    name, out_name = (cfg.dataset, None) if cfg.dataset in DATASETS else ("text", cfg.dataset)
    try:
        prepare_dataset(name, source=cfg.data_source or None, data_dir=cfg.data_dir, out_name=out_name)
    except Exception as e:  # any failure ends in the same advice: the command to run by hand
        return f"could not prepare {cfg.dataset} ({e}); prepare it with: {prepare_command(cfg)}"
    return None


def dataset_folder(cfg, dist) -> Path:
    """data/<dataset>, prepared first if missing (by rank 0 only; the others wait for its verdict)."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if (folder / "meta.json").is_file():
        return folder
    error = build_missing_dataset(cfg) if dist.is_master else None
    error = broadcast_from_master(error, dist)
    if error:
        raise DataError(error)
    return folder


# ------------------------------------------------------------------------------------- trainer

class RunLog:
    """Log lines to stdout, one JSON object per line to out_dir/log.jsonl, and to wandb if on."""

    def __init__(self, cfg, enabled):
        self.enabled, self.path, self.wandb = enabled, Path(cfg.out_dir) / "log.jsonl", None
        if enabled and cfg.wandb_log:
            import wandb  # imported only when asked for: it is slow to import
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                                    dir=os.environ.get("WANDB_DIR", cfg.out_dir))

    def write(self, line, record):
        if self.enabled:
            print(line, flush=True)
            self.write_record(record)

    def write_record(self, record):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process, so the loop can finish its step and save."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if not self.requested:  # torchrun relays a Ctrl-C it received, so a repeat is ignored
            print(f"{signal.Signals(signum).name} received: finishing this step, then saving", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One run: model, optimizer and batches built from a config, stepped until max_iters or a signal.

    `step` counts finished optimizer steps; the checkpoint at step k holds the state after k steps
    and everything needed to take step k + 1 exactly as an uninterrupted run would.
    """

    def __init__(self, cfg, dist, argv):
        self.cfg, self.dist, self.argv = cfg, dist, argv
        self.device = dist.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.ctx = autocast_context(self.device, self.dtype)
        self.ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
        self.best_path = Path(cfg.out_dir) / "best.pt"
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.startswith("cuda"):
            enable_tf32()
        if dist.is_master:
            Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
            (Path(cfg.out_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
            print(format_config(cfg))
        folder = dataset_folder(cfg, dist)
        self.meta = load_meta(folder)
        self.batches = Batches(folder, self.meta, cfg.block_size, self.device)
        if self.batches.task and cfg.block_size < self.batches.seq_len:
            raise ConfigError(f"block_size={cfg.block_size} is shorter than the {self.batches.seq_len} tokens "
                              f"a {self.batches.task} example feeds the model; set block_size={self.batches.seq_len}")
        self.model_args = model_args_of(cfg, self.meta["vocab_size"])
        checkpoint = self.checkpoint_to_resume()
        self.build_model(checkpoint)
        self.step = checkpoint["step"] if checkpoint else 0
        self.best_val_loss = checkpoint.get("best_val_loss", float("inf")) if checkpoint else float("inf")
        self.saved_step = self.step if checkpoint else None
        self.ckpt_is_best = bool(checkpoint and checkpoint.get("is_best"))  # ckpt.pt holds the best val so far
        self.log = RunLog(cfg, dist.is_master)
        self.peak = cfg.peak_flops or (default_peak_flops(self.device, self.dtype) if dist.is_master else 0.0)
        self.pending_losses = []  # per-step loss tensors not yet read back (reading them syncs the device)
        self.print_summary()

    def checkpoint_to_resume(self):
        if self.cfg.init_from != "resume":
            return None
        if not self.ckpt_path.is_file():
            raise CheckpointError(f"no checkpoint at {self.ckpt_path} to resume from; check --out_dir, "
                                  "or start a new run with --init_from=scratch")
        checkpoint = load_checkpoint(self.ckpt_path, map_location=self.device)
        check_resumable(checkpoint, self.model_args, self.meta, self.ckpt_path, self.batches.folder)
        return checkpoint

    def build_model(self, checkpoint):
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        self.raw_model = GPT(GPTConfig(**self.model_args)).to(self.device)
        self.optimizers = self.raw_model.configure_optimizers(
            cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), self.device.split(":")[0],
            muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)
        for group in (g for opt in self.optimizers for g in opt.param_groups):
            group["peak_lr"] = group["lr"]  # the schedule scales every group's own peak
        self.scaler = torch.amp.GradScaler(self.device.split(":")[0], enabled=self.dtype == "float16")
        if checkpoint:
            self.raw_model.load_state_dict(clean_state_dict(checkpoint["model"]))
            self.load_optimizer_states(checkpoint)
            if checkpoint.get("scaler"):
                self.scaler.load_state_dict(checkpoint["scaler"])
            if checkpoint.get("rng"):
                restore_rng_states(checkpoint["rng"])
        if self.dist.rank > 0:  # dropout must differ between processes; the checkpoint holds rank 0's stream
            step = checkpoint["step"] if checkpoint else 0
            torch.manual_seed(int(np.random.SeedSequence((cfg.seed, self.dist.rank, step)).generate_state(1)[0]))
        self.model = torch.compile(self.raw_model) if cfg.compile else self.raw_model
        self.train_model = self.model
        if self.dist.enabled:
            ids = [self.dist.local_rank] if self.device.startswith("cuda") else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)

    def load_optimizer_states(self, checkpoint):
        """The optimizers' moments from the checkpoint, with the hyperparameters (peak lr, weight decay,
        betas) of this run's config: load_state_dict would otherwise bring back the old ones and
        silently ignore e.g. a new --learning_rate given on resume."""
        for optimizer, state in zip(self.optimizers, [checkpoint["optimizer"], checkpoint.get("muon")]):
            requested = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(state)
            for group, settings in zip(optimizer.param_groups, requested):
                group.update(settings)

    def tokens_per_step(self) -> int:
        return self.cfg.gradient_accumulation_steps * self.cfg.batch_size * self.batches.seq_len

    def print_summary(self):
        if not self.dist.is_master:
            return
        cfg = self.cfg
        print(f"device {self.device}, dtype {self.dtype}, {self.dist.world_size} process(es), "
              f"{self.raw_model.num_params() / 1e6:.2f}M parameters")
        print(f"tokens per optimizer step: {self.tokens_per_step():,} = {cfg.gradient_accumulation_steps} "
              f"micro-steps x {cfg.batch_size} sequences x {self.batches.seq_len} tokens")
        peak = f"{self.peak / 1e12:.2f} TFLOP/s" if self.peak else "unknown (set --peak_flops for MFU)"
        print(f"peak for MFU: {peak}")
        if self.step:
            print(f"resuming from {self.ckpt_path} at step {self.step} (best val loss {self.best_val_loss:.4f})")

    # ---- the loop

    def run(self):
        """Train to max_iters (or until a signal); then the final evaluations. Returns an exit code."""
        self.timer = (time.perf_counter(), self.step)  # (when, step) of the last log line
        with StopSignal() as stop:
            while True:
                if self.dist.is_master and self.is_eval_step():
                    self.evaluate_and_maybe_save()
                if self.step >= self.cfg.max_iters or self.cfg.eval_only:
                    break
                self.train_step()
                if self.should_log():
                    self.log_step()
                if any_rank(stop.requested, self.dist):
                    return self.stop_for_signal()
        if self.dist.is_master and not self.cfg.eval_only:
            self.save_at_end()
        if self.dist.is_master:
            self.final_evaluations()
        return 0

    def is_eval_step(self):
        return self.step % self.cfg.eval_interval == 0 or self.step >= self.cfg.max_iters or self.cfg.eval_only

    def should_log(self):
        return self.step == 1 or self.step % self.cfg.log_interval == 0 or self.step == self.cfg.max_iters

    def train_step(self):
        """One optimizer step over this process's micro-batches; loss kept on the device (no sync)."""
        lr = learning_rate_at(self.step, self.cfg)
        for group in (g for opt in self.optimizers for g in opt.param_groups):
            group["lr"] = group["peak_lr"] * lr / self.cfg.learning_rate
        picks = micro_batch_picks(self.batches, self.cfg, self.step, self.dist.rank, self.dist.world_size)
        step_loss = torch.zeros((), device=self.device)
        x, y = self.batches.batch("train", picks[0])
        for micro, _ in enumerate(picks):
            if self.dist.enabled:  # all-reduce gradients only once, after the last micro-step
                self.train_model.require_backward_grad_sync = micro == len(picks) - 1
            with self.ctx:
                loss = self.train_model(x, y)[1] / len(picks)
            if micro + 1 < len(picks):
                x, y = self.batches.batch("train", picks[micro + 1])  # load the next batch while the device works
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        if self.cfg.grad_clip:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.grad_clip)
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.lr = lr
        self.pending_losses.append(step_loss)

    def checked_losses(self) -> list:
        """The losses of the steps since the last log (mean over all processes: every process
        calls this on the same steps), read back from the device at once, then forgotten."""
        values = mean_over_ranks(torch.stack(self.pending_losses), self.dist).tolist()
        self.pending_losses = []
        self.raise_if_non_finite(values)
        return values

    def check_local_losses(self):
        """Raise if a step since the last log had a non-finite loss here (rank 0 alone, before a save)."""
        if self.pending_losses:
            self.raise_if_non_finite(torch.stack(self.pending_losses).tolist())

    def raise_if_non_finite(self, values):
        first_step = self.step - len(values) + 1
        for i, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLossError(self.non_finite_message(value, first_step + i))

    def non_finite_message(self, value, step):
        kept = (f"last good checkpoint kept at {self.ckpt_path} (step {self.saved_step})"
                if self.saved_step is not None else "no checkpoint was written")
        return f"non-finite loss ({value}) at step {step}; {kept}"

    def log_step(self):
        loss = self.checked_losses()[-1]
        now = time.perf_counter()
        start, start_step = self.timer
        seconds_per_step = (now - start) / max(1, self.step - start_step)
        self.timer = (now, self.step)
        tokens_per_s = self.tokens_per_step() / seconds_per_step
        flops = self.raw_model.flops_per_token(self.batches.seq_len) * tokens_per_s
        mfu = flops / (self.peak * self.dist.world_size) if self.peak else None
        mfu_text = f"{100 * mfu:.2f}%" if mfu is not None else "n/a"
        self.log.write(f"step {self.step} | loss {loss:.4f} | lr {self.lr:.2e} | ms/step {1000 * seconds_per_step:.1f} "
                       f"| tok/s {tokens_per_s:,.0f} | mfu {mfu_text}",
                       {"kind": "train", "step": self.step, "loss": loss, "lr": self.lr,
                        "ms_per_step": 1000 * seconds_per_step, "tokens_per_s": tokens_per_s, "mfu": mfu})

    def evaluate_and_maybe_save(self):
        losses = estimate_loss(self.model, self.batches, self.cfg, self.step, self.ctx)
        if not all(math.isfinite(v) for v in losses.values()):
            raise NonFiniteLossError(self.non_finite_message(losses["val"], self.step) + " (in evaluation)")
        improved = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.log.write(f"eval step {self.step} | train loss {losses['train']:.4f} | val loss {losses['val']:.4f} "
                       f"| best val {self.best_val_loss:.4f}",
                       {"kind": "eval", "step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                        "best_val_loss": self.best_val_loss})
        changed = self.step > 0 and self.saved_step != self.step  # nothing to save right after a resume
        if not self.cfg.eval_only and changed and (improved or self.cfg.always_save_checkpoint):
            self.save("val improved" if improved else "always_save_checkpoint", is_best=improved)
        self.timer = (time.perf_counter(), self.step)  # ms/step measures training, not evaluation

    def checkpoint(self) -> dict:
        muon = self.optimizers[1].state_dict() if len(self.optimizers) > 1 else None
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizers[0].state_dict(), "muon": muon,
                "scaler": self.scaler.state_dict(), "config": asdict(self.cfg), "model_args": self.model_args,
                "meta": self.meta, "step": self.step, "best_val_loss": self.best_val_loss, "rng": rng_states()}

    def save(self, reason, is_best=False):
        """Write ckpt.pt, the newest state (resume continues from it). When it held the best-val state
        and this one is not a new best, that file is kept as best.pt first, so the best is never lost."""
        self.check_local_losses()  # never write weights that came out of a non-finite step
        if self.ckpt_is_best and not is_best:
            keep_as(self.ckpt_path, self.best_path)
            print(f"kept the best-val checkpoint (val {self.best_val_loss:.4f}) as {self.best_path}", flush=True)
        save_checkpoint(self.ckpt_path, {**self.checkpoint(), "is_best": is_best})
        if is_best and self.best_path.exists():
            self.best_path.unlink()  # ckpt.pt is the best again
        self.saved_step, self.ckpt_is_best = self.step, is_best
        print(f"saved {self.ckpt_path} at step {self.step} ({reason})", flush=True)

    def save_at_end(self):
        self.check_local_losses()
        if self.cfg.save_latest and self.saved_step != self.step:
            self.save("end of run")

    def stop_for_signal(self):
        if self.dist.is_master:
            self.save("interrupted")
            argv = [a for a in self.argv if not a.startswith("--init_from=")] + ["--init_from=resume"]
            launcher = "torchrun <your torchrun options> train.py" if self.dist.enabled else "python train.py"
            print(f"interrupted at step {self.step}; resume with: {launcher} {shlex.join(argv)}", flush=True)
        return 0

    def final_evaluations(self):
        """Loss over the whole val split, and for attention tasks the exact-match test score."""
        if self.cfg.final_eval_full:
            loss, tokens = full_split_loss(self.raw_model, self.batches, "val", self.cfg.batch_size, self.ctx)
            print(f"final val loss (full split, {tokens:,} tokens): {loss:.4f}{verdict_text(loss, self.cfg.val_loss_bar)}")
            self.log.write_record({"kind": "final", "step": self.step, "val_loss_full": loss, "val_tokens": tokens})
        if self.batches.task:
            accuracy = exact_match_accuracy(self.raw_model, self.batches.examples("val"), self.batches.prompt_len,
                                            device=self.device)
            bar = TASK_BARS.get(self.batches.task, 0.95)
            verdict = "PASS" if accuracy >= bar else "FAIL"
            print(f"test exact match: {100 * accuracy:.1f}% (bar {100 * bar:.0f}%): {verdict}")
            self.log.write_record({"kind": "test", "step": self.step, "exact_match": accuracy, "bar": bar})
        if self.meta.get("qa") and self.meta.get("test_file"):
            test_text = (self.batches.folder / self.meta["test_file"]).read_text(encoding="utf-8")
            loss = qa_report(self.raw_model, tokenizer_from_meta(self.meta), test_text, self.ctx, self.device)
            self.log.write_record({"kind": "test", "step": self.step, "qa_answer_loss": loss})

    def close(self):
        self.log.close()


def train(cfg, argv) -> int:
    """Run one training job (joining torchrun's group if there is one); returns the exit code."""
    dist = start_distributed(cfg)
    trainer = None
    try:
        trainer = Trainer(cfg, dist, argv)
        code = trainer.run()
        if dist.enabled:
            torch.distributed.barrier()  # rank 0 may still be evaluating; leave together
        return code
    finally:
        if trainer is not None:
            trainer.close()
        if dist.enabled:
            torch.distributed.destroy_process_group()


USAGE = """usage: python train.py [CONFIG_FILE ...] [--key=value ...]
       torchrun --standalone --nproc_per_node=N train.py [CONFIG_FILE ...] [--key=value ...]
Config files are plain `name = value` lines; --key=value overrides them. Keys and defaults:
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + format_config(TrainConfig()))
        return 0
    try:
        return train(load_config(argv), argv)
    except (ConfigError, CheckpointError, DataError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a Ctrl-C before training started: nothing to save
        print("interrupted before training started; nothing saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
