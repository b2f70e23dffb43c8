"""Checkpoints: written atomically, loaded safely, and the rules of when a run resumes from one.

A checkpoint is a plain dict saved with torch.save: model and optimizer states, the GradScaler,
the config and model_args, the data set's meta, step, best val loss and every RNG state.
In out_dir, `ckpt.pt` is the newest state (what a run resumes from) and `best.pt` the state with
the best val loss so far (what sample.py and the tools load by default). No run writes over a
checkpoint it did not start from.
"""
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from tinygpt.common import CheckpointError, atomic_write, keep_as
from tinygpt.device import broadcast_tensors_from_master, collectively, model_dtype, resolve_device
from tinygpt.tokenizer import tokenizer_from_meta

RETIRED_FIELDS = ("fast_dropout", "loss_chunk", "zero_init_head")  # model_args of earlier versions: no weights changed
# Retired speedrun levers that changed the weights or the forward pass: a checkpoint that held the value of today's
# model loads; one that used the lever is refused, since this model.py cannot compute it (docs/results.md: the levers).
RETIRED_LEVERS = {"unet_skips": (False, "U-net skips and their skip_weights are gone"),
                  "rope_base": (10000.0, "RoPE's base is 10000"),
                  "attn_scale": (0.0, "attention scales q.k by 1/sqrt(head_dim)")}


def checkpoint_to_resume(cfg, attempt=0) -> Path | None:
    """out_dir/ckpt.pt when this run continues it, else None. Nothing is ever started on top of a
    trained model: init_from='scratch' refuses an out_dir that holds one, and a fine-tuning run continues
    its out_dir's own ckpt.pt (as 'auto'), not the weights it names. A torchrun relaunch after a failure
    (attempt > 0) continues whatever the command line says."""
    out_dir = Path(cfg.out_dir)
    init_from = "auto" if attempt else cfg.init_from
    ckpt = out_dir / "ckpt.pt"
    existing = [p.name for p in (ckpt, out_dir / "best.pt") if p.exists()]
    if init_from == "resume" and not ckpt.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt} to resume from; check --out_dir, or drop --init_from=resume")
    if existing and (init_from == "scratch" or not ckpt.is_file()):
        hint = "drop --init_from=scratch to resume it, or " if ckpt.is_file() else ""
        raise CheckpointError(f"{out_dir} already holds {' and '.join(existing)}; {hint}move them away or use "
                              "another --out_dir to start over")
    if init_from != "scratch" and ckpt.is_file():
        return ckpt
    return None


def check_visible(resume_from):
    """A one-line CheckpointError when rank 0 resumes a checkpoint that this process cannot read."""
    if resume_from is not None and not Path(resume_from).is_file():
        raise CheckpointError(f"rank 0 resumes {resume_from}, which this node does not see: a multi-node run "
                              "resumes only with out_dir on storage that every node shares")


def training_state(model, optimizers, scaler, cfg, model_args, meta, step, best_val_loss, best_step) -> dict:
    """What a run saves: everything a resumed run needs to continue exactly where this one is."""
    return {"model": model.state_dict(), "optimizer": optimizers[0].state_dict(),
            "muon": optimizers[1].state_dict() if len(optimizers) > 1 else None, "scaler": scaler.state_dict(),
            "config": asdict(cfg), "model_args": model_args, "meta": meta, "step": step,
            "best_val_loss": best_val_loss, "best_step": best_step, "rng": rng_states()}


def save_training_state(out_dir, state, is_best, reason):
    """state to out_dir/ckpt.pt (the newest state); when val improved, best.pt becomes another name for it."""
    ckpt_path = Path(out_dir) / "ckpt.pt"
    save_checkpoint(ckpt_path, state)
    if is_best:
        keep_as(ckpt_path, Path(out_dir) / "best.pt")
    also = " and best.pt" if is_best else ""
    print(f"saved {ckpt_path}{also} at step {state['step']} ({reason})", flush=True)


def checkpoint_bytes(model) -> int:
    """About the size of a checkpoint of model: float32 weights and two AdamW moments per weight (Muon keeps
    one: less); the rest (config, meta, RNG states) is a few kB. GPT-2 XL: 1.56e9 x 12 bytes, 18.7 GB."""
    return 12 * sum(p.numel() for p in model.parameters())


