"""The training loop against a second implementation: what train.py does to the weights, step by
step.

The reference below is written from the spec (DESIGN.md, TrainConfig's comments), not from train.py:
its own batches read straight from train.bin, AdamW from torch with decay on the matrices only, the
schedule's formula, gradient accumulation, clipping of the true (unscaled) gradient norm. A real
`python train.py` run must end with the weights and the per-step losses the reference reaches. One
comparison catches a schedule that never reaches the optimizer, clipping skipped or done on scaled
gradients, a wrong accumulation divisor, shifted targets, decay on the wrong parameters, a missing
zero_grad, and more (docs/testing.md).
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (
    full_split_loss_by_hand,
    load_meta_json,
    records,
    split_tokens,
    tiny_args,
    train_here,
    train_losses,
    weights,
)
from model import GPT, GPTConfig
from tools.evaluate import main as evaluate_main

SEED = 1337  # train.py's default seed: the initial weights and the batches follow from it


def scheduled_lr(step, peak, warmup, decay_iters, min_lr):
    """The spec: linear warmup to the peak over `warmup` steps ((step + 1) / (warmup + 1) of it),
    then a cosine from the peak down to min_lr at decay_iters, min_lr after."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    if step >= decay_iters:
        return min_lr
    angle = math.pi * (step - warmup) / (decay_iters - warmup)
    return min_lr + (peak - min_lr) * (1 + math.cos(angle)) / 2


def train_by_hand(data_dir, steps, *, accumulation, batch_size, block_size, lr, warmup,
                  decay_iters, min_lr, weight_decay, grad_clip, dtype="float32", betas=(0.9, 0.99),
                  **model):
    """(state_dict, per-step losses, gradient norms, GradScaler state) of `steps` optimizer steps as
    the spec describes them."""
    meta = load_meta_json(data_dir / "tiny")
    dtype_on_disk = np.dtype(meta["dtype"]).newbyteorder("<")
    tokens = np.fromfile(data_dir / "tiny" / "train.bin", dtype=dtype_on_disk)
    tokens = torch.from_numpy(tokens.astype(np.int64))
    torch.manual_seed(SEED)
    net = GPT(GPTConfig(block_size=block_size, vocab_size=meta["vocab_size"], **model)).train()
    # parameters() lists the tied matrix once.
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    gains = [p for p in net.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": weight_decay},
                                   {"params": gains, "weight_decay": 0.0}], lr=lr, betas=betas)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == "float16")
    autocast = torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32")
    losses, norms = [], []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = scheduled_lr(step, lr, warmup, decay_iters, min_lr)
        # The documented draw: window starts from a generator seeded by (seed, stream 0 = train,
        # step).
        starts = np.random.default_rng((SEED, 0, step, 0)).integers(0, len(tokens) - block_size,
                                                                    size=(accumulation, batch_size))
        step_loss = 0.0
        for micro in starts:
            x = torch.stack([tokens[s:s + block_size] for s in micro])
            # The next token of each.
            y = torch.stack([tokens[s + 1:s + 1 + block_size] for s in micro])
            with autocast:
                logits, _ = net(x, y)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / accumulation
            scaler.scale(loss).backward()
            step_loss += loss.item()
        scaler.unscale_(optimizer)
        norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters())).item()
        norms.append(norm)
        if grad_clip and norm > grad_clip:
            for p in net.parameters():
                p.grad.mul_(grad_clip / (norm + 1e-6))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
    return net.state_dict(), losses, norms, scaler.state_dict()


STEPS = 6
# warmup (steps 0-1), cosine (2-4), min_lr (5); two micro-steps; a clip that bites on some steps
# and not on others (the reference checks it did both); decay and lr large enough that a lost decay
# or step shows.
RUN = dict(accumulation=2, batch_size=8, block_size=16, lr=1e-2, warmup=2, decay_iters=5,
           min_lr=1e-3, weight_decay=0.5, n_layer=2, n_head=2, n_embd=32)
CLIP = {"float32": 1.25, "float16": 1.25}


