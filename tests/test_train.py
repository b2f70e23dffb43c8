"""train.py as a specification: it trains, resumes exactly, scales across processes, never starts
over on top of a trained model, and fails clearly.

Most tests run the real CLI (`python train.py`, `torchrun`) on a tiny model and real data files
made by prepare.py in a temp folder, and read what it wrote: stdout, log.jsonl, ckpt.pt.
"""
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    ENV,
    REPO,
    TINY,
    assert_one_line_error,
    assert_same_weights,
    records,
    run_script,
    run_train,
    tiny_args,
    tiny_text,
    torchrun,
    train_here,
    train_losses,
    train_refusing,
    weights,
)
from model import GPT, GPTConfig
from tinygpt.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    model_to_train,
    save_checkpoint,
)
from tinygpt.common import CheckpointError, ConfigError, parse_options
from tinygpt.data import Batches, exact_match_accuracy, picks_of_rank, split_global_batch
from tinygpt.device import Dist, model_dtype
from tinygpt.optim import learning_rate_at
from train import TrainConfig, build_model

TRAIN = str(REPO / "train.py")


# ---------------------------------------------------------------------------------- training

def test_tiny_config_file_trains_and_loss_falls_well_below_initial(tmp_path):
    """A config file plus overrides, data prepared on the fly from --data_source, 100 steps."""
    source = tmp_path / "mytext.txt"
    source.write_text(tiny_text(seed=1))
    config = tmp_path / "tiny_config.py"
    config.write_text('"""A tiny run."""\n# comments are fine\nmax_iters = 100\n'
                      "lr_decay_iters = 100\neval_interval = 50\nbatch_size = 4\n")
    out = tmp_path / "out"
    result = run_train([config, *TINY, "--batch_size=8", f"--data_dir={tmp_path / 'data'}",
                        "--dataset=mytext", f"--data_source={source}", f"--out_dir={out}"],
                       cwd=tmp_path)

    losses = train_losses(out)
    vocab = json.loads((tmp_path / "data" / "mytext" / "meta.json").read_text())["vocab_size"]
    assert abs(losses[1] - math.log(vocab)) < 0.3  # starts at chance
    assert losses[100] < 0.6 * losses[1]
    stdout = result.stdout
    assert "step 100 | loss " in stdout and "| ms/step " in stdout and "| mfu " in stdout
    assert "final val loss (full split, " in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 8 and saved["max_iters"] == 100  # the override beat the file
    assert "max_iters = 100" in result.stdout  # the effective config is printed


SHORT_STEPS = 10


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory):
    """out_dir of a 10-step run (one eval, at the end); copy its ckpt.pt before changing
    anything."""
    out = tmp_path_factory.mktemp("short")
    train_here(tiny_args(data_dir, out, f"--max_iters={SHORT_STEPS}", "--eval_interval=1000"),
               cwd=out)
    return out


