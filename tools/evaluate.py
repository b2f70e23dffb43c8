"""Evaluate a checkpoint without training: the loss over the whole val split, and for the attention
tasks and chat data their own scores, as train.py reports them at the end of a run. Run from the
repo's root:

    python -m tools.evaluate --out_dir=out-reverse            # best.pt, else ckpt.pt
    python -m tools.evaluate --out_dir=out-tinytalks --ckpt=ckpt.pt
    python -m tools.evaluate --out_dir=out-pos-alibi --block_size=256   # 4x a 64-token run
    python -m tools.evaluate --out_dir=out-pos-alibi --stream=2048      # window vs sinks
    python -m tools.evaluate --task=hellaswag --out_dir=out-gpt2-124m   # 10,042 HellaSwag examples
    python -m tools.evaluate --task=hellaswag --init_from=gpt2 --limit=1000   # OpenAI's GPT-2

Every loss is printed with its bits per byte of the text as well, so that tokenizers compare.
Without --batch_size, each forward pass takes as many windows as keep its logits within a quarter of
the GPU's free memory (1 GB on a CPU): GPT-2's vocabulary at 1,024 tokens takes ~0.6 GB a window.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model import SINK_POSITIONS
from tinygpt.checkpoint import (
    checkpoint_path,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    ready_for_inference,
)
from tinygpt.common import CheckpointError, ConfigError, DataError, must, run_cli
from tinygpt.data import Batches, bits_per_byte, bpb_text, final_report, load_meta
from tinygpt.device import (
    DTYPES,
    autocast_context,
    logits_budget,
    model_dtype,
    resolve_device,
    rows_within,
)
from tinygpt.evaluation import streaming_losses
from tinygpt.hellaswag import (
    GIT_BLOB,
    git_blob_id,
    hellaswag_examples,
    hellaswag_file,
    hellaswag_score,
)
from tinygpt.tokenizer import same_tokenizer


def stream_report(model, tokens, sink_tokens, meta):
    """Print the streaming loss past the window (and its bits per byte, taking the val split's
    tokens per byte) and tokens/s of each way generation keeps context."""
    block = model.config.block_size
    if len(tokens) <= block + 1:
        raise ConfigError(f"stream={len(tokens)} must be longer than the window, {block} tokens, "
                          "to go past it")
    ways = {"sliding window (cache)": (True, 0),
            f"{sink_tokens} sinks + rolling (cache)": (True, sink_tokens),
            "full recompute (no cache)": (False, 0)}
    print(f"streaming the first {len(tokens)} val tokens; loss on the {len(tokens) - 1 - block} "
          "past the window")
    for name, (use_cache, sinks) in ways.items():
        if sinks and model.config.pos not in SINK_POSITIONS:
            print(f"  {name:28s} n/a: pos={model.config.pos!r} bakes positions into the keys")
            continue
        losses, speed = streaming_losses(model, tokens, use_cache, sinks)
        loss = losses[block:].mean().item()
        print(f"  {name:28s} loss {loss:.4f}{bpb_text(bits_per_byte(loss, meta, 'val'))}   "
              f"{speed:7.1f} tokens/s", flush=True)


@dataclass
class EvaluateConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    data_dir: str = ""           # '' = the checkpoint's data_dir (hellaswag: else 'data')
    batch_size: int = 0          # sequences per forward pass; 0 = as many as fit in memory (<= 64)
    device: str = "auto"         # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "float32"       # 'float32', 'bfloat16', 'float16' or 'auto'
    block_size: int = 0          # windows of this many tokens (0 = as trained); longer: extrapolate
    stream: int = 0              # > 0: instead, feed this many val tokens one at a time (the cache)
    sink_tokens: int = 4         # with --stream: the attention sinks beside the sliding window
    task: str = ""               # '' = the run's final scores; 'hellaswag': its validation set
    init_from: str = ""          # with --task: GPT-2 weights (gpt2, ..., a folder), not out_dir
    source: str = ""             # with --task: a copy of hellaswag_val.jsonl, or another URL
    limit: int = 0               # with --task: the first N examples only (0 = all 10,042)

    def __post_init__(self):
        must(self.batch_size >= 0, f"batch_size={self.batch_size} must not be negative "
                                   "(0 = sized from memory)")
        must(self.task in ("", "hellaswag"), f"task={self.task!r}: the one task is 'hellaswag'")
        must(self.limit >= 0, f"limit={self.limit} must not be negative (0 = every example)")
        must(self.task or not (self.init_from or self.source or self.limit),
             "--init_from, --source and --limit go with --task=hellaswag")
        must(self.block_size >= 0 and self.stream >= 0 and self.sink_tokens >= 1,
             "block_size and stream must not be negative, sink_tokens must be at least 1")
        must(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")


def hellaswag(cfg):
    """Score HellaSwag with a checkpoint's model (out_dir) or GPT-2's weights (init_from)."""
    checkpoint = None
    if not cfg.init_from:
        checkpoint = load_checkpoint(checkpoint_path(cfg.out_dir, cfg.ckpt), mmap=True)
    data_dir = cfg.data_dir or ((checkpoint or {}).get("config") or {}).get("data_dir") or "data"
    path = hellaswag_file(cfg.source, data_dir)  # before GPT-2's weights: a bad file stops at once
    examples = hellaswag_examples(path, cfg.limit)
    weights = checkpoint or load_weights(cfg.init_from)
    model, tokenizer, device = ready_for_inference(weights, cfg.device, cfg.dtype)
    pinned = "the pinned file" if git_blob_id(path) == GIT_BLOB else "not the pinned file"
    print(f"hellaswag: {len(examples):,} examples of {path} ({pinned}), "
          f"model {cfg.init_from or cfg.out_dir}", flush=True)
    scores = hellaswag_score(model, tokenizer, examples, device)
    print(f"hellaswag ({scores['examples']:,} examples): acc {scores['acc']:.4f}, "
          f"acc_norm {scores['acc_norm']:.4f}")
    return scores


def evaluate(cfg):
    if cfg.task == "hellaswag":
        return hellaswag(cfg)
    path = checkpoint_path(cfg.out_dir, cfg.ckpt)
    checkpoint = load_checkpoint(path, mmap=True)
    device = resolve_device(cfg.device)
    trained = checkpoint["config"]
    folder = Path(cfg.data_dir or trained["data_dir"]) / trained["dataset"]
    meta = load_meta(folder)
    if not same_tokenizer(meta, checkpoint.get("meta") or {}):
        raise CheckpointError(f"{folder} has another vocabulary than {path} was trained on")
    model = model_from_checkpoint(checkpoint, device)
    print(f"{path}: step {checkpoint['step']}, data {folder}")
    trained_block, block = model.config.block_size, cfg.block_size or model.config.block_size
    if model.config.pos == "learned" and block > trained_block:
        raise ConfigError(f"pos='learned' has positions for {trained_block} tokens only, so it "
                          f"cannot read {block}; sinusoidal, rope and alibi models can be "
                          "evaluated past their window")
    batches = Batches(folder, meta, block, device)
    if cfg.stream:
        tokens = torch.from_numpy(batches.tokens("val")[:cfg.stream].astype("int64"))
        return stream_report(model, tokens.to(device), cfg.sink_tokens, meta)
    rows = cfg.batch_size or rows_within(logits_budget(device), block, model.config.vocab_size, 64)
    print(f"windows of {block} tokens ({block / trained_block:g}x the trained {trained_block}), "
          f"{rows} per pass")
    ctx = autocast_context(device, model_dtype(cfg.dtype, device, checkpoint["model_args"]))
    final_report(model, batches, ctx, rows, trained.get("val_loss_bar", 0.0),
                 trained.get("exact_match_bar", 0.0))


def main(argv) -> int:
    usage = "usage: python -m tools.evaluate [--key=value ...]"
    return run_cli(EvaluateConfig, argv, usage, __doc__.split("\n\n")[0],
                   evaluate, (CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
