"""Train a GPT from a config file, on one device or many.

    python train.py configs/speedrun_cpu.py                          # a CPU run that beats nanoGPT's
    python train.py configs/shakespeare_char.py --max_iters=2000     # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/shakespeare_char.py
    python train.py configs/finetune_shakespeare.py                  # fine-tune GPT-2 (--init_from=gpt2-xl)

A run resumes out_dir/ckpt.pt when there is one (a rerun or a torchrun restart continues, it never
starts over on top of a trained model). Reads top to bottom: the options, the learning-rate
schedule, the log and the stop signal, the model's set-up, then train(): set-up, the loop, the
final evaluation.
"""
import json
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from tinygpt.checkpoint import (check_free_space, check_resumable, check_visible, checkpoint_bytes, checkpoint_to_resume,
                                kept_message, load_checkpoint, load_weights_from_master, restore_rng_states,
                                save_training_state, training_state)
from tinygpt.common import EVERY_PROCESS_ERRORS, ConfigError, NonFiniteLossError
from tinygpt.data import (TRAIN_STREAM, Batches, batch_rng, load_meta, picks_of_rank, prepare_if_missing,
                          split_global_batch)
from tinygpt.device import (DTYPES, any_rank, autocast_context, broadcast_from_master, collectively,
                            compile_by_default, data_parallel, device_type, exit_process, grad_scaler, model_dtype,
                            peak_flops, print0, set_up_device, sum_over_ranks, torchrun_group, torchrun_rank)
from tinygpt.evaluation import estimate_loss, final_report
from tinygpt.gpt2 import GPT2_NAMES, weights_to_fine_tune
from tinygpt.optim import clip_and_step, load_optimizer_state, make_optimizers
from tinygpt.options import as_config_file, help_text, must, parse_options, wants_help
from tinygpt.plot import draw_in_background