def check_free_space(out_dir, checkpoint_size):
    """A one-line CheckpointError before a run writes anything when out_dir's disk cannot hold its checkpoints:
    up to three at once (best.pt of an earlier step, ckpt.pt, the next ckpt.pt being written), less the space
    out_dir's checkpoints take already (the run replaces them)."""
    out_dir = Path(out_dir)
    folder = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    held = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in (out_dir / "ckpt.pt", out_dir / "best.pt")
                                                      if p.is_file())}  # a hard-linked best.pt counts once
    needed, free = 3 * checkpoint_size - sum(held.values()), shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder} has {free / 1e9:.1f} GB free, but this run needs up to {needed / 1e9:.1f} GB "
                              f"more for its checkpoints (3 files of ~{checkpoint_size / 1e9:.1f} GB: best.pt, ckpt.pt "
                              "and the next one being written); free some space or use another --out_dir")


def kept_message(out_dir, saved_step) -> str:
    """What a run that stops on an error leaves behind."""
    if saved_step is None:
        return "no checkpoint was written"
    return f"last good checkpoint kept at {Path(out_dir) / 'ckpt.pt'} (step {saved_step})"


def save_checkpoint(path, checkpoint):
    """Write checkpoint to path atomically: a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, mmap=False) -> dict:
    """The checkpoint dict at path with every tensor on the CPU, whatever device wrote it.

    Loading to the CPU is what keeps resume device-agnostic: load_state_dict copies weights and
    optimizer moments to wherever the parameters live, and the RNG states must be CPU tensors.
    weights_only=True: no code in the file runs on load. mmap=True maps the tensors instead of
    reading them, for a caller that wants only the small entries (model_args, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # truncated zips, foreign pickles, random bytes: all end here
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {reason}); "
                              "it may be truncated or not from train.py") from None
    missing = [k for k in ("model", "model_args", "config", "step") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    checkpoint["model_args"] = without_retired_fields(checkpoint["model_args"], path)
    return checkpoint


def without_retired_fields(model_args, path) -> dict:
    """model_args without the fields of earlier versions; a one-line CheckpointError for a retired lever in use."""
    for name, (kept, what) in RETIRED_LEVERS.items():
        if model_args.get(name, kept) != kept:
            raise CheckpointError(f"{path} was trained with {name}={model_args[name]!r}, which was retired ({what}), "
                                  "so this model.py cannot compute its forward pass; use a checkout of commit b95277c")
    return {k: v for k, v in model_args.items() if k not in RETIRED_FIELDS and k not in RETIRED_LEVERS}


def load_weights_from_master(model, path, dist):
    """The weights of the checkpoint at path in model on every process, read by rank 0 alone and sent to the
    others: on another node out_dir may be another folder, without the file."""
    checkpoint = collectively(dist, "master", load_checkpoint, path, True)  # mapped: the optimizer state stays on disk
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    broadcast_tensors_from_master([p.detach() for p in model.parameters()], dist)


def checkpoint_path(out_dir, name="") -> Path:
    """out_dir/name; by default best.pt when the run has one, else ckpt.pt (the newest state)."""
    out_dir = Path(out_dir)
    if name:
        return out_dir / name  # an absolute name stays as it is
    best = out_dir / "best.pt"
    return best if best.is_file() else out_dir / "ckpt.pt"


def clean_state_dict(state_dict) -> dict:
    """state_dict without the `_orig_mod.` (torch.compile) and `module.` (DDP) key prefixes."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def model_from_checkpoint(checkpoint, device="cpu") -> GPT:
    """The checkpoint's GPT on device, in eval mode. Built on the device itself: for GPT-2 XL a model built on
    the host beside the checkpoint's tensors would be a second 6 GB copy there."""
    try:
        with torch.device(device):
            model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args "
                              f"({str(e).strip().splitlines()[0][:160]})") from None
    return model.eval()


def load_for_inference(out_dir, name="", device="auto", dtype="auto"):
    """(model in eval mode with weights cast to dtype, its tokenizer, device) from out_dir's
    checkpoint (best.pt by default): what sample.py and tools/interpret.py start from."""
    return ready_for_inference(checkpoint_to_sample(out_dir, name), device, dtype)


