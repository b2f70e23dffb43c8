"""What a run keeps in out_dir: checkpoints (written atomically, loaded safely, and the rules of
when a run resumes from one) and the log of its losses.

A checkpoint is a plain dict saved with torch.save: the model and optimizer states, the
GradScaler, the run's config and model_args, the data set's meta, the step, the best val loss,
every RNG state, and the format version of that dict. In out_dir, `ckpt.pt` is the newest state
(what a run resumes from) and `best.pt` the state with the best val loss so far (what sample.py
and the tools load by default). No run writes over a checkpoint it did not start from.
"""
import json
import os
import random
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from tinygpt.common import CheckpointError, atomic_write, keep_as
from tinygpt.device import model_dtype, resolve_device
from tinygpt.parallel import load_model_state, model_state, optimizer_state, sharded_like

# The layout of the checkpoint dict. Bump it when a change to the dict or to model.py means an
# older checkpoint cannot be read the same way; load_checkpoint then refuses the old ones.
FORMAT = 2
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M, 1558M weights


# ------------------------------------------------------------------ which checkpoint a run uses

def checkpoint_to_resume(out_dir, init_from, attempt=0) -> Path | None:
    """out_dir/ckpt.pt when this run continues it, else None. Nothing is ever started on top of a
    trained model: init_from='scratch' refuses an out_dir that holds one, and a fine-tuning run
    continues its out_dir's own ckpt.pt (as 'auto' does), not the weights it names. A torchrun
    relaunch after a failure (attempt > 0) continues whatever the command line says."""
    out_dir = Path(out_dir)
    init_from = "auto" if attempt else init_from
    ckpt = out_dir / "ckpt.pt"
    existing = [p.name for p in (ckpt, out_dir / "best.pt") if p.exists()]
    if init_from == "resume" and not ckpt.is_file():
        raise CheckpointError(f"no checkpoint at {ckpt} to resume from; check --out_dir, "
                              "or drop --init_from=resume")
    if existing and (init_from == "scratch" or not ckpt.is_file()):
        hint = "drop --init_from=scratch to resume it, or " if ckpt.is_file() else ""
        raise CheckpointError(f"{out_dir} already holds {' and '.join(existing)}; {hint}move "
                              "them away or use another --out_dir to start over")
    if init_from != "scratch" and ckpt.is_file():
        return ckpt
    return None


def check_visible(resume_from):
    """A one-line error when rank 0 resumes a checkpoint that this process cannot read."""
    if resume_from is not None and not Path(resume_from).is_file():
        raise CheckpointError(f"rank 0 resumes {resume_from}, which this node does not see: a "
                              "multi-node run resumes only with out_dir on storage that every "
                              "node shares")


def checkpoint_path(out_dir, name="") -> Path:
    """out_dir/name; by default best.pt when the run has one, else ckpt.pt (the newest state)."""
    out_dir = Path(out_dir)
    if name:
        return out_dir / name  # an absolute name stays as it is
    best = out_dir / "best.pt"
    return best if best.is_file() else out_dir / "ckpt.pt"


# -------------------------------------------------------------------------- saving and loading

def training_checkpoint(model, optimizers, scaler, cfg, model_args, meta, step, best_val_loss,
                        best_step) -> dict:
    """Everything a resumed run needs to continue exactly where this one is. Every process calls
    it: a sharded model's tensors are gathered whole onto rank 0, which saves them."""
    muon = optimizer_state(model, optimizers[1]) if len(optimizers) > 1 else None
    return {"format": FORMAT, "model": model_state(model),
            "optimizer": optimizer_state(model, optimizers[0]), "muon": muon,
            "scaler": scaler.state_dict(), "config": asdict(cfg), "model_args": model_args,
            "meta": meta, "step": step, "best_val_loss": best_val_loss, "best_step": best_step,
            "rng": rng_states()}


def save_checkpoint(path, checkpoint):
    """Write checkpoint to path atomically: a crash mid-write leaves the previous file intact."""
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def save_in_out_dir(out_dir, checkpoint, is_best, reason):
    """checkpoint to out_dir/ckpt.pt; when val improved, best.pt becomes another name for it."""
    ckpt_path = Path(out_dir) / "ckpt.pt"
    save_checkpoint(ckpt_path, checkpoint)
    if is_best:
        keep_as(ckpt_path, Path(out_dir) / "best.pt")
    also = " and best.pt" if is_best else ""
    print(f"saved {ckpt_path}{also} at step {checkpoint['step']} ({reason})", flush=True)


