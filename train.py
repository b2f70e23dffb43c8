"""Train a GPT from a config file, on one device or many.

    python train.py configs/speedrun_cpu.py                        # a CPU run that beats nanoGPT's
    python train.py configs/shakespeare_char.py --max_iters=2000   # a config file, then overrides
    torchrun --standalone --nproc_per_node=8 train.py configs/shakespeare_char.py

A run resumes out_dir/ckpt.pt when there is one: a rerun or a torchrun restart continues, never
starting over on a trained model. Top to bottom: the options, the set-up, the training loop, and
the final evaluation.
"""
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model import GPT, GPTConfig
from tinygpt import checkpoint, common, data, device, optim, parallel
from tinygpt.common import must
from tinygpt.device import print0


@dataclass
class TrainConfig(GPTConfig):  # the model's fields and defaults come from GPTConfig
    vocab_size: int = 0                 # taken from the data set's meta.json; leave it at 0
    # I/O
    out_dir: str = "out"                # ckpt.pt (newest), best.pt (best val), log.jsonl
    init_from: str = "auto"             # auto: resume if any; resume; scratch; or weights to tune
    eval_interval: int = 250            # steps between evaluations; each one saves ckpt.pt
    eval_iters: int = 200               # batches per split in each evaluation
    log_interval: int = 10              # steps between log lines (the loop's only host syncs)
    # logging
    wandb_log: bool = False             # log to wandb too (WANDB_MODE=offline needs no network)
    wandb_project: str = "gpt"
    wandb_run_name: str = "run"
    plot: bool = True                   # at the end, draw out_dir/curves.png in the background
    # data
    dataset: str = "shakespeare_char"   # data/<dataset>, built by prepare.py when missing
    data_dir: str = "data"
    data_source: str = ""               # a local copy or URL for prepare.py (your own text file)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step, all processes together
    batch_size: int = 64                # sequences per micro-step, all processes together
    # AdamW
    learning_rate: float = 1e-3         # peak learning rate
    max_iters: int = 5000               # optimizer steps in all
    weight_decay: float = 0.1           # on matrices only, never on biases and norm gains
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # clip the gradient norm to this; 0 = no clipping
    muon_lr: float = 0.0                # > 0: Muon for the blocks' matrices, at this peak lr
    muon_momentum: float = 0.95
    # learning-rate schedule: linear warmup, then decay to min_lr at lr_decay_iters
    decay_lr: bool = True               # False: learning_rate throughout
    lr_schedule: str = "cosine"         # 'cosine' or 'linear' decay after the warmup
    warmup_iters: int = 100
    lr_decay_iters: int = 5000          # usually max_iters
    min_lr: float = 1e-4
    # system
    device: str = "auto"                # 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'
    dtype: str = "auto"                 # 'auto' (the fastest safe one), or a dtype's name
    compile: bool | None = None         # torch.compile the model; None = where it pays (CUDA)
    keep_freed_memory: bool = False     # glibc keeps freed memory: no fresh pages every step
    fast_exit: bool = False             # end the process at once when done, with no teardown
    fsdp: bool = False                  # under torchrun: shard weights, gradients, optimizer state
    checkpoint_activations: bool = False  # keep each block's input only; recompute it in backward
    sample_interval: int = 0            # > 0: print a greedy and a sampled continuation so often
    hellaswag_interval: int = 0         # > 0: score HellaSwag's validation set so often
    seed: int = 1337
    val_loss_bar: float = 0.0           # a published result: the final val loss is judged by it
    exact_match_bar: float = 0.0        # the exact-match share a task or a chat model must reach

    def __post_init__(self):
        super().__post_init__()
        must(self.vocab_size == 0, f"vocab_size={self.vocab_size}: leave it out; meta.json sets it")
        for name, allowed in {"lr_schedule": ("cosine", "linear"), "dtype": device.DTYPES}.items():
            must(getattr(self, name) in allowed,
                 f"{name}={getattr(self, name)!r}: use one of {', '.join(allowed)}")
        for name in ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                     "batch_size", "block_size", "n_layer", "n_head", "n_embd"):
            must(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        for name in ("max_iters", "warmup_iters", "seed", "grad_clip", "muon_lr", "min_lr",
                     "sample_interval", "hellaswag_interval"):
            must(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must not be negative")
        must(self.learning_rate > 0, f"learning_rate={self.learning_rate} must be positive")
        must(0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)")
        must(self.muon_lr == 0 or hasattr(torch.optim, "Muon"),
             f"muon_lr={self.muon_lr} needs torch.optim.Muon (torch >= 2.9); "
             f"this is torch {torch.__version__}")


# ------------------------------------------------------------------------------------ set-up

def prepared_data(cfg, dist) -> Path:
    """data_dir/dataset, built first where its meta.json is missing, once per node. A web corpus
    is never built here: its hours of work would end in the process group's timeout."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if (folder / "meta.json").is_file():
        return folder
    from tinygpt.datasets import prepare_for_training  # only a first run builds its data
    dist.on_each_node(prepare_for_training, cfg.dataset, cfg.data_dir, cfg.data_source)
    return folder


def build_model(cfg, model_args, dtype, start_weights, resume_from, meta, dist) -> tuple:
    """(model, optimizers, scaler, progress): a new model, the weights to fine-tune, or the state
    of resume_from (mapped, not read: processes share its pages). Built on the device in place,
    the same on every process, its whole weights in before FSDP shards it."""
    torch.manual_seed(cfg.seed)
    with torch.device(dist.device):
        model = GPT(GPTConfig(**model_args))
    saved = checkpoint.load_checkpoint(resume_from, mmap=True) if resume_from else None
    if saved:
        checkpoint.check_resumable(saved, model_args, meta, cfg.muon_lr > 0, resume_from)
    if saved or start_weights is not None:  # fine-tuning: a fresh optimizer from step 0
        model.load_state_dict(saved["model"] if saved else start_weights)
    # FSDP makes new parameters, so the model is spread before the optimizer takes them.
    model = parallel.spread(model, dist, cfg.fsdp, cfg.checkpoint_activations)
    betas = (cfg.beta1, cfg.beta2)
    optimizers = optim.make_optimizers(model, cfg.weight_decay, cfg.learning_rate, betas,
                                       dist.device, cfg.muon_lr, cfg.muon_momentum)
    scaler = parallel.grad_scaler(dist.device, dtype, sharded=parallel.is_sharded(model))
    progress = {"step": 0, "best_val_loss": math.inf, "best_step": None}
    if saved:
        checkpoint.restore_training_state(saved, optimizers, scaler)
        progress = {k: saved.get(k, progress[k]) for k in progress}
    return model, optimizers, scaler, progress


@dataclass
class Run:
    """What the set-up hands the training loop and the final evaluation."""
    model: GPT            # the weights, as saved
    train_model: object   # the same model, compiled and wrapped in DDP as configured
    compiled: object      # the model, compiled as configured: what evaluations call
    optimizers: list
    scaler: object
    batches: data.Batches
    ctx: object           # the autocast context of the forward passes
    dtype: str            # the compute dtype that ctx autocasts to
    log: checkpoint.RunLog
    micro_steps: int      # this process's micro-steps per optimizer step
    rows: int             # this process's sequences per micro-step
    peak: float | None    # the device's peak FLOP/s for MFU, once measured; 0 when unknown
    step: int             # optimizer steps done
    best_val_loss: float
    best_step: int | None  # the step that best.pt holds
    saved_step: int | None  # the step that ckpt.pt holds


def set_up(cfg, dist) -> Run:
    """Everything before the first step, in plain steps, each process building its own copy."""
    device.set_up_device(dist.device, cfg.keep_freed_memory)
    dist.on_every_process(checkpoint.check_init_from, cfg.init_from, dist)  # every node checks
    folder = prepared_data(cfg, dist)
    meta = data.load_meta(folder)
    to_resume = dist.on_master(checkpoint.checkpoint_to_resume, cfg.out_dir, cfg.init_from,
                               dist.attempt)
    resume_from = dist.from_master(to_resume)
    dist.on_every_process(checkpoint.check_visible, resume_from)  # every process reads it
    model_args, start_weights = dist.on_every_process(checkpoint.model_to_train, cfg, meta,
                                                      resume_from)
    dtype = device.model_dtype(cfg.dtype, dist.device, model_args)
    batches = data.Batches(folder, meta, model_args["block_size"], dist.device)
    micro_steps, rows = data.split_global_batch(cfg.gradient_accumulation_steps, cfg.batch_size,
                                                dist.world_size)
    free = device.free_memory_bytes(dist.device)  # a run that will not fit stops, naming what would
    plan = dist.on_every_process(parallel.checked_plan, cfg, model_args, dtype, rows, micro_steps,
                                 dist.world_size, free)
    print0(plan)
    model, optimizers, scaler, progress = dist.on_every_process(
        build_model, cfg, model_args, dtype, start_weights, resume_from, meta, dist)
    size = checkpoint.checkpoint_bytes(model)
    dist.on_master(checkpoint.check_free_space, cfg.out_dir, size)  # before anything is written
    if dist.rank > 0:  # dropout must differ between processes; checkpoints hold rank 0's stream
        seed = (cfg.seed, dist.rank, progress["step"])
        torch.manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    use_compile = device.capabilities(dist.device).compile if cfg.compile is None else cfg.compile
    compiled = torch.compile(model, dynamic=False) if use_compile else model
    log = dist.on_master(checkpoint.RunLog, cfg, True) or checkpoint.RunLog(cfg, enabled=False)
    shape = {k: v for k, v in model_args.items() if k != "vocab_size"}  # a fine-tune: the weights'
    print0(common.as_config_file(replace(cfg, **shape)))
    print0(f"device {dist.device}, dtype {dtype}, compile {use_compile}, {dist.world_size} "
           f"process(es), {model.num_params() / 1e6:.2f}M parameters")
    print0(f"tokens per optimizer step: {tokens_per_step(cfg, batches):,} = "
           f"{cfg.gradient_accumulation_steps} micro-steps x {cfg.batch_size} sequences x "
           f"{batches.seq_len} tokens; each process: {micro_steps} x {rows}")
    if resume_from:
        print0(f"resuming from {resume_from} at step {progress['step']} "
               f"(best val loss {progress['best_val_loss']:.4f})")
    elif start_weights is not None:
        print0(f"fine-tuning {cfg.init_from}: its weights and shape (block_size "
               f"{model_args['block_size']}), a fresh optimizer")
    return Run(model, parallel.data_parallel(compiled, dist), compiled, optimizers, scaler, batches,
               device.autocast_context(dist.device, dtype), dtype, log, micro_steps, rows, None,
               saved_step=progress["step"] if resume_from else None, **progress)


def tokens_per_step(cfg, batches) -> int:
    return cfg.gradient_accumulation_steps * cfg.batch_size * batches.seq_len


# ------------------------------------------------------------------------------------- train

def train(cfg, run, dist, argv) -> bool:
    """The loop: evaluate (and save) every eval_interval steps, then one optimizer step of
    micro-steps. False when a signal stopped it early, its state saved."""
    pending_losses = []  # per-step losses, read back at log steps only: reading syncs the device
    first_step = run.step
    timer = (time.perf_counter(), run.step)
    with device.StopSignal(announce=dist.is_master) as stop:
        while True:
            synced = run.step % cfg.log_interval == 0 or run.step == first_step
            if run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters:
                evaluate_and_save(cfg, run, dist, pending_losses)
                timer, synced = (time.perf_counter(), run.step), True  # time training only
            if (synced or not dist.enabled) and dist.any(stop.requested):
                save_when_stopped(cfg, run, dist, pending_losses, argv)
                return False
            if run.step >= cfg.max_iters:
                return True

            lr = optim.learning_rate_at(run.step, cfg)
            for group in (g for opt in run.optimizers for g in opt.param_groups):
                group["lr"] = group["peak_lr"] * lr / cfg.learning_rate
            global_picks = run.batches.random_picks(
                "train", data.batch_rng(cfg.seed, data.TRAIN_STREAM, run.step),
                (cfg.gradient_accumulation_steps, cfg.batch_size))
            picks = data.picks_of_rank(global_picks, dist.rank, dist.world_size)
            step_loss = torch.zeros((), device=dist.device)
            x, y = run.batches.batch("train", picks[0])
            for micro in range(run.micro_steps):
                if dist.enabled:  # sync the gradients once, after the last micro-step
                    parallel.sync_gradients(run.train_model, micro == run.micro_steps - 1)
                with run.ctx:
                    loss = run.train_model(x, y)[1] / run.micro_steps
                if micro + 1 < run.micro_steps:  # the next batch loads while the device computes
                    x, y = run.batches.batch("train", picks[micro + 1])
                run.scaler.scale(loss).backward()
                step_loss += loss.detach()
            optim.clip_and_step(run.optimizers, run.scaler, run.model.parameters(), cfg.grad_clip,
                                keep_grads=dist.enabled)
            run.step += 1
            pending_losses.append(step_loss)

            if run.step == 1 or run.step % cfg.log_interval == 0 or run.step == cfg.max_iters:
                losses = read_losses(pending_losses, run, dist, cfg.out_dir)
                timer = log_step(cfg, run, dist, lr, losses[-1], timer)


def read_losses(pending, run, dist, out_dir) -> list:
    """The losses kept on the device since the last read, as floats (the mean over processes):
    one host sync. A nan or inf stops the run, naming its step and what is kept."""
    if not pending:
        return []
    values = (dist.sum(torch.stack(pending)) / dist.world_size).tolist()
    first = run.step - len(pending) + 1
    pending.clear()
    for i, value in enumerate(values):
        if not math.isfinite(value):
            kept = checkpoint.kept_message(out_dir, run.saved_step)
            raise common.NonFiniteLossError(f"non-finite loss ({value}) at step {first + i}; "
                                            f"{kept}")
    return values


def log_step(cfg, run, dist, lr, loss, timer) -> tuple:
    """Log the loss, speed and MFU since the last log line (the peak measured at the first, out
    of the timed steps); return the new timer."""
    now, (since, since_step) = time.perf_counter(), timer
    seconds_per_step = (now - since) / max(1, run.step - since_step)
    if run.peak is None:
        run.peak = device.peak_flops(dist.device, run.dtype) if dist.is_master else 0.0
        peak = f"{run.peak:.4g} FLOP/s" if run.peak else "unknown (no MFU)"
        print0(f"peak for MFU: {peak}")
    tokens_per_s = tokens_per_step(cfg, run.batches) / seconds_per_step
    flops = run.model.flops_per_token(run.batches.seq_len) * tokens_per_s
    mfu = flops / (run.peak * dist.world_size) if run.peak else None
    mfu_text = "n/a" if mfu is None else f"{100 * mfu:.2f}%"
    run.log.write(f"step {run.step} | loss {loss:.4f} | lr {lr:.2e} | ms/step "
                  f"{1000 * seconds_per_step:.1f} | tok/s {tokens_per_s:,.0f} | mfu {mfu_text}",
                  {"kind": "train", "step": run.step, "loss": loss, "lr": lr,
                   "ms_per_step": 1000 * seconds_per_step, "tokens_per_s": tokens_per_s,
                   "mfu": mfu})
    return time.perf_counter(), run.step


def evaluate_and_save(cfg, run, dist, pending_losses):
    """Estimate and log the losses, then save ckpt.pt (and best.pt when val improved) if anything
    was trained since the last save, once the steps not yet logged are checked for a nan."""
    with parallel.whole_weights(run.model):  # FSDP: processes score different numbers of batches
        losses = data.estimate_loss(run.compiled, run.batches, cfg.eval_iters, cfg.batch_size,
                                    cfg.seed, run.step, run.ctx, dist, run.rows)
    if not all(map(math.isfinite, losses.values())):
        kept = checkpoint.kept_message(cfg.out_dir, run.saved_step)
        raise common.NonFiniteLossError(f"non-finite val loss ({losses['val']}) at step "
                                        f"{run.step}; {kept}")
    improved = losses["val"] < run.best_val_loss
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    bpb = {f"{split}_bpb": data.bits_per_byte(loss, run.batches.meta, split)
           for split, loss in losses.items()}
    run.log.write(f"eval step {run.step} | train loss {losses['train']:.4f} | val loss "
                  f"{losses['val']:.4f}{data.bpb_text(bpb['val_bpb'])} | best val "
                  f"{run.best_val_loss:.4f}", {"kind": "eval", "step": run.step, **losses, **bpb})
    if cfg.sample_interval and run.step and run.step % cfg.sample_interval == 0:
        from tinygpt.evaluation import continuations  # only runs that print samples need it
        run.log.write(*continuations(run.model, run.batches, run.step, dist))
    if cfg.hellaswag_interval and run.step % cfg.hellaswag_interval == 0:
        from tinygpt.hellaswag import score_while_training  # only runs that score it need it
        run.log.write(*score_while_training(run.model, run.batches.meta, cfg.data_dir, run.ctx,
                                            run.step, dist))
    if run.step == 0 or run.step == run.saved_step:
        return
    read_losses(pending_losses, run, dist, cfg.out_dir)
    if improved:
        run.best_step = run.step
    save(cfg, run, dist, improved, "val improved" if improved else "eval")


def save(cfg, run, dist, is_best, reason):
    state = checkpoint.training_checkpoint(run.model, run.optimizers, run.scaler, cfg,
                                           asdict(run.model.config), run.batches.meta, run.step,
                                           run.best_val_loss, run.best_step)
    dist.on_master(checkpoint.save_in_out_dir, cfg.out_dir, state, is_best, reason)
    run.saved_step = run.step


def save_when_stopped(cfg, run, dist, pending_losses, argv):
    """After Ctrl-C, SIGTERM or SIGHUP: save, and print the command that resumes. It keeps
    --init_from (a fine-tune's rerun resumes its ckpt.pt), but not 'scratch', which refuses it."""
    read_losses(pending_losses, run, dist, cfg.out_dir)
    if run.step != run.saved_step and run.step > 0:
        save(cfg, run, dist, False, "interrupted")
    argv = [a for a in argv if a != "--init_from=scratch"]
    launcher = "torchrun <your torchrun options> train.py" if dist.enabled else "python train.py"
    if run.saved_step is None:
        print0("interrupted before the first step; nothing was saved", flush=True)
    else:
        print0(f"interrupted at step {run.step}; resume with: {launcher} {shlex.join(argv)}",
               flush=True)


def final_evaluation(cfg, run, dist):
    """Score what sample.py loads by default (best.pt): the val loss, a task's or a chat's own."""
    best_path = Path(cfg.out_dir) / "best.pt"
    if run.best_step not in (None, run.step) and dist.from_master(best_path.is_file()):
        checkpoint.load_weights_from_master(run.model, best_path, dist)
        print0(f"final evaluation of {best_path}: step {run.best_step}, the best val loss")
    with parallel.whole_weights(run.model):
        records = data.final_report(run.model, run.batches, run.ctx, run.rows, cfg.val_loss_bar,
                                    cfg.exact_match_bar, dist)
    for record in records:
        run.log.write("", {**record, "step": run.step})


def set_up_train_and_evaluate(cfg, dist, argv):
    """The whole run. Its objects are freed when this returns, inside the process group: a DDP
    model freed after the group has ended deadlocks in gloo's teardown."""
    run = set_up(cfg, dist)
    try:
        if train(cfg, run, dist, argv):
            final_evaluation(cfg, run, dist)
    finally:
        run.log.close()


USAGE = """usage: python train.py [CONFIG_FILE ...] [--key=value ...]
       torchrun --standalone --nproc_per_node=N train.py [CONFIG_FILE ...] [--key=value ...]"""


def main(argv) -> int:
    if common.wants_help(argv):
        print(common.help_text(TrainConfig, USAGE, "Config files hold plain `name = value` lines; "
                                            "--key=value overrides them."))
        return 0
    try:
        cfg = common.parse_options(TrainConfig, argv, config_files=True)
        with device.torchrun_group(cfg.device) as dist:  # a plain `python` run is rank 0 of 1
            set_up_train_and_evaluate(cfg, dist, argv)
        if cfg.fast_exit:  # the log and checkpoints are closed: skip the slow teardown
            device.exit_process(0, at_once=True)
        return 0
    except common.EVERY_PROCESS_ERRORS as e:
        if device.torchrun_rank() == 0:  # every process raises the same error; one prints it
            print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; out_dir keeps the checkpoints saved so far, if any", file=sys.stderr)
        return 130


if __name__ == "__main__":
    device.exit_process(main(sys.argv[1:]))  # under torchrun at once: see exit_process