def run_args(dtype, clip, **changes):
    r = {**RUN, **changes}
    return [f"--max_iters={STEPS}", f"--gradient_accumulation_steps={r['accumulation']}",
            f"--batch_size={r['batch_size']}", f"--learning_rate={r['lr']}",
            f"--warmup_iters={r['warmup']}", f"--lr_decay_iters={r['decay_iters']}",
            f"--min_lr={r['min_lr']}", f"--weight_decay={r['weight_decay']}",
            f"--grad_clip={clip}", f"--dtype={dtype}", "--eval_interval=1000"]


def fp16_or_skip():
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, ValueError) as e:
        pytest.skip(f"no float16 autocast on this CPU: {e}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_train_py_takes_the_steps_a_second_implementation_takes(tmp_path, data_dir, dtype):
    """float16 adds the GradScaler: the clip must see the unscaled gradients (unscale_ first), and a
    run stopped halfway and resumed must carry on with the scaler's state (its scale and its count
    of good steps, which decides when the scale grows) as one that never stopped."""
    if dtype == "float16":
        fp16_or_skip()
    clip = CLIP[dtype]
    reference = train_by_hand(data_dir, STEPS, grad_clip=clip, dtype=dtype, **RUN)
    expected, expected_losses, norms, expected_scaler = reference
    assert min(norms) < clip < max(norms), f"pick a clip between the gradient norms {norms}"
    out = tmp_path / "out"
    if dtype == "float16":
        halfway = tiny_args(data_dir, out, *run_args(dtype, clip), f"--max_iters={STEPS // 2}")
        train_here(halfway, cwd=tmp_path)
    train_here(tiny_args(data_dir, out, *run_args(dtype, clip)), cwd=tmp_path)
    assert torch.load(out / "ckpt.pt", weights_only=True)["scaler"] == expected_scaler
    tolerance = dict(rtol=0, atol=2e-6) if dtype == "float32" else dict(rtol=0, atol=2e-4)
    rel = 1e-5 if dtype == "float32" else 1e-3
    assert train_losses(out) == pytest.approx(dict(enumerate(expected_losses, 1)), rel=rel)
    got = weights(out)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, **tolerance, msg=lambda m: f"{name}: {m}")
    if dtype == "float32":  # the evaluation at the last step: each split's loss on its own batches
        model = GPT(GPTConfig(**torch.load(out / "ckpt.pt", weights_only=True)["model_args"]))
        model.load_state_dict(expected)
        [last] = [r for r in records(out, "eval") if r["step"] == STEPS]
        for part, split in enumerate(("train", "val")):
            by_hand = estimated_loss_by_hand(model, data_dir, split, part, STEPS)
            assert last[split] == pytest.approx(by_hand, rel=1e-5)


def estimated_loss_by_hand(model, data_dir, split, part, step, eval_iters=2, batch_size=8,
                           block_size=16):
    """The mean of eval_iters batch losses of a split, its windows drawn as the spec says: from a
    generator seeded by (seed, stream 1 = evaluation, step, part 0 = train / 1 = val)."""
    tokens = split_tokens(data_dir / "tiny", split)
    starts = np.random.default_rng((SEED, 1, step, part)).integers(0, len(tokens) - block_size,
                                                                   size=(eval_iters, batch_size))
    model.eval()
    with torch.no_grad():
        batches = ((torch.stack([tokens[s:s + block_size] for s in row]),
                    torch.stack([tokens[s + 1:s + 1 + block_size] for s in row])) for row in starts)
        losses = [F.cross_entropy(model(x, x)[0].flatten(0, 1), y.flatten()).item()
                  for x, y in batches]
    return sum(losses) / len(losses)