def load_checkpoint(path, mmap=False) -> dict:
    """The checkpoint dict at path with every tensor on the CPU, whatever device wrote it.

    Loading to the CPU keeps resume device-agnostic: load_state_dict copies weights and optimizer
    moments to wherever the parameters live, and the RNG states must be CPU tensors.
    weights_only=True: no code in the file runs on load. mmap=True maps the tensors instead of
    reading them, for a caller that wants only the small entries (model_args, meta)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # truncated zips, foreign pickles, random bytes: all end here
        reason = (str(e).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{reason}); it may be truncated or not from train.py") from None
    keys = ("model", "model_args", "config", "step")
    missing = [k for k in keys if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} is not a train.py checkpoint "
                              f"(missing {', '.join(missing)})")
    check_format(checkpoint, path)
    return checkpoint


def check_format(checkpoint, path):
    """A one-line error for a checkpoint this model.py cannot compute the way it was trained: a
    newer format, or model options that model.py no longer has."""
    version = checkpoint.get("format", 1)
    if version > FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {version}, newer than this "
                              f"checkout's {FORMAT}; update the repo to read it")
    known = {f.name for f in fields(GPTConfig)}
    unknown = sorted(set(checkpoint["model_args"]) - known)
    if unknown:
        raise CheckpointError(f"{path} (checkpoint format {version}) uses model options this "
                              f"model.py does not have ({', '.join(unknown)}); sample or resume it "
                              "with the checkout that trained it")


def model_from_checkpoint(checkpoint, device="cpu") -> GPT:
    """The checkpoint's GPT on device, in eval mode. Built on the device itself: for GPT-2 XL a
    model built on the host beside the checkpoint's tensors would be a second 6 GB copy there."""
    try:
        with torch.device(device):
            model = GPT(GPTConfig(**checkpoint["model_args"]))
        model.load_state_dict(clean_state_dict(checkpoint["model"]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's weights do not fit its model_args "
                              f"({str(e).strip().splitlines()[0][:160]})") from None
    return model.eval()


def clean_state_dict(state_dict) -> dict:
    """state_dict without the `_orig_mod.` (torch.compile) and `module.` (DDP) key prefixes."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


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
    model, model_args and meta of a checkpoint (or of GPT-2's weights, load_weights)."""
    from tinygpt.tokenizer import tokenizer_from_meta  # only inference reads text; training never
    device = resolve_device(device)
    dtype = model_dtype(dtype, device, checkpoint["model_args"])
    model = model_from_checkpoint(checkpoint, device).to(getattr(torch, dtype))
    tokenizer = tokenizer_from_meta(checkpoint["meta"])
    if tokenizer.vocab_size > model.config.vocab_size:  # a small random model in GPT-2's format
        raise CheckpointError(f"the model has {model.config.vocab_size} token embeddings, fewer "
                              f"than its {tokenizer.kind} tokenizer's {tokenizer.vocab_size}, so "
                              "it cannot read its prompts")
    return model, tokenizer, device


# ---------------------------------------------------------------------- resuming a run exactly

def check_resumable(checkpoint, model_args, meta, uses_muon, path):
    """A one-line error unless the run asked for can continue from this checkpoint."""
    # Fields added to GPTConfig since it was saved take their defaults; dropout may change.
    saved = asdict(GPTConfig(**checkpoint["model_args"]))
    differ = [f"{k} {saved.get(k)!r} in the checkpoint vs {v!r} requested"
              for k, v in model_args.items() if k != "dropout" and saved.get(k) != v]
    if differ:
        raise CheckpointError(f"{path} does not match this config: {'; '.join(differ)}. Use the "
                              "checkpoint's model settings, or another out_dir to start afresh")
    saved_meta = checkpoint.get("meta") or {}
    if any(saved_meta.get(k) is not None and meta.get(k) is not None and saved_meta[k] != meta[k]
           for k in ("vocab", "bpe")):
        raise CheckpointError(f"{path} was trained on another vocabulary than this data set; "
                              "resume with the data it was trained on")
    if "optimizer" not in checkpoint:
        raise CheckpointError(f"{path} has no optimizer state, so training cannot resume "
                              "exactly from it")
    if (checkpoint.get("muon") is not None) != uses_muon:
        had = "with" if checkpoint.get("muon") is not None else "without"
        raise CheckpointError(f"{path} was trained {had} Muon; resume with the same optimizer "
                              f"(muon_lr {'> 0' if had == 'with' else '= 0'}), or use another "
                              "out_dir")


def restore_training_state(checkpoint, optimizers, scaler):
    """Put a checkpoint's optimizer moments, loss scale and RNG states back in place (its weights
    go in before the model is spread over the processes)."""
    for optimizer, saved in zip(optimizers, [checkpoint["optimizer"], checkpoint.get("muon")]):
        load_optimizer_state(optimizer, saved)
    if checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_states(checkpoint["rng"])


def load_optimizer_state(optimizer, saved):
    """saved's moments and step counts, under this optimizer's own settings: its lr, betas, decay
    and kernel. The kernel flags decide where torch puts the step counts: an unfused run's would
    leave them on the host, and a fused CUDA kernel rejects those. A checkpoint holds whole
    tensors; over sharded weights (FSDP) each process keeps its shard of each moment."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    groups = [{**old, **new} for old, new in zip(saved["param_groups"], settings)]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: sharded_like(v, params[i]) for k, v in moments.items()}
             for i, moments in saved["state"].items()}
    optimizer.load_state_dict({**saved, "state": state, "param_groups": groups})


def rng_states() -> dict:
    """Every random state a run draws from: torch (dropout), this process's GPU, numpy and
    Python's random. Only the current GPU's: get_rng_state_all() would start a CUDA context on
    every GPU."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    # weights_only loading accepts tensors, not numpy arrays
    numpy_state = {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                   "has_gauss": has_gauss, "cached_gaussian": cached}
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": numpy_state,
            "python": random.getstate()}