def checkpoint_to_sample(out_dir, name=""):
    """out_dir's checkpoint (best.pt by default), mapped: the optimizer state stays on disk."""
    path = checkpoint_path(out_dir, name)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; train one first, e.g. "
                              f"python train.py configs/speedrun_cpu.py --out_dir={out_dir}")
    return load_checkpoint(path, mmap=True)


def ready_for_inference(checkpoint, device="auto", dtype="auto"):
    """(model in eval mode with weights cast to dtype, its tokenizer, device) of a dict with the
    model, model_args and meta of a checkpoint (or of GPT-2's weights, gpt2.load_weights)."""
    device = resolve_device(device)
    dtype = model_dtype(dtype, device, checkpoint["model_args"])
    model = model_from_checkpoint(checkpoint, device).to(getattr(torch, dtype))
    tokenizer = tokenizer_from_meta(checkpoint["meta"])
    if tokenizer.vocab_size > model.config.vocab_size:  # e.g. a small random model in GPT-2's format
        raise CheckpointError(f"the model has {model.config.vocab_size} token embeddings, fewer than its "
                              f"{tokenizer.kind} tokenizer's {tokenizer.vocab_size}, so it cannot read its prompts")
    return model, tokenizer, device


def check_vocabulary(weights_meta, vocab_size, meta, where):
    """Raise CheckpointError unless a model with vocab_size token embeddings, trained on tokens
    of weights_meta's tokenizer, can be fine-tuned on the data set of meta: the same tokenizer
    (for characters, the same list in the same order) and no text token id beyond its
    embeddings (a data set's template tokens, ids from its text_vocab_size on, may be new:
    fine-tuning adds their rows)."""
    kind, data_kind = weights_meta.get("tokenizer"), meta.get("tokenizer")
    if kind != data_kind:
        raise CheckpointError(f"{where} reads {kind} tokens, but this data set is tokenized by {data_kind}; "
                              f"fine-tune it on a data set prepared with the {kind} tokenizer")
    vocab, data_vocab = weights_meta.get("vocab") or [], meta.get("vocab") or []
    if vocab != data_vocab:
        raise CheckpointError(f"{where} was trained on another character vocabulary ({len(vocab)} characters) than "
                              f"this data set's ({len(data_vocab)}); fine-tune it on data with the same vocabulary")
    if meta.get("text_vocab_size", meta["vocab_size"]) > vocab_size:
        text = meta.get("text_vocab_size", meta["vocab_size"])
        raise CheckpointError(f"{where} has {vocab_size} token embeddings, fewer than the {text} "
                              "of this data set's text")


def check_resumable(checkpoint, model_args, meta, uses_muon, path):
    """Raise CheckpointError unless the run asked for can continue from this checkpoint."""
    saved = asdict(GPTConfig(**checkpoint["model_args"]))  # fields added since it was saved take their defaults
    differ = [f"{k} {saved.get(k)!r} in the checkpoint vs {v!r} requested"  # dropout is free to change
              for k, v in model_args.items() if k != "dropout" and saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{path} does not match this config: {'; '.join(differ)}. "
                              "Use the checkpoint's model settings, or another out_dir to start afresh")
    saved_vocab = (checkpoint.get("meta") or {}).get("vocab")
    if saved_vocab is not None and meta.get("vocab") is not None and saved_vocab != meta["vocab"]:
        raise CheckpointError(f"{path} was trained on another vocabulary than this data set; "
                              "resume with the data it was trained on")
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} has no optimizer state, so training cannot resume exactly from it")
    if (checkpoint.get("muon") is not None) != uses_muon:
        had = "with" if checkpoint.get("muon") is not None else "without"
        raise CheckpointError(f"{path} was trained {had} Muon; resume with the same optimizer "
                              f"(muon_lr {'> 0' if had == 'with' else '= 0'}), or use another out_dir")


def rng_states() -> dict:
    """Every random state a run draws from: torch (dropout), this process's GPU, numpy and Python's
    random. Only the current GPU's: get_rng_state_all() would start a CUDA context on every GPU."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            # weights_only loading accepts tensors, not numpy arrays
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached},
            "python": random.getstate()}


def restore_rng_states(states):
    """Put back what rng_states() saved. The states must be CPU tensors (load_checkpoint's)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])  # the current device, set before the model was built
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(states["python"])