@dataclass
class TrainConfig(GPTConfig):  # the model's fields and defaults come from GPTConfig
    vocab_size: int = 0                 # taken from the data set's meta.json; leave at 0
    # I/O
    out_dir: str = "out"                # ckpt.pt (newest state), best.pt (best val), log.jsonl, config.json
    init_from: str = "auto"             # resume out_dir/ckpt.pt: 'auto' if any, 'resume' must, 'scratch' never; else weights to fine-tune
    eval_interval: int = 250            # steps between evaluations; each one saves ckpt.pt (and best.pt if val improved)
    eval_iters: int = 200               # batches per split in each evaluation
    log_interval: int = 10              # steps between log lines (the only host syncs of the loop)
    # logging
    wandb_log: bool = False             # log to wandb too (WANDB_MODE=offline works without a network)
    wandb_project: str = "gpt"
    wandb_run_name: str = "run"
    plot: bool = True                   # at the end, draw out_dir/curves.png in a detached low-priority process
    # data
    dataset: str = "shakespeare_char"   # data/<dataset>, built by prepare.py when missing
    data_dir: str = "data"
    data_source: str = ""               # a local copy or URL for prepare.py (a text file for your own data set)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, over all processes together
    batch_size: int = 64                # sequences per micro-step, over all processes together
    # AdamW
    learning_rate: float = 1e-3         # peak learning rate
    max_iters: int = 5000               # optimizer steps in all
    weight_decay: float = 0.1           # on matrices only, never on biases and norm gains
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # clip the gradient norm to this; 0 = no clipping
    muon_lr: float = 0.0                # > 0: Muon (torch >= 2.9) for the 2-D weights in the blocks, at this peak lr
    muon_momentum: float = 0.95
    # learning-rate schedule: linear warmup, then decay to min_lr at lr_decay_iters
    decay_lr: bool = True               # False: learning_rate throughout
    lr_schedule: str = "cosine"         # 'cosine' or 'linear' decay after the warmup
    warmup_iters: int = 100
    lr_decay_iters: int = 5000          # usually max_iters
    min_lr: float = 1e-4
    # system
    device: str = "auto"                # 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'
    dtype: str = "auto"                 # 'auto' (bf16 where fast, else fp16 on CUDA, else fp32), 'float32', 'bfloat16', 'float16'
    compile: bool | None = None         # torch.compile the model; None = on for CUDA only
    keep_freed_memory: bool = False     # glibc: reuse freed memory, no fresh pages per step (device.py)
    fast_exit: bool = False             # end the process at once when done: no teardown of torch's modules
    seed: int = 1337
    val_loss_bar: float = 0.0           # a published result: the final full-split val loss is judged PASS/FAIL against it
    exact_match_bar: float = 0.0        # exact match to reach: task test, chat's taught replies

    def __post_init__(self):
        super().__post_init__()
        must(self.vocab_size == 0, f"vocab_size={self.vocab_size}: it comes from the data set's meta.json; leave it out")
        for name, allowed in {"lr_schedule": ("cosine", "linear"), "dtype": DTYPES}.items():
            must(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                     "block_size", "n_layer", "n_head", "n_embd"):
            must(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_iters", "warmup_iters", "seed", "grad_clip", "muon_lr", "min_lr"):
            must(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must not be negative")
        must(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be positive (the schedule scales from it)")
        must(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        must(self.muon_lr == 0 or hasattr(torch.optim, "Muon"),
             f"muon_lr={self.muon_lr} needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")


def check_init_from(init_from, dist):
    """Every process checks, once the job's group is joined (collectively): a node without the weights to
    fine-tune then stops the whole job with one line, instead of leaving its peers waiting for it."""
    where = f" on rank {dist.rank}'s node (every node needs them)" if dist.enabled else ""
    must(init_from in ("auto", "resume", "scratch", *GPT2_NAMES) or Path(init_from).exists(),
         f"init_from={init_from!r}: no such file or folder{where} (train that run first?); use auto, resume, "
         f"scratch, {', '.join(GPT2_NAMES)} or the path of weights to fine-tune")


def model_args_of(cfg, vocab_size) -> dict:
    return {f.name: getattr(cfg, f.name) for f in fields(GPTConfig)} | {"vocab_size": vocab_size}


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


class RunLog:
    """Log lines to stdout, one JSON record per line to out_dir/log.jsonl, and to wandb if asked; when
    closed, the picture of the curves (tinygpt/plot.py)."""

    def __init__(self, cfg, enabled):
        self.enabled, self.plot = enabled, cfg.plot
        self.path = Path(cfg.out_dir) / "log.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        (self.path.parent / "config.json").write_text(json.dumps(asdict(cfg), indent=1))  # this run's options
        if cfg.wandb_log:
            import wandb  # imported only when asked for: it is slow to import
            self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.wandb_run_name, config=asdict(cfg),
                                    dir=os.environ.get("WANDB_DIR", cfg.out_dir))

    def write(self, line, record):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.enabled and self.plot:
            draw_in_background(self.path.parent)


class StopSignal:
    """SIGINT/SIGTERM set a flag instead of killing the process, so the loop can finish its step and save."""

    def __init__(self, announce=True):
        self.requested, self.previous, self.announce = False, {}, announce

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.announce and not self.requested:  # torchrun relays a Ctrl-C to every rank, more than once
            print(f"{signal.Signals(signum).name} received: finishing this step, then saving", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def build_training_state(cfg, model_args, meta, device, dtype, resume_from=None, start_weights=None):
    """(model, optimizers, scaler, resumed) on device, restored from resume_from or holding start_weights (a state
    dict to fine-tune) if given; resumed is the checkpoint's step, best_val_loss and best_step (None for a new run).

    The checkpoint is loaded to the CPU: load_state_dict copies weights and optimizer moments to
    the parameters' device, the RNG states stay on the host where they are used, and the host copy
    is dropped when this returns."""
    checkpoint = load_checkpoint(resume_from, mmap=True) if resume_from else None  # processes share the pages
    if checkpoint:
        check_resumable(checkpoint, model_args, meta, cfg.muon_lr > 0, resume_from)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process
    with torch.device(device):  # built in place: no copy, and tied weights stay tied
        model = GPT(GPTConfig(**model_args))
    optimizers = make_optimizers(model, cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type(device),
                                 muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum)
    for group in (g for optimizer in optimizers for g in optimizer.param_groups):
        group["peak_lr"] = group["lr"]  # the schedule scales each group's own peak
    scaler = grad_scaler(device, dtype)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, [checkpoint["optimizer"], checkpoint.get("muon")]):
            load_optimizer_state(optimizer, state)  # this run's lr, betas, decay and kernel, not the checkpoint's
        if checkpoint.get("scaler"):
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint["rng"])
    elif start_weights is not None:  # fine-tuning: these weights, with a fresh optimizer and schedule from step 0
        model.load_state_dict(start_weights)
    resumed = checkpoint and {"step": checkpoint["step"], "best_val_loss": checkpoint.get("best_val_loss", math.inf),
                              "best_step": checkpoint.get("best_step")}
    return model, optimizers, scaler, resumed


def read_losses(pending, step, dist, kept) -> list:
    """The losses of the steps up to `step` kept on the device since the last read, as floats (mean
    over processes): one host sync. A nan or inf stops the run, naming its step and what is kept."""
    if not pending:
        return []
    values = (sum_over_ranks(torch.stack(pending), dist) / dist.world_size).tolist()
    first = step - len(pending) + 1
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise NonFiniteLossError(f"non-finite loss ({value}) at step {first + i}; {kept}")
    return values


def train(cfg, argv, dist) -> int:
    """Set up, run the loop, then the final evaluation, in this process: torchrun's rank dist.rank, or the only one."""
    # ---------------------------------------------------------------------------------- set-up
    device, master = dist.device, dist.is_master
    set_up_device(device, cfg.keep_freed_memory)
    out_dir = Path(cfg.out_dir)
    log = None
    try:
        collectively(dist, "all", check_init_from, cfg.init_from, dist)  # on every node
        collectively(dist, "node", prepare_if_missing, cfg.dataset, cfg.data_dir, cfg.data_source)
        folder = Path(cfg.data_dir) / cfg.dataset
        meta = load_meta(folder)
        resume_from = broadcast_from_master(collectively(dist, "master", checkpoint_to_resume, cfg, dist.attempt), dist)
        collectively(dist, "all", check_visible, resume_from)  # every process reads it (on every node)
        model_args, start_weights = model_args_of(cfg, meta["vocab_size"]), None
        if cfg.init_from not in ("auto", "resume", "scratch"):  # fine-tuning: the model's shape is the weights'
            cfg, model_args, start_weights = collectively(dist, "all", weights_to_fine_tune, cfg, meta, resume_from)
        dtype = model_dtype(cfg.dtype, device, model_args)  # the model's own config: a fine-tune's is its weights'
        ctx = autocast_context(device, dtype)
        batches = Batches(folder, meta, cfg.block_size, device)
        if batches.task and cfg.block_size < batches.seq_len:
            raise ConfigError(f"block_size={cfg.block_size} is shorter than the {batches.seq_len} tokens "
                              f"a {batches.task} example feeds the model; set block_size={batches.seq_len}")
        try:  # this process's share of the global batch, the same for any number of processes
            micro_steps, rows = split_global_batch(cfg.gradient_accumulation_steps, cfg.batch_size, dist.world_size)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        model, optimizers, scaler, resumed = collectively(dist, "all", build_training_state, cfg, model_args, meta, device,
                                                          dtype, resume_from, start_weights)
        collectively(dist, "master", check_free_space, out_dir, checkpoint_bytes(model))  # before anything is written
        resumed = resumed or {"step": 0, "best_val_loss": math.inf, "best_step": None}
        step = resumed["step"]  # optimizer steps done; the next one is step + 1
        best_val_loss, best_step = resumed["best_val_loss"], resumed["best_step"]  # best.pt holds best_step
        saved_step = step if resume_from else None
        if dist.rank > 0:  # dropout must differ between processes; the checkpoint holds rank 0's stream
            torch.manual_seed(int(np.random.SeedSequence((cfg.seed, dist.rank, step)).generate_state(1)[0]))
        use_compile = compile_by_default(device) if cfg.compile is None else cfg.compile
        compiled = torch.compile(model, dynamic=False) if use_compile else model  # eval and train shapes: static graphs
        train_model = data_parallel(compiled, dist)  # DDP over the compiled model
        print0(as_config_file(cfg))
        log = collectively(dist, "master", RunLog, cfg, True) or RunLog(cfg, enabled=False)
        peak = peak_flops(device, dtype) if master else 0.0
        tokens_per_step = cfg.gradient_accumulation_steps * cfg.batch_size * batches.seq_len
        print0(f"device {device}, dtype {dtype}, compile {use_compile}, {dist.world_size} process(es), "
            f"{model.num_params() / 1e6:.2f}M parameters")
        print0(f"tokens per optimizer step: {tokens_per_step:,} = {cfg.gradient_accumulation_steps} micro-steps x "
            f"{cfg.batch_size} sequences x {batches.seq_len} tokens; each process: {micro_steps} x {rows}")
        print0(f"peak for MFU: {f'{peak:.4g} FLOP/s' if peak else 'unknown for this device (MFU n/a)'}")
        if resume_from:
            print0(f"resuming from {resume_from} at step {step} (best val loss {best_val_loss:.4f})")
        elif start_weights is not None:
            print0(f"fine-tuning {cfg.init_from}: its weights and shape (block_size {cfg.block_size}), a fresh optimizer")
            start_weights = None  # the model holds them now; drop the host copy

        # -------------------------------------------------------------------------------- the loop
        pending_losses = []  # per-step loss tensors, read back at log steps only (reading syncs the device)
        timer = (time.perf_counter(), step)
        with StopSignal(announce=master) as stop:
            while True:
                if step % cfg.eval_interval == 0 or step == cfg.max_iters:  # evaluate (every process its share)
                    losses = estimate_loss(compiled, batches, cfg.eval_iters, cfg.batch_size, cfg.seed, step, ctx, dist, rows)
                    if not all(map(math.isfinite, losses.values())):
                        raise NonFiniteLossError(f"non-finite val loss ({losses['val']}) at step {step}; "
                                                 f"{kept_message(out_dir, saved_step)}")
                    improved = losses["val"] < best_val_loss
                    best_val_loss = min(best_val_loss, losses["val"])
                    log.write(f"eval step {step} | train loss {losses['train']:.4f} | val loss {losses['val']:.4f} "
                              f"| best val {best_val_loss:.4f}", {"kind": "eval", "step": step, **losses})
                    if step > 0 and step != saved_step:  # never a bad state: check the steps not yet logged
                        read_losses(pending_losses, step, dist, kept_message(out_dir, saved_step))
                        if improved:
                            best_step = step
                        state = training_state(model, optimizers, scaler, cfg, model_args, meta, step, best_val_loss,
                                               best_step)
                        reason = "val improved" if improved else "eval"
                        collectively(dist, "master", save_training_state, out_dir, state, improved, reason)
                        saved_step = step
                    timer = (time.perf_counter(), step)  # ms/step measures training, not evaluation
                if step >= cfg.max_iters:
                    break

                # one optimizer step: micro-steps of this process's share, gradients synced on the last
                lr = learning_rate_at(step, cfg)
                for group in (g for opt in optimizers for g in opt.param_groups):
                    group["lr"] = group["peak_lr"] * lr / cfg.learning_rate
                global_picks = batches.random_picks("train", batch_rng(cfg.seed, TRAIN_STREAM, step),
                                                    (cfg.gradient_accumulation_steps, cfg.batch_size))
                picks = picks_of_rank(global_picks, dist.rank, dist.world_size)
                step_loss = torch.zeros((), device=device)
                x, y = batches.batch("train", picks[0])
                for micro in range(micro_steps):
                    if dist.enabled:  # all-reduce gradients once, after the last micro-step
                        train_model.require_backward_grad_sync = micro == micro_steps - 1
                    with ctx:
                        loss = train_model(x, y)[1] / micro_steps
                    if micro + 1 < micro_steps:
                        x, y = batches.batch("train", picks[micro + 1])  # loads while the device computes
                    scaler.scale(loss).backward()
                    step_loss += loss.detach()
                clip_and_step(optimizers, scaler, model.parameters(), cfg.grad_clip, keep_grads=dist.enabled)
                step += 1
                pending_losses.append(step_loss)

                # log, and check for nan and for a stop signal, where the loop syncs anyway
                synced = step == 1 or step % cfg.log_interval == 0 or step == cfg.max_iters
                if synced:
                    values = read_losses(pending_losses, step, dist, kept_message(out_dir, saved_step))
                    now, (since, since_step) = time.perf_counter(), timer
                    seconds_per_step, timer = (now - since) / max(1, step - since_step), (now, step)
                    tokens_per_s = tokens_per_step / seconds_per_step
                    mfu = None
                    if peak:
                        mfu = model.flops_per_token(batches.seq_len) * tokens_per_s / (peak * dist.world_size)
                    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.2f}%"
                    log.write(f"step {step} | loss {values[-1]:.4f} | lr {lr:.2e} | ms/step {1000 * seconds_per_step:.1f} "
                              f"| tok/s {tokens_per_s:,.0f} | mfu {mfu_text}",
                              {"kind": "train", "step": step, "loss": values[-1], "lr": lr,
                               "ms_per_step": 1000 * seconds_per_step, "tokens_per_s": tokens_per_s, "mfu": mfu})
                if (synced or not dist.enabled) and any_rank(stop.requested, dist):
                    read_losses(pending_losses, step, dist, kept_message(out_dir, saved_step))
                    state = training_state(model, optimizers, scaler, cfg, model_args, meta, step, best_val_loss,
                                           best_step)
                    collectively(dist, "master", save_training_state, out_dir, state, False, "interrupted")
                    argv = [a for a in argv if not a.startswith("--init_from=")]
                    launcher = "torchrun <your torchrun options> train.py" if dist.enabled else "python train.py"
                    print0(f"interrupted at step {step}; resume with: {launcher} {shlex.join(argv)}", flush=True)
                    return 0

        # ------------------------------------------------------------------ the final evaluation
        best_path = out_dir / "best.pt"  # judge what sample.py loads by default; rank 0's file decides
        if best_step not in (None, step) and broadcast_from_master(best_path.is_file(), dist):
            load_weights_from_master(model, best_path, dist)
            print0(f"final evaluation of {best_path}: step {best_step}, the best val loss of the run")
        for record in final_report(model, batches, ctx, rows, cfg.val_loss_bar, cfg.exact_match_bar, dist):
            log.write("", {**record, "step": step})
        return 0
    finally:
        if log is not None:
            log.close()


USAGE = """usage: python train.py [CONFIG_FILE ...] [--key=value ...]
       torchrun --standalone --nproc_per_node=N train.py [CONFIG_FILE ...] [--key=value ...]"""


def main(argv) -> int:
    if wants_help(argv):
        print(help_text(TrainConfig, USAGE, "Config files are plain `name = value` lines; --key=value overrides them."))
        return 0
    try:
        cfg = parse_options(TrainConfig, argv, config_files=True)
        with torchrun_group(cfg.device) as dist:  # a plain `python` run is rank 0 of 1
            code = train(cfg, argv, dist)
        if cfg.fast_exit:  # the log and checkpoints are closed: skip the interpreter's slow teardown
            exit_process(code, at_once=True)
        return code
    except EVERY_PROCESS_ERRORS as e:
        if torchrun_rank() == 0:  # every process raises the same error; one prints it
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; out_dir keeps the checkpoints saved so far, if any", file=sys.stderr)
        return 130


if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # under torchrun at once: see exit_process