def copy_of_run(run_dir, tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    return out


def test_checkpoint_is_a_plain_dict_other_tools_can_read(short_run):
    out = short_run
    checkpoint = load_checkpoint(out / "ckpt.pt")
    assert {"model", "optimizer", "scaler", "config", "model_args", "meta", "step", "best_val_loss",
            "best_step", "rng"} <= checkpoint.keys()
    assert checkpoint["step"] == SHORT_STEPS and math.isfinite(checkpoint["best_val_loss"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert checkpoint["meta"]["vocab_size"] == checkpoint["model_args"]["vocab_size"]
    model = model_from_checkpoint(checkpoint)
    assert not model.training
    idx = torch.zeros((1, 4), dtype=torch.long)
    logits, _ = model(idx)
    assert logits.shape == (1, 1, checkpoint["model_args"]["vocab_size"])
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


STRAIGHT_STEPS = 150  # long enough that a SIGTERM sent at step 5 lands mid-run
RESUME_ARGS = ["--dropout=0.1", "--gradient_accumulation_steps=2",
               f"--lr_decay_iters={STRAIGHT_STEPS}", "--eval_interval=60"]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """An uninterrupted run of STRAIGHT_STEPS steps, with dropout and gradient accumulation."""
    out = tmp_path_factory.mktemp("straight")
    train_here(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={STRAIGHT_STEPS}"), cwd=out)
    return out


def test_resume_halfway_matches_uninterrupted_run_bitwise(tmp_path, data_dir, straight_run):
    out = tmp_path / "out"
    half = STRAIGHT_STEPS // 2 + 7  # not on an eval step
    # The resume: a process.
    train_here(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={half}"), cwd=tmp_path)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == half
    result = run_train(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={STRAIGHT_STEPS}",
                                 "--init_from=resume"),
                       cwd=tmp_path)
    assert f"resuming from {out / 'ckpt.pt'} at step {half}" in result.stdout
    assert train_losses(out) == train_losses(straight_run)  # every step's loss, exactly
    assert_same_weights(weights(out), weights(straight_run))


def run_until_sigterm(args, cwd, after_step):
    """Start train.py, send SIGTERM once it logs `after_step`; (the step it stopped at, its
    stdout)."""
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = []
    for line in proc.stdout:  # wait until training is under way
        output.append(line)
        if line.startswith(f"step {after_step} |"):
            proc.send_signal(signal.SIGTERM)
            break
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(output) + stdout
    assert proc.returncode == 0, stdout[-2000:] + stderr
    stopped = [line for line in stdout.splitlines() if line.startswith("interrupted at step ")]
    assert stopped, f"the run was not interrupted:\n{stdout[-2000:]}"
    return int(stopped[0].split()[3].rstrip(";")), stdout


def test_sigterm_saves_and_resume_matches_uninterrupted_run_bitwise(tmp_path, data_dir,
                                                                    straight_run):
    out = tmp_path / "out"
    step, stdout = run_until_sigterm(tiny_args(data_dir, out, *RESUME_ARGS,
                                               f"--max_iters={STRAIGHT_STEPS}"),
                                     tmp_path, after_step=5)
    assert 5 <= step < STRAIGHT_STEPS
    stopped = [line for line in stdout.splitlines() if line.startswith("interrupted at step ")]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step

    command = shlex.split(stopped[0].split("resume with: ", 1)[1])  # run the command it printed
    assert command[:2] == ["python", "train.py"]
    run_train(command[2:], cwd=tmp_path)
    assert_same_weights(weights(out), weights(straight_run))
    straight = train_losses(straight_run)
    resumed = train_losses(out)
    assert ({s: v for s, v in resumed.items() if s > step}
            == {s: v for s, v in straight.items() if s > step})


def test_best_pt_keeps_the_best_val_state_when_a_newer_ckpt_pt_is_not_better(tmp_path, data_dir):
    out = tmp_path / "out"
    train_here(tiny_args(data_dir, out, "--max_iters=20", "--eval_interval=10"), cwd=tmp_path)
    best = load_checkpoint(out / "best.pt")
    assert best["step"] == best["best_step"] == 20  # loss still falls fast at step 20: a new best
    assert_same_weights(best["model"], weights(out))
    # the interrupted state has no val loss of its own,
    # so it is saved as the newest state, not the best
    args = tiny_args(data_dir, out, "--max_iters=5000", "--eval_interval=1000")
    step, _ = run_until_sigterm(args, tmp_path, after_step=25)
    assert load_checkpoint(out / "ckpt.pt")["step"] == step > 20
    kept = load_checkpoint(out / "best.pt")
    assert kept["step"] == 20 and kept["best_val_loss"] == best["best_val_loss"]
    assert_same_weights(kept["model"], best["model"])


def test_rerunning_a_command_resumes_and_never_starts_over_on_a_trained_model(tmp_path, data_dir,
                                                                              short_run, capsys):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "best.pt"):
        (out / name).write_bytes((short_run / name).read_bytes())
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.pt")}
    again = run_train(tiny_args(data_dir, out, f"--max_iters={SHORT_STEPS}",
                                "--eval_interval=1000"), cwd=tmp_path)
    assert f"resuming from {out / 'ckpt.pt'} at step {SHORT_STEPS}" in again.stdout
    refused = train_refusing(tiny_args(data_dir, out, "--init_from=scratch", "--max_iters=3"),
                             capsys, tmp_path)
    assert_one_line_error(refused, "already holds ckpt.pt and best.pt", "drop --init_from=scratch")
    (out / "ckpt.pt").rename(tmp_path / "moved.pt")  # best.pt alone must not be overwritten either
    refused = train_refusing(tiny_args(data_dir, out, "--max_iters=3"), capsys, tmp_path)
    assert_one_line_error(refused, "already holds best.pt", "another --out_dir")
    (tmp_path / "moved.pt").rename(out / "ckpt.pt")
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.pt")}


def test_evaluations_do_not_shift_the_training_batches(tmp_path, data_dir):
    runs = {}
    for interval in (3, 1000):
        out = tmp_path / f"eval{interval}"
        train_here(tiny_args(data_dir, out, "--max_iters=20", f"--eval_interval={interval}",
                             "--dropout=0.1"), tmp_path)
        runs[interval] = train_losses(out)
    assert runs[3] == runs[1000]


# split by sequences (8 / 2), or by micro-steps (4 / 2: slow, as DDP's micro-steps are run in the
# default suite by test_devices.py's gradient-storage test, and splitting them is checked by the
# share tests below)
@pytest.mark.parametrize("accumulation", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_dir,
                                                                             accumulation):
    args = ["--max_iters=12", "--lr_decay_iters=12",
            f"--gradient_accumulation_steps={accumulation}", "--eval_interval=6"]
    one = tmp_path / "one"
    train_here(tiny_args(data_dir, one, *args), cwd=tmp_path)
    two = tmp_path / "two"
    result = run_script("train.py", tiny_args(data_dir, two, *args), cwd=tmp_path,
                        launcher=torchrun(2))
    # DDP's buffer switch: torch's name.
    assert "2 process(es)" in result.stdout and "deprecated" not in result.stderr
    # Rank 0 only.
    assert [line.startswith("step 12 |") for line in result.stdout.splitlines()].count(True) == 1
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert losses_one.keys() == losses_two.keys() == set(range(1, 13))
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-5), step
    # Evaluation is spread over the ranks.
    evals_one, evals_two = records(one, "eval"), records(two, "eval")
    assert [r["val"] for r in evals_two] == pytest.approx([r["val"] for r in evals_one], rel=1e-5)
    # The full split, in shares.
    [final_one], [final_two] = records(one, "final"), records(two, "final")
    assert final_two["val_tokens"] == final_one["val_tokens"]
    assert final_two["val_loss_full"] == pytest.approx(final_one["val_loss_full"], rel=1e-5)
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def shares_cover_the_global_batch(accumulation, batch_size, world_size) -> bool:
    """The world_size shares of a global batch are equal, disjoint, and together the whole of it."""
    picks = np.arange(accumulation * batch_size).reshape(accumulation, batch_size)
    shares = [picks_of_rank(picks, rank, world_size) for rank in range(world_size)]
    return (all(s.size == picks.size // world_size for s in shares)
            and sorted(np.concatenate([s.ravel() for s in shares])) == list(range(picks.size)))


def test_every_shipped_config_splits_its_global_batch_over_two_processes():
    """What torchrun --nproc_per_node=2 does with each config as written."""
    for config in sorted((REPO / "configs").glob("*.py")):
        another_run = "init_from = 'out-" in config.read_text()  # fine-tunes a run that is not here
        cfg = parse_options(TrainConfig, [str(config), *["--init_from=scratch"] * another_run],
                            config_files=True)
        accumulation = cfg.gradient_accumulation_steps
        assert shares_cover_the_global_batch(accumulation, cfg.batch_size, 2), config.name
    # Both kinds of split.
    for accumulation, batch_size, world_size in [(4, 8, 2), (8, 3, 4), (3, 8, 4), (6, 6, 3)]:
        assert shares_cover_the_global_batch(accumulation, batch_size, world_size)
    with pytest.raises(ConfigError, match="cannot be split evenly over 8 processes"):
        split_global_batch(1, 12, 8)


def test_a_failure_on_one_rank_stops_every_rank_with_one_error(tmp_path, data_dir):
    """Only local rank 0 prepares a missing data set; when that fails, the other rank must not wait
    forever for it: every process raises the same error, rank 0 prints it, the job ends."""
    result = run_script("train.py", tiny_args(data_dir, tmp_path / "out", "--dataset=nothing",
                                              f"--data_source={tmp_path / 'missing.txt'}",
                                              "--max_iters=2"),
                        cwd=tmp_path, check=False, timeout=120, launcher=torchrun(2))
    assert result.returncode != 0
    assert result.stderr.count("error: could not prepare nothing") == 1, result.stderr[-2000:]
    # No traceback through our code (torchrun prints its own).
    assert 'train.py", line' not in result.stderr


def rank_pid(torchrun_pid, rank) -> int:
    """The pid of the worker with RANK=rank among a torchrun's children."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no rank {rank} under torchrun {torchrun_pid}")


def test_torchrun_restart_after_a_killed_rank_resumes_and_loses_no_step(tmp_path, data_dir):
    """SIGKILL one rank mid-run: torchrun --max-restarts=1 relaunches both, they continue from the
    last checkpoint (the command still says --init_from=scratch), and the final model is the one an
    uninterrupted run reaches."""
    args = ["--max_iters=40", "--lr_decay_iters=40", "--eval_interval=10", "--log_interval=1",
            "--init_from=scratch",
            ]
    one = tmp_path / "one"
    train_here(tiny_args(data_dir, one, *args), cwd=tmp_path)
    out = tmp_path / "two"
    command = [*torchrun(2, "--max-restarts=1"), TRAIN, *tiny_args(data_dir, out, *args)]
    proc = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith("step 25 |"):  # after the step-20 checkpoint
            os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
            break
    stdout, stderr = proc.communicate(timeout=240)
    stdout = "".join(output) + stdout
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "resuming from" in stdout and "at step 20" in stdout
    final = load_checkpoint(out / "ckpt.pt")
    assert final["step"] == 40
    a, b = weights(one), final["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # A relaunched step logs again, the same.
    losses_one, losses_two = train_losses(one), train_losses(out)
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-5), step


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
def test_resume_on_another_device_moves_every_tensor_before_use(tmp_path, data_dir, short_run):
    """The resume path on the 'meta' device, which like CUDA refuses host-only calls (.numpy(),
    .item()) on its tensors: every restored tensor must land on the device or stay on the host."""
    cfg = parse_options(TrainConfig, tiny_args(data_dir, tmp_path, "--max_iters=20"))
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text())
    args, _ = model_to_train(cfg, meta, None)
    model, optimizers, scaler, progress = build_model(cfg, args, "float32", None,
                                                      short_run / "ckpt.pt", meta,
                                                      Dist(device="meta"))
    assert progress["step"] == SHORT_STEPS
    assert {p.device.type for p in model.parameters()} == {"meta"}
    moments = [t for state in optimizers[0].state.values() for t in state.values() if t.dim() > 0]
    assert moments and {t.device.type for t in moments} == {"meta"}
    assert all(g["lr"] == cfg.learning_rate == g["peak_lr"] for g in optimizers[0].param_groups)


def test_bf16_on_cpu_trains_without_a_loss_scale(tmp_path, data_dir):
    """float16 with its GradScaler is checked step by step against a second implementation, across
    a resume (test_training_loop.py); bfloat16 needs no loss scale and saves none."""
    out = tmp_path / "out"
    result = run_train(tiny_args(data_dir, out, "--dtype=bfloat16", "--max_iters=60",
                                 "--lr_decay_iters=60", "--eval_interval=60",
                                 "--learning_rate=1e-2"), cwd=tmp_path)
    assert "dtype bfloat16" in result.stdout
    losses = train_losses(out)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[60] < 0.7 * losses[1]
    assert not torch.load(out / "ckpt.pt", weights_only=True)["scaler"]


def test_wandb_offline_run_holds_every_logged_value(tmp_path, data_dir):
    pytest.importorskip("wandb")
    out = tmp_path / "out"
    run_train(tiny_args(data_dir, out, "--max_iters=3", "--eval_interval=3", "--wandb_log=True",
                        "--wandb_run_name=tiny-test"), cwd=tmp_path)
    [run_file] = (out / "wandb").glob("offline-run-*/*.wandb")
    raw = run_file.read_bytes()  # wandb's record log: each logged value is stored as its JSON text
    logged = [(r["loss"]) for r in records(out, "train")] + [r["val"] for r in records(out, "eval")]
    assert len(logged) == 5 and all(json.dumps(value).encode() in raw for value in logged)


def test_mfu_is_the_counted_flops_per_second_over_the_printed_peak(tmp_path, data_dir):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    out = tmp_path / "out"
    result = run_train(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=1000"),
                       cwd=tmp_path)
    # This CPU's, measured.
    peak = float(re.search(r"peak for MFU: ([0-9.e+]+) FLOP/s", result.stdout).group(1))
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt")).train()
    idx = torch.zeros((8, 16), dtype=torch.long)  # one micro-batch of the run: 8 x block_size 16
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    flops_per_token = counter.get_total_flops() / idx.numel()
    for r in records(out, "train"):
        assert r["mfu"] * peak == pytest.approx(r["tokens_per_s"] * flops_per_token, rel=0.02)


# ------------------------------------------------------------------------ learning-rate schedule

def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    linear = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110,
                         lr_schedule="linear")
    for c in (cfg, linear):
        warmup = [learning_rate_at(s, c) for s in range(10)]
        # Rises, never reaches the peak early.
        assert warmup == sorted(warmup) and 0 < warmup[0] < warmup[-1] < 1.0
        assert learning_rate_at(10, c) == 1.0  # the peak right after the warmup
        decay = [learning_rate_at(s, c) for s in range(10, 111)]
        assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling
        # Halfway: halfway between peak and min.
        assert learning_rate_at(60, c) == pytest.approx(0.55)
        # min_lr from lr_decay_iters on.
        assert learning_rate_at(110, c) == learning_rate_at(5000, c) == 0.1
    # cosine stays above the straight line in the first half of the decay and below it in the second
    assert learning_rate_at(35, cfg) > learning_rate_at(35, linear)
    assert learning_rate_at(85, cfg) < learning_rate_at(85, linear)
    flat = TrainConfig(learning_rate=0.3, decay_lr=False, warmup_iters=10)
    assert {learning_rate_at(s, flat) for s in (0, 5, 10, 10_000)} == {0.3}


def test_a_new_learning_rate_given_on_resume_is_the_one_used(tmp_path, data_dir, short_run):
    """The resumed run's schedule scales the new peak, read from the optimizer (not the log): the
    13th step is 7/16 of the way down a cosine from step 5 to 21, worked out here; and the new beta2
    is the one used."""
    out = copy_of_run(short_run, tmp_path)
    run_train(tiny_args(data_dir, out, f"--max_iters={SHORT_STEPS + 3}", "--learning_rate=2e-3",
                        "--min_lr=1e-4", "--lr_decay_iters=21", "--beta2=0.9",
                        "--eval_interval=1000"), cwd=tmp_path)
    # Step index 12, the 13th.
    expected = 1e-4 + (2e-3 - 1e-4) * (1 + math.cos(math.pi * (12 - 5) / (21 - 5))) / 2
    groups = load_checkpoint(out / "ckpt.pt")["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(expected) and g["betas"][1] == 0.9 for g in groups)
    assert records(out, "train")[-1]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("change, named", [
    ({"model_args": {"unet_skips": True, "rope_base": 1000.0}}, "rope_base, unet_skips"),
    ({"format": 99}, "format 99")])
def test_a_checkpoint_this_model_py_cannot_compute_is_refused_in_one_line(tmp_path, short_run,
                                                                          change, named, capsys):
    """A checkpoint whose model options model.py no longer has (an earlier format's speedrun
    levers), or of a newer format than this checkout's, is refused by sample.py and by a resume
    with one line that names what does not fit, instead of computing something else."""
    old = torch.load(short_run / "ckpt.pt", weights_only=True)
    old["model_args"] |= change.get("model_args", {})
    old |= {k: v for k, v in change.items() if k != "model_args"}
    save_checkpoint(tmp_path / "ckpt.pt", old)
    import sample
    assert sample.main([f"--out_dir={tmp_path}", "--ckpt=ckpt.pt", "--max_new_tokens=2"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and named in line and "format" in line
    with pytest.raises(CheckpointError, match=named):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_muon_state_is_saved_and_resumed_bitwise(tmp_path, data_dir):
    args = ["--muon_lr=0.02", "--lr_decay_iters=16", "--eval_interval=1000"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    train_here(tiny_args(data_dir, straight, *args, "--max_iters=16"), cwd=tmp_path)
    train_here(tiny_args(data_dir, halves, *args, "--max_iters=8"), cwd=tmp_path)
    # Momentum buffers are in the checkpoint.
    assert load_checkpoint(halves / "ckpt.pt")["muon"]["state"]
    run_train(tiny_args(data_dir, halves, *args, "--max_iters=16"), cwd=tmp_path)
    assert train_losses(halves) == train_losses(straight)
    assert_same_weights(weights(halves), weights(straight))


def test_auto_dtype_on_this_cpu_is_bf16_only_where_the_cpu_has_bf16_instructions():
    lscpu = shutil.which("lscpu")
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if lscpu else ""
    if "Flags" not in flags:
        pytest.skip("lscpu cannot tell this CPU's flags")
    native = any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))
    assert model_dtype("auto", "cpu", {}) == ("bfloat16" if native else "float32")
    assert model_dtype("float16", "cpu", {}) == "float16"  # a named dtype is taken as it is


# ------------------------------------------------------------------------------------ errors

def test_unknown_key_on_the_command_line_suggests_the_nearest(tmp_path, capsys):
    result = train_refusing(["--learning_rat=0.1"], capsys, tmp_path)
    assert_one_line_error(result, "learning_rat", "learning_rate")


def test_unknown_key_in_a_config_file_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "bad.py"
    config.write_text("batch_size = 4\nn_layers = 2\n")
    result = train_refusing([config], capsys, tmp_path)
    assert_one_line_error(result, f"{config} line 2", "n_layers", "n_layer")


def test_wrong_type_names_field_value_and_expected_type(tmp_path, capsys):
    result = train_refusing(["--max_iters=ten"], capsys, tmp_path)
    assert_one_line_error(result, "max_iters", "'ten'", "int")


def test_config_file_line_that_is_not_a_plain_assignment_is_refused_not_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.py"
    config.write_text(f"batch_size = 4\nimport os; os.mkdir({str(marker)!r})\n")
    result = train_refusing([config], capsys, tmp_path)
    assert_one_line_error(result, f"{config} line 2")
    assert not marker.exists()


def test_missing_data_that_cannot_be_prepared_prints_the_command(tmp_path, capsys):
    result = train_refusing(["--dataset=mybook", f"--data_dir={tmp_path / 'data'}",
                             "--max_iters=1"], capsys, tmp_path)
    assert_one_line_error(result, "could not prepare mybook", "python prepare.py mybook --source=")


@pytest.mark.parametrize("content, message", [(b"PK\x03\x04 this is not a checkpoint",
                                               "not a readable checkpoint"),
                                              (None, "no checkpoint at")])
def test_corrupt_or_missing_checkpoint_is_a_one_line_error(tmp_path, data_dir, content, message,
                                                           capsys):
    out = tmp_path / "out"
    out.mkdir()
    if content is not None:
        (out / "ckpt.pt").write_bytes(content)
    result = train_refusing(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=2"), capsys,
                            tmp_path)
    assert_one_line_error(result, "ckpt.pt", message)


def test_resuming_with_another_model_shape_is_a_one_line_error(tmp_path, data_dir, short_run,
                                                               capsys):
    out = copy_of_run(short_run, tmp_path)
    result = train_refusing(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=20",
                                      "--n_embd=48"), capsys,
                            tmp_path)
    assert_one_line_error(result, "does not match", "n_embd 32 in the checkpoint vs 48")


def test_resuming_on_another_vocabulary_is_a_one_line_error(tmp_path, data_dir, short_run, capsys):
    out = copy_of_run(short_run, tmp_path)
    result = train_refusing([*tiny_args(data_dir, out, "--init_from=resume", "--max_iters=20"),
                             "--dataset=reverse"],
                            capsys, tmp_path)
    assert_one_line_error(result, "vocab")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, short_run):
    out = copy_of_run(short_run, tmp_path)
    good = hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
    # a learning rate of 1e9 throws the weights so far that the next forward pass overflows
    result = run_train(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=50",
                                 "--eval_interval=1000", "--learning_rate=1e9", "--decay_lr=False"),
                       cwd=tmp_path, check=False)
    line = assert_one_line_error(result, "non-finite loss (nan) at step ",
                                 f"last good checkpoint kept at {out / 'ckpt.pt'} "
                                 f"(step {SHORT_STEPS})")
    assert SHORT_STEPS < int(line.split("at step ")[1].split(";")[0]) < 50
    assert hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest() == good


# ------------------------------------------------------------------------------ config parser

def test_config_parser_converts_and_checks_types(tmp_path, capsys):
    config = tmp_path / "c.py"
    config.write_text("learning_rate = 1\nout_dir = 'from-file'\ncompile = False\n")
    cfg = parse_options(TrainConfig, [str(config), "--out_dir=bare-string", "--wandb_run_name=123",
                                      "--dropout=0.1"],
                        config_files=True)
    # Int accepted for a float.
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.out_dir == "bare-string" and cfg.wandb_run_name == "123" and cfg.dropout == 0.1
    assert cfg.compile is False and parse_options(TrainConfig, ["--compile=None"]).compile is None
    with pytest.raises(ConfigError, match="takes an int"):
        parse_options(TrainConfig, ["--max_iters=True"])  # a bool is not an int
    with pytest.raises(ConfigError, match="--key=value"):
        parse_options(TrainConfig, ["max_iters=3"])
    # A path: checked on every node.
    result = train_refusing(["--init_from=resum", "--device=cpu"], capsys, tmp_path)
    assert_one_line_error(result, "init_from='resum': no such file or folder")
    # Checked once, at the end.
    with pytest.raises(ConfigError, match="n_embd=48 must be divisible by n_head=5"):
        parse_options(TrainConfig, ["--n_head=5", "--n_embd=48"])
    assert parse_options(TrainConfig, ["--n_head=5", "--n_embd=40"]).n_head == 5
    # Not a ZeroDivisionError's traceback.
    with pytest.raises(ConfigError, match="n_head=0 must be at least 1"):
        parse_options(TrainConfig, ["--n_head=0"])


def test_help_lists_every_option_with_its_default_and_comment(tmp_path):
    result = run_train(["--help"], cwd=tmp_path)
    for name in ("init_from='auto'", "gradient_accumulation_steps=1", "n_layer=6", "compile=None"):
        assert f"--{name}" in result.stdout
    assert "auto: resume if any; resume; scratch" in result.stdout  # the field's comment


def test_a_device_this_machine_lacks_is_a_one_line_error(tmp_path, data_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = train_refusing(tiny_args(data_dir, tmp_path / "out", "--device=cuda"), capsys,
                            tmp_path)
    assert_one_line_error(result, "device='cuda'", "no CUDA GPU", "--device=cpu")


def test_switching_muon_on_at_resume_is_a_one_line_error(tmp_path, data_dir, short_run, capsys):
    out = copy_of_run(short_run, tmp_path)
    result = train_refusing(tiny_args(data_dir, out, "--max_iters=20", "--muon_lr=0.01"), capsys,
                            tmp_path)
    assert_one_line_error(result, "trained without Muon")


def test_save_checkpoint_is_atomic_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})  # cannot be pickled
    assert torch.load(path, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------- attention tasks

def test_task_batches_put_the_loss_on_the_answer_only(data_dir):
    meta = json.loads((data_dir / "reverse" / "meta.json").read_text())
    batches = Batches(data_dir / "reverse", meta, block_size=meta["example_len"] - 1, device="cpu")
    examples = batches.examples("train")
    picks = np.array([0, 5, 9])
    x, y = batches.batch("train", picks)
    prompt = meta["prompt_len"]
    assert torch.equal(x, torch.from_numpy(examples[picks, :-1]))
    assert (y[:, :prompt - 1] == -1).all()
    assert torch.equal(y[:, prompt - 1:], torch.from_numpy(examples[picks, prompt:]))


class ReverseOracle:
    """Answers a reverse prompt 'ABCDEF=' by the task's rule; wrong on every `wrong_every`-th
    example."""

    def __init__(self, equals_id, wrong_every=0):
        self.equals_id, self.wrong_every = equals_id, wrong_every
        self.seen = 0

    def eval(self):
        return self

    def generate(self, idx, max_new_tokens, temperature=1.0):
        assert temperature == 0 and (idx[:, -1] == self.equals_id).all()
        answers = idx[:, :-1].flip(1)[:, :max_new_tokens].clone()
        for row in range(len(answers)):
            if self.wrong_every and (self.seen + row) % self.wrong_every == 0:
                # One wrong letter spoils the example.
                answers[row, -1] = (answers[row, -1] + 1) % 26
        self.seen += len(answers)
        return torch.cat([idx, answers], dim=1)


def test_exact_match_scorer_gives_one_for_an_oracle_and_less_for_broken_models(data_dir):
    meta = json.loads((data_dir / "reverse" / "meta.json").read_text())
    examples = np.fromfile(data_dir / "reverse" / "val.bin",
                           dtype=np.uint16).astype(np.int64).reshape(-1, meta["example_len"])
    prompt_len, equals_id = meta["prompt_len"], meta["vocab"].index("=")
    assert exact_match_accuracy(ReverseOracle(equals_id), examples, prompt_len,
                                batch_size=64) == 1.0
    assert exact_match_accuracy(ReverseOracle(equals_id, wrong_every=2), examples, prompt_len,
                                batch_size=64) == 0.5
    torch.manual_seed(0)
    untrained = GPT(GPTConfig(block_size=meta["example_len"], vocab_size=meta["vocab_size"],
                              n_layer=1, n_head=2, n_embd=16))
    assert exact_match_accuracy(untrained, examples, prompt_len) < 0.05


def test_reverse_config_passes_the_bar_and_the_no_attention_ablation_fails(tmp_path, data_dir,
                                                                           reverse_run):
    _, passed = reverse_run  # configs/reverse.py as written
    assert "test exact match: " in passed and "(bar 95%): PASS" in passed, passed[-1500:]
    # without attention no token sees another, so no number of steps can reverse:
    # 60 show it as well as 300
    failed = run_train(["configs/reverse.py", f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path / 'ablation'}", "--attention=False", "--max_iters=60",
                        "--lr_decay_iters=60"], cwd=REPO)
    assert "(bar 95%): FAIL" in failed.stdout, failed.stdout[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["configs/reverse.py", "--dataset=copy"], ["configs/mixed.py"]])
def test_copy_and_mixed_recipes_pass_their_bars(tmp_path, recipe):
    result = run_train([*recipe, f"--data_dir={tmp_path / 'data'}",
                        f"--out_dir={tmp_path / 'out'}"], cwd=REPO, timeout=900)
    stdout = result.stdout
    assert "test exact match: " in stdout and ": PASS" in stdout, stdout[-1500:]


@pytest.mark.slow
def test_compiled_model_trains(tmp_path, data_dir):
    out = tmp_path / "out"
    run_train(tiny_args(data_dir, out, "--compile=True", "--max_iters=30", "--eval_interval=30",
                        "--learning_rate=1e-2"), cwd=tmp_path, timeout=900)
    losses = train_losses(out)
    assert losses[30] < 0.8 * losses[1]


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_shipped_config_runs_under_torchrun_with_two_processes_as_written(tmp_path, config):
    """Each config's own batch settings and data set, a tiny model, two optimizer steps, 2 gloo
    processes."""
    from conftest import SHARED_DATA, tiny_hf_gpt2
    from tinygpt.checkpoint import GPT2_NAMES
    from tinygpt.datasets import prepare
    data = tmp_path / "data"
    sources = {"shakespeare_char": SHARED_DATA / "tinyshakespeare" / "input.txt",
               "shakespeare": SHARED_DATA / "tinyshakespeare" / "input.txt",
               "tinytalks": SHARED_DATA / "tinytalks",
               "shakespeare_byte": SHARED_DATA / "tinyshakespeare" / "input.txt",
               "tinytalks_byte": SHARED_DATA / "tinytalks",
               "tinytalks_chat": SHARED_DATA / "tinytalks"}
    text = (REPO / "configs" / config).read_text()
    # Fine-tunes a run that is not here.
    source = ["--init_from=scratch"] if "init_from = 'out-" in text else []
    cfg = parse_options(TrainConfig, [str(REPO / "configs" / config), *source], config_files=True)
    if cfg.dataset in sources and not sources[cfg.dataset].exists():
        pytest.skip(f"no local copy of {cfg.dataset}")
    # The Hub's files, and 3 GB of logits a micro-step with its batch on a CPU.
    if cfg.dataset == "fineweb_edu":
        pytest.skip("gpt2_124m.py runs shrunk on local shards, under torchrun too, in "
                    "test_corpus.py")
    source += [f"--data_source={sources[cfg.dataset]}"] if cfg.dataset in sources else []
    # The README's conversations in GPT-2 BPE, as its command prepares them.
    if cfg.dataset == "mychat_gpt2":
        prepare("mychat_gpt2", source=REPO / "docs" / "conversations.jsonl", data_dir=data,
                tokenizer="gpt2")
    # No network here: a tiny random GPT-2 in its place, long enough for a chat.
    if cfg.init_from in GPT2_NAMES:
        source.append(f"--init_from={tmp_path / 'gpt2'}")
        tiny_hf_gpt2(tmp_path / "gpt2", vocab_size=50257,
                     n_positions=128 if cfg.dataset == "mychat_gpt2" else 64)
    result = run_script("train.py", [REPO / "configs" / config, f"--data_dir={data}",
                                     f"--out_dir={tmp_path / 'out'}", *source, "--n_layer=1",
                                     "--n_head=2", "--n_embd=32", "--max_iters=2",
                                     "--eval_iters=1", "--device=cpu", "--dtype=float32",
                                     "--compile=False"],
                        cwd=tmp_path, launcher=torchrun(2), timeout=600)
    assert "2 process(es)" in result.stdout and "step 2 | loss " in result.stdout
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 2


def test_a_model_pretrained_on_one_byte_text_fine_tunes_on_another(tmp_path):
    """Byte tokens are one vocabulary for every text: weights pretrained on one data set start a
    run on another (here with a learning rate too small to move them, so the saved weights are the
    loaded ones)."""
    from conftest import tiny_text
    from tinygpt.datasets import prepare
    for name, seed in (("pretext", 0), ("tunetext", 1)):
        text = tiny_text(n_lines=300, seed=seed).upper() if seed else tiny_text(300)
        (tmp_path / f"{name}.txt").write_text(text)
        prepare(name, source=tmp_path / f"{name}.txt", data_dir=tmp_path / "data", tokenizer="byte")
    common = [*TINY, f"--data_dir={tmp_path / 'data'}"]
    run_train([*common, "--dataset=pretext", f"--out_dir={tmp_path / 'pre'}", "--max_iters=3"])
    tuned = run_train([*common, "--dataset=tunetext", f"--out_dir={tmp_path / 'tuned'}",
                       "--max_iters=1", f"--init_from={tmp_path / 'pre'}", "--learning_rate=1e-9",
                       "--decay_lr=False"])
    assert "fine-tuning" in tuned.stdout
    pretrained, fine_tuned = (load_checkpoint(tmp_path / d / "ckpt.pt") for d in ("pre", "tuned"))
    assert fine_tuned["meta"]["tokenizer"] == "byte"
    assert fine_tuned["config"]["dataset"] == "tunetext"
    for name, tensor in pretrained["model"].items():
        torch.testing.assert_close(fine_tuned["model"][name], tensor, atol=1e-6, rtol=0)


def test_fast_exit_ends_the_run_with_its_log_checkpoint_and_exit_code(tmp_path, data_dir):
    """os._exit skips the interpreter's teardown, so whatever the run writes must be written before
    it."""
    out = tmp_path / "out"
    result = run_train(tiny_args(data_dir, out, "--max_iters=4", "--eval_interval=1000",
                                 "--fast_exit=True", "--val_loss_bar=99"), cwd=tmp_path)
    assert result.returncode == 0 and "(bar 99): PASS" in result.stdout
    assert records(out, "final") and records(out, "final")[0]["val_loss_full"] > 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4
    failed = run_train(tiny_args(data_dir, tmp_path / "bad", "--fast_exit=True", "--n_head=3"),
                       cwd=tmp_path, check=False)
    assert_one_line_error(failed, "divisible")  # a bad option still fails with its one-line error


def test_samples_while_training_leave_every_loss_and_weight_bitwise_unchanged(tmp_path, data_dir):
    """--sample_interval prints a greedy and a sampled continuation at evaluations (not at step
    0) and logs them; drawn in eval mode from a generator of their own, they change nothing of
    the training: the same losses at every step and the same final weights, dropout included."""
    args = ["--max_iters=12", "--eval_interval=4", "--dropout=0.1", "--lr_decay_iters=12"]
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    train_here(tiny_args(data_dir, plain, *args), tmp_path)
    train_here(tiny_args(data_dir, sampled, *args, "--sample_interval=4"), tmp_path)
    assert train_losses(sampled) == train_losses(plain)
    assert records(sampled, "eval") == records(plain, "eval")
    assert_same_weights(weights(sampled), weights(plain))
    logged = records(sampled, "samples")
    assert [r["step"] for r in logged] == [4, 8, 12]
    assert all(r["greedy"] and r["sampled"] and r["prompt"] for r in logged)