def test_the_optimizer_runs_at_the_scheduled_lr_not_the_peak(tmp_path, data_dir):
    """The learning rate the optimizers hold after the first step is the schedule's, worked out by
    hand, for AdamW and for Muon from its own peak; and AdamW's first step moves each weight by the
    lr itself (m / sqrt(v) = g / |g|), so the size of that step shows the lr the weights really got
    (a log could show a schedule the optimizer never saw). Later steps: the second implementation
    above."""
    out = tmp_path / "one"
    peak, warmup, muon_peak = 1e-2, 4, 0.02
    train_here(tiny_args(data_dir, out, "--max_iters=1", f"--learning_rate={peak}",
                         f"--warmup_iters={warmup}", f"--muon_lr={muon_peak}", "--weight_decay=0",
                         "--grad_clip=0", "--eval_interval=1000"),
               cwd=tmp_path)
    first = peak / (warmup + 1)  # the first warmup step: a fifth of the peak
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(g["lr"] == pytest.approx(first) for g in checkpoint["optimizer"]["param_groups"])
    muon_first = muon_peak / (warmup + 1)
    assert all(g["lr"] == pytest.approx(muon_first) for g in checkpoint["muon"]["param_groups"])
    torch.manual_seed(SEED)
    initial = GPT(GPTConfig(**checkpoint["model_args"])).state_dict()
    # An AdamW matrix (Muon takes the blocks' matrices).
    moved = (checkpoint["model"]["wpe.weight"] - initial["wpe.weight"]).abs()
    moved = moved[moved > 0]  # the positions a batch of 16 tokens reaches: all of them
    assert moved.max().item() == pytest.approx(first, rel=1e-3)  # not the peak, 5x larger
    assert moved.median().item() == pytest.approx(first, rel=0.05)


# ------------------------------------------ best.pt across a resume, and the final evaluation

def test_a_resumed_run_keeps_best_pt_when_its_evaluations_are_worse_and_reports_on_best_pt(
        tmp_path, data_dir, capsys):
    """The best val loss and its step come back with a resume: evaluations after it that are worse
    than the step-20 one (a learning rate far too high) leave best.pt alone, and the run's final
    evaluation is of best.pt, the weights sample.py and the tools load by default, not of the last
    ones."""
    out = tmp_path / "out"
    train_here(tiny_args(data_dir, out, "--max_iters=20", "--eval_interval=10"), cwd=tmp_path)
    best_before = (out / "best.pt").read_bytes()
    assert torch.load(out / "best.pt", weights_only=True)["step"] == 20
    # Evaluations at 21 and 22, none at 20 where the run resumes: only the restored best val loss
    # can tell.
    train_here(tiny_args(data_dir, out, "--max_iters=22", "--eval_interval=3",
                         "--learning_rate=0.1", "--decay_lr=False"), cwd=tmp_path)
    evals = {r["step"]: r["val"] for r in records(out, "eval")}
    # The premise: both later evaluations are worse.
    assert sorted(evals) == [0, 10, 20, 21, 22] and min(evals[21], evals[22]) > evals[20]
    assert (out / "best.pt").read_bytes() == best_before
    newest = torch.load(out / "ckpt.pt", weights_only=True)
    assert newest["step"] == 22 and newest["best_step"] == 20
    assert newest["best_val_loss"] == min(evals.values())

    final = records(out, "final")[-1]
    best_model = GPT(GPTConfig(**newest["model_args"]))
    best_model.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
    loss, tokens = full_split_loss_by_hand(best_model, data_dir / "tiny")
    assert final["val_tokens"] == tokens and final["val_loss_full"] == pytest.approx(loss, rel=1e-5)
    last_model = GPT(GPTConfig(**newest["model_args"]))
    last_model.load_state_dict(newest["model"])
    # The last weights, the ones it must not judge, score worse.
    assert full_split_loss_by_hand(last_model, data_dir / "tiny")[0] > loss + 0.01
    # the tools load best.pt by default too: evaluate reports best.pt's loss
    capsys.readouterr()  # what the training runs printed
    assert evaluate_main([f"--out_dir={out}", "--device=cpu"]) == 0
    reported = re.search(r"final val loss \(full split, [\d,]+ tokens\): ([\d.]+)",
                         capsys.readouterr().out)
    assert float(reported.group(1)) == pytest.approx(loss, abs=1.5e-4)