def restore_rng_states(states):
    """Put back what rng_states() saved. The states must be CPU tensors (load_checkpoint's)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(states["cuda"])  # the current device, set before the model
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(states["python"])


def load_weights_from_master(model, path, dist):
    """The weights of the checkpoint at path in model on every process, read by rank 0 alone and
    sent to the others: on another node out_dir may be another folder, without the file."""
    checkpoint = dist.on_master(load_checkpoint, path, True)  # mapped: optimizer state unread
    load_model_state(model, checkpoint and checkpoint["model"], dist)


# -------------------------------------------------------------------------------- disk space

def checkpoint_bytes(model) -> int:
    """About the size of a checkpoint of model: float32 weights and two AdamW moments per weight
    (Muon keeps one: less); the rest (config, meta, RNG states) is a few kB."""
    return 12 * sum(p.numel() for p in model.parameters())


def check_free_space(out_dir, checkpoint_size):
    """A one-line error before a run writes anything when out_dir's disk cannot hold its
    checkpoints: up to three at once (best.pt of an earlier step, ckpt.pt, the next ckpt.pt being
    written), less the space that out_dir's checkpoints take already (the run replaces them)."""
    out_dir = Path(out_dir)
    folder = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    files = [p.stat() for p in (out_dir / "ckpt.pt", out_dir / "best.pt") if p.is_file()]
    held = {(s.st_dev, s.st_ino): s.st_size for s in files}  # a hard-linked best.pt counts once
    needed = 3 * checkpoint_size - sum(held.values())
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CheckpointError(f"{folder} has {free / 1e9:.1f} GB free, but this run needs up to "
                              f"{needed / 1e9:.1f} GB more for its checkpoints (3 files of "
                              f"~{checkpoint_size / 1e9:.1f} GB: best.pt, ckpt.pt and the next one "
                              "being written); free some space or use another --out_dir")


def kept_message(out_dir, saved_step) -> str:
    """What a run that stops on an error leaves behind."""
    if saved_step is None:
        return "no checkpoint was written"
    return f"last good checkpoint kept at {Path(out_dir) / 'ckpt.pt'} (step {saved_step})"


# ------------------------------------------------------------------------------- fine-tuning

