"""Evaluate a checkpoint without training: the loss over the whole val split, and for the attention tasks and
Q&A data their own scores, as train.py reports them at the end of a run. Run from the repo's root:

    python -m tools.evaluate --out_dir=out-reverse            # best.pt, else ckpt.pt
    python -m tools.evaluate --out_dir=out-tinytalks --ckpt=ckpt.pt
    python -m tools.evaluate --out_dir=out-pos-alibi --block_size=256   # length extrapolation: 4x a 64-token run
    python -m tools.evaluate --out_dir=out-pos-alibi --stream=2048      # sliding window vs attention sinks
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from model import SINK_POSITIONS
from tinygpt.checkpoint import checkpoint_path, load_checkpoint, model_from_checkpoint
from tinygpt.common import CheckpointError, ConfigError, DataError
from tinygpt.data import Batches, final_report, load_meta
from tinygpt.device import DTYPES, autocast_context, model_dtype, resolve_device
from tinygpt.evaluation import qa_report, streaming_losses
from tinygpt.common import must, run_cli


def stream_report(model, tokens, sink_tokens):
    """Print the streaming loss past the window and tokens/s of each way generation keeps context."""
    block = model.config.block_size
    if len(tokens) <= block + 1:
        raise ConfigError(f"stream={len(tokens)} must be longer than the window, {block} tokens, to go past it")
    ways = {"sliding window (cache)": (True, 0), f"{sink_tokens} sinks + rolling (cache)": (True, sink_tokens),
            "full recompute (no cache)": (False, 0)}
    print(f"streaming the first {len(tokens)} val tokens; loss on the {len(tokens) - 1 - block} past the window")
    for name, (use_cache, sinks) in ways.items():
        if sinks and model.config.pos not in SINK_POSITIONS:
            print(f"  {name:28s} n/a: pos={model.config.pos!r} bakes positions into the cached keys")
            continue
        losses, speed = streaming_losses(model, tokens, use_cache, sinks)
        print(f"  {name:28s} loss {losses[block:].mean():.4f}   {speed:7.1f} tokens/s", flush=True)


@dataclass
class EvaluateConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    data_dir: str = ""           # '' = the data_dir the checkpoint was trained with
    batch_size: int = 64         # sequences per forward pass
    device: str = "auto"         # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "float32"       # 'float32', 'bfloat16', 'float16' or 'auto'
    block_size: int = 0          # windows of this many tokens (0 = the trained block_size); longer tests length extrapolation
    stream: int = 0              # > 0: instead, feed this many val tokens one at a time through generation's cache
    sink_tokens: int = 4         # with --stream: the attention sinks compared with the sliding window

    def __post_init__(self):
        must(self.batch_size >= 1, f"batch_size={self.batch_size} must be at least 1")
        must(self.block_size >= 0 and self.stream >= 0 and self.sink_tokens >= 1,
             "block_size and stream must not be negative, sink_tokens must be at least 1")
        must(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")


def evaluate(cfg):
    path = checkpoint_path(cfg.out_dir, cfg.ckpt)
    checkpoint = load_checkpoint(path, mmap=True)
    device = resolve_device(cfg.device)
    trained = checkpoint["config"]
    folder = Path(cfg.data_dir or trained["data_dir"]) / trained["dataset"]
    meta = load_meta(folder)
    if meta.get("vocab") != (checkpoint.get("meta") or {}).get("vocab"):
        raise CheckpointError(f"{folder} has another vocabulary than {path} was trained on")
    model = model_from_checkpoint(checkpoint, device)
    print(f"{path}: step {checkpoint['step']}, data {folder}")
    trained_block, block = model.config.block_size, cfg.block_size or model.config.block_size
    if model.config.pos == "learned" and block > trained_block:
        raise ConfigError(f"pos='learned' has positions for {trained_block} tokens only, so it cannot read "
                          f"{block}; sinusoidal, rope and alibi models can be evaluated past their window")
    batches = Batches(folder, meta, block, device)
    if cfg.stream:
        return stream_report(model, torch.from_numpy(batches.tokens("val")[:cfg.stream].astype("int64")).to(device),
                             cfg.sink_tokens)
    print(f"windows of {block} tokens ({block / trained_block:g}x the trained {trained_block})")
    ctx = autocast_context(device, model_dtype(cfg.dtype, device, checkpoint["model_args"]))
    final_report(model, batches, ctx, cfg.batch_size, trained.get("val_loss_bar", 0.0),
                 trained.get("exact_match_bar", 0.0))
    if meta.get("qa") and meta.get("test_file"):
        qa_report(model, batches, ctx, trained.get("exact_match_bar", 0.0))


def main(argv) -> int:
    return run_cli(EvaluateConfig, argv, "usage: python -m tools.evaluate [--key=value ...]", __doc__.split("\n\n")[0],
                   evaluate, (CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