def check_init_from(init_from, dist):
    """Every process checks, so a node without the weights to fine-tune stops the whole job with
    one line instead of leaving its peers waiting for it."""
    where = f" on rank {dist.rank}'s node (every node needs them)" if dist.enabled else ""
    known = ("auto", "resume", "scratch", *GPT2_NAMES)
    if init_from not in known and not Path(init_from).exists():
        raise CheckpointError(f"init_from={init_from!r}: no such file or folder{where} (train "
                              f"that run first?); use auto, resume, scratch, "
                              f"{', '.join(GPT2_NAMES)} or the path of weights to fine-tune")


def load_weights(source) -> dict:
    """{'model', 'model_args', 'meta'} of a GPT-2 name, a Hugging Face GPT-2 folder, or a
    checkpoint of this repo: a .pt file, or an out_dir (its best.pt, else its ckpt.pt)."""
    path = Path(source)
    if path.is_dir() and ((path / "best.pt").is_file() or (path / "ckpt.pt").is_file()):
        # An out_dir: its config.json is the run's options, not a GPT-2 config.
        return load_checkpoint(checkpoint_path(path), mmap=True)  # optimizer state never read
    if path.is_file():
        return load_checkpoint(path, mmap=True)
    is_hf_folder = (path / "config.json").is_file() or (path / "model.safetensors").is_file()
    if source in GPT2_NAMES or is_hf_folder:
        from tinygpt import gpt2  # only GPT-2's weights need safetensors and the Hub
        folder = gpt2.download(source) if source in GPT2_NAMES else path
        weights = gpt2.load_hf(folder)
        check_shapes(weights["model"], weights["model_args"], folder / "model.safetensors")
        return weights
    what = "no such file or folder" if not path.exists() else "a folder with no model in it"
    raise CheckpointError(f"--init_from={source}: {what}; give a GPT-2 name "
                          f"({', '.join(GPT2_NAMES)}), a Hugging Face GPT-2 folder (config.json "
                          "+ model.safetensors), or a checkpoint of this repo (a .pt or an "
                          "out_dir)")


def model_to_train(cfg, meta, resume_from) -> tuple:
    """(model_args, weights to start from or None): the config's shape, or the shape of the
    weights that init_from names when this run fine-tunes them."""
    if cfg.init_from in ("auto", "resume", "scratch"):
        model_args = {f.name: getattr(cfg, f.name) for f in fields(GPTConfig)}
        return {**model_args, "vocab_size": meta["vocab_size"]}, None
    return weights_to_fine_tune(cfg, meta, resume_from)


def weights_to_fine_tune(cfg, meta, resume_from=None) -> tuple:
    """(model_args, state_dict) of a run that fine-tunes the weights cfg.init_from names on the
    data set of meta. The model's shape is the weights', with cfg's dropout, and block_size cropped
    to cfg's if it asks for less (as nanoGPT's crop_block_size). Weights without learned positions
    (their tables are computed for any length) take cfg's block_size, longer or not, so a model
    pretrained on short windows fine-tunes on long ones. A run that resumes its own checkpoint (a
    rerun of the same command) takes the shape from it and no tensors (None): they come with the
    resume. A one-line error when the weights cannot read this data set's tokens or examples."""
    run_options = {"dropout": cfg.dropout, "attn_dropout": cfg.attn_dropout}
    if resume_from:
        weights = load_checkpoint(resume_from, mmap=True)  # only model_args and meta are read
        model_args, state = {**weights["model_args"], **run_options}, None
        positions = weights["model_args"]["block_size"]
    else:
        weights = load_weights(cfg.init_from)
        state = clean_state_dict(weights["model"])
        learned = "wpe.weight" in state
        block_size = cfg.block_size
        if learned:
            block_size = min(block_size, weights["model_args"]["block_size"])
            state["wpe.weight"] = state["wpe.weight"][:block_size]  # the first positions
        model_args = {**weights["model_args"], "block_size": block_size, **run_options}
        check_shapes(state, model_args, cfg.init_from)
        positions = block_size
    where = resume_from or cfg.init_from
    check_vocabulary(weights.get("meta") or {}, model_args["vocab_size"], meta, where)
    if state is not None and meta["vocab_size"] > model_args["vocab_size"]:  # template tokens
        tied = model_args.get("tie_weights", True)
        state = with_new_rows(state, meta["vocab_size"], cfg.seed, tied)
        model_args = {**model_args, "vocab_size": meta["vocab_size"]}
    if meta.get("task") and positions < meta["example_len"] - 1:
        raise CheckpointError(f"{where} holds {positions} positions, fewer than the "
                              f"{meta['example_len'] - 1} tokens of a {meta['task']} example; "
                              "fine-tune a model with a longer block_size")
    return model_args, state


def with_new_rows(state, vocab_size, seed, tied=True) -> dict:
    """state with its token embedding (and the head) grown to vocab_size rows, for the template
    tokens a chat data set adds past the text's ids: each new row is the mean of the old ones,
    so the new tokens start as likely as an average one, plus a little seeded noise, so that
    they differ."""
    generator = torch.Generator().manual_seed(seed)

    def grown(table):
        noise = 0.02 * torch.randn(vocab_size - len(table), table.shape[1], generator=generator)
        return torch.cat([table, (table.float().mean(0) + noise).to(table.dtype)])

    new = {"wte.weight": grown(state["wte.weight"])}
    if "lm_head.weight" in state:
        new["lm_head.weight"] = new["wte.weight"] if tied else grown(state["lm_head.weight"])
    return {**state, **new}


def check_shapes(state, model_args, where):
    """A one-line error unless state holds exactly the tensors, with the shapes, of a GPT of
    model_args."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: v.shape for k, v in GPT(GPTConfig(**model_args)).state_dict().items()}
    problems = [f"no {k}" for k in expected if k not in state]
    problems += [f"an unknown {k}" for k in state if k not in expected]
    problems += [f"{k} is {list(state[k].shape)}, not {list(shape)}"
                 for k, shape in expected.items() if k in state and state[k].shape != shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{where} does not fit the model its config describes: "
                              f"{'; '.join(problems[:3])}{more}")


def check_vocabulary(weights_meta, vocab_size, meta, where):
    """A one-line error unless a model with vocab_size token embeddings, trained on tokens of
    weights_meta's tokenizer, can be fine-tuned on the data set of meta: the same tokenizer (for
    characters, the same list in the same order) and no token id beyond its embeddings."""
    kind, data_kind = weights_meta.get("tokenizer"), meta.get("tokenizer")
    if kind != data_kind:
        raise CheckpointError(f"{where} reads {kind} tokens, but this data set is tokenized by "
                              f"{data_kind}; fine-tune it on a data set prepared with the {kind} "
                              "tokenizer")
    vocab, data_vocab = weights_meta.get("vocab") or [], meta.get("vocab") or []
    if vocab != data_vocab:
        raise CheckpointError(f"{where} was trained on another character vocabulary "
                              f"({len(vocab)} characters) than this data set's "
                              f"({len(data_vocab)}); fine-tune it on data with the same vocabulary")
    if weights_meta.get("bpe") != meta.get("bpe"):
        raise CheckpointError(f"{where} was trained on another BPE than this data set's; fine-tune "
                              "it on data prepared with its tokenizer (or train from scratch)")
    text = meta.get("text_vocab_size", meta["vocab_size"])  # a chat set's template tokens are new
    if text > vocab_size:
        raise CheckpointError(f"{where} has {vocab_size} token embeddings, fewer than the {text} "
                              "of this data set's text")


# ---------------------------------------------------------------------------------- the log

class RunLog:
    """Log lines to stdout, one JSON record a line to out_dir/log.jsonl, and to wandb if asked.
    When closed it starts the drawing of out_dir/curves.png in the background."""

    def __init__(self, cfg, enabled):
        self.enabled, self.plot = enabled, cfg.plot
        self.path = Path(cfg.out_dir) / "log.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        if cfg.wandb_log:
            import wandb  # imported only when asked for: it is slow to import
            folder = os.environ.get("WANDB_DIR", cfg.out_dir)
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name,
                                    config=asdict(cfg), dir=folder)

    def write(self, line, record):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            values = {k: v for k, v in record.items() if k not in ("kind", "step")}
            self.wandb.log(values, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.enabled and self.plot:
            from tinygpt.plot import draw_in_background  # the picture is drawn after the run
            draw_in_background(self.path.parent)
