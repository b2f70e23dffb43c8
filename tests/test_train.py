"""train.py as a specification: it trains, resumes exactly, scales across processes, and fails clearly.

Most tests run the real CLI (`python train.py`, `torchrun`) on a tiny model and real data files
made by prepare.py in a temp folder, and read what it wrote: stdout, log.jsonl, ckpt.pt.
"""
import hashlib
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import GPT, GPTConfig
from prepare import prepare
from train import (Batches, CheckpointError, ConfigError, TrainConfig, exact_match_accuracy, load_checkpoint,
                   load_config, model_from_checkpoint, parse_overrides, save_checkpoint)

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "train.py")
# One thread per process: the same arithmetic in every run (bitwise comparisons rely on it), and
# several test processes can share two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8", "--dtype=float32",
        "--eval_iters=2", "--log_interval=1", "--device=cpu", "--warmup_iters=5", "--learning_rate=3e-3"]


def tiny_text(n_lines=1500, seed=0) -> str:
    """Text with learnable structure: short sentences from a small vocabulary."""
    rng = random.Random(seed)
    subjects, verbs, objects = ["the cat", "a dog", "my friend", "the king"], ["sees", "likes", "eats"], \
        ["the fish.", "a hat.", "bread.", "the moon."]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data folder with the text data set 'tiny' and the 'reverse' task, built by prepare.py."""
    root = tmp_path_factory.mktemp("data")
    source = root / "tiny.txt"
    source.write_text(tiny_text())
    prepare("text", source=source, data_dir=root, out_name="tiny")
    prepare("reverse", data_dir=root)
    return root


def run_train(args, cwd, check=True, timeout=300):
    result = subprocess.run([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def tiny_args(data_dir, out_dir, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *extra]


def train_losses(out_dir) -> dict:
    """{step: loss} of the training lines in out_dir/log.jsonl."""
    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def weights(out_dir) -> dict:
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different}"


def assert_one_line_error(result, *fragments):
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------- training

def test_tiny_config_file_trains_and_loss_falls_well_below_initial(tmp_path):
    """A config file plus overrides, data prepared on the fly from --data_source, 100 steps."""
    source = tmp_path / "mytext.txt"
    source.write_text(tiny_text(seed=1))
    config = tmp_path / "tiny_config.py"
    config.write_text('"""A tiny run."""\n# comments are fine\nmax_iters = 100\nlr_decay_iters = 100\n'
                      "eval_interval = 50\nbatch_size = 4\n")
    out = tmp_path / "out"
    result = run_train([config, *TINY, "--batch_size=8", f"--data_dir={tmp_path / 'data'}", "--dataset=mytext",
                        f"--data_source={source}", f"--out_dir={out}"], cwd=tmp_path)

    losses = train_losses(out)
    vocab = json.loads((tmp_path / "data" / "mytext" / "meta.json").read_text())["vocab_size"]
    assert abs(losses[1] - math.log(vocab)) < 0.3  # starts at chance
    assert losses[100] < 0.6 * losses[1]
    assert "step 100 | loss " in result.stdout and "| ms/step " in result.stdout and "| mfu " in result.stdout
    assert "final val loss (full split, " in result.stdout
    saved = json.loads((out / "config.json").read_text())
    assert saved["batch_size"] == 8 and saved["max_iters"] == 100  # the override beat the file
    assert "max_iters = 100" in result.stdout  # the effective config is printed


SHORT_STEPS = 10


@pytest.fixture(scope="module")
def short_run(data_dir, tmp_path_factory):
    """out_dir of a 10-step run (one eval, at the end); copy its ckpt.pt before changing anything."""
    out = tmp_path_factory.mktemp("short")
    run_train(tiny_args(data_dir, out, f"--max_iters={SHORT_STEPS}", "--eval_interval=1000"), cwd=out)
    return out


def copy_of_run(run_dir, tmp_path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "ckpt.pt").write_bytes((run_dir / "ckpt.pt").read_bytes())
    return out


def test_checkpoint_is_a_plain_dict_other_tools_can_read(short_run):
    out = short_run
    checkpoint = load_checkpoint(out / "ckpt.pt")
    assert {"model", "optimizer", "scaler", "config", "model_args", "meta", "step", "best_val_loss", "rng"} <= checkpoint.keys()
    assert checkpoint["step"] == SHORT_STEPS and math.isfinite(checkpoint["best_val_loss"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    assert checkpoint["meta"]["vocab_size"] == checkpoint["model_args"]["vocab_size"]
    model = model_from_checkpoint(checkpoint)
    assert not model.training
    idx = torch.zeros((1, 4), dtype=torch.long)
    logits, _ = model(idx)
    assert logits.shape == (1, 1, checkpoint["model_args"]["vocab_size"])
    assert not list(out.glob(".*tmp*"))  # no temporary file left behind


STRAIGHT_STEPS = 300  # long enough that a SIGTERM sent early lands mid-run
RESUME_ARGS = ["--dropout=0.1", "--gradient_accumulation_steps=2", f"--lr_decay_iters={STRAIGHT_STEPS}",
               "--eval_interval=100"]


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """An uninterrupted run of STRAIGHT_STEPS steps, with dropout and gradient accumulation."""
    out = tmp_path_factory.mktemp("straight")
    run_train(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={STRAIGHT_STEPS}"), cwd=out)
    return out


def test_resume_halfway_matches_uninterrupted_run_bitwise(tmp_path, data_dir, straight_run):
    out = tmp_path / "out"
    half = STRAIGHT_STEPS // 2 + 7  # not on an eval step
    run_train(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={half}"), cwd=tmp_path)
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == half
    result = run_train(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={STRAIGHT_STEPS}", "--init_from=resume"),
                       cwd=tmp_path)
    assert f"resuming from {out / 'ckpt.pt'} at step {half}" in result.stdout
    assert train_losses(out) == train_losses(straight_run)  # every step's loss, exactly
    assert_same_weights(weights(out), weights(straight_run))


def run_until_sigterm(args, cwd, after_step):
    """Start train.py, send SIGTERM once it logs `after_step`; (the step it stopped at, its stdout)."""
    proc = subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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


def test_sigterm_saves_and_resume_matches_uninterrupted_run_bitwise(tmp_path, data_dir, straight_run):
    out = tmp_path / "out"
    step, stdout = run_until_sigterm(tiny_args(data_dir, out, *RESUME_ARGS, f"--max_iters={STRAIGHT_STEPS}"),
                                     tmp_path, after_step=5)
    assert 5 <= step < STRAIGHT_STEPS
    stopped = [line for line in stdout.splitlines() if line.startswith("interrupted at step ")]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == step

    command = shlex.split(stopped[0].split("resume with: ", 1)[1])  # run the command it printed
    assert command[:2] == ["python", "train.py"] and command[-1] == "--init_from=resume"
    run_train(command[2:], cwd=tmp_path)
    assert_same_weights(weights(out), weights(straight_run))
    straight = train_losses(straight_run)
    assert {s: v for s, v in train_losses(out).items() if s > step} == {s: v for s, v in straight.items() if s > step}


def test_a_later_worse_save_keeps_the_best_val_checkpoint_as_best_pt(tmp_path, data_dir):
    out = tmp_path / "out"
    run_train(tiny_args(data_dir, out, "--max_iters=20", "--eval_interval=10", "--always_save_checkpoint=False",
                        "--final_eval_full=False"), cwd=tmp_path)
    best = load_checkpoint(out / "ckpt.pt")
    assert best["step"] == 20 and best["is_best"]  # loss still falls fast at step 20: a new best
    assert not (out / "best.pt").exists()
    # the interrupted state has no val loss of its own, so it is saved as the newest state, not the best
    step, _ = run_until_sigterm(tiny_args(data_dir, out, "--max_iters=5000", "--eval_interval=1000",
                                          "--always_save_checkpoint=False", "--init_from=resume"),
                                tmp_path, after_step=25)
    assert load_checkpoint(out / "ckpt.pt")["step"] == step > 20
    kept = load_checkpoint(out / "best.pt")
    assert kept["step"] == 20 and kept["best_val_loss"] == best["best_val_loss"]
    assert_same_weights(kept["model"], best["model"])


def test_evaluations_do_not_shift_the_training_batches(tmp_path, data_dir):
    runs = {}
    for interval in (3, 1000):
        out = tmp_path / f"eval{interval}"
        run_train(tiny_args(data_dir, out, "--max_iters=20", f"--eval_interval={interval}", "--dropout=0.1",
                            "--final_eval_full=False"), cwd=tmp_path)
        runs[interval] = train_losses(out)
    assert runs[3] == runs[1000]


def test_torchrun_two_processes_match_one_process_with_the_same_global_batch(tmp_path, data_dir):
    args = ["--max_iters=12", "--lr_decay_iters=12", "--gradient_accumulation_steps=4", "--eval_interval=6"]
    one = tmp_path / "one"
    run_train(tiny_args(data_dir, one, *args), cwd=tmp_path)
    two = tmp_path / "two"
    result = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", TRAIN, *tiny_args(data_dir, two, *args)],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert [line.startswith("step 12 |") for line in result.stdout.splitlines()].count(True) == 1  # rank 0 only
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert losses_one.keys() == losses_two.keys() == set(range(1, 13))
    for step, loss in losses_one.items():
        assert losses_two[step] == pytest.approx(loss, rel=1e-5), step
    a, b = weights(one), weights(two)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_on_cpu_trains(tmp_path, data_dir, dtype):
    if dtype == "float16":
        try:
            torch.amp.GradScaler("cpu")
            with torch.autocast("cpu", dtype=torch.float16):
                torch.ones(2, 2) @ torch.ones(2, 2)
        except (RuntimeError, ValueError) as e:
            pytest.skip(f"this torch has no float16 autocast with a GradScaler on CPU: {e}")
    out = tmp_path / "out"
    result = run_train(tiny_args(data_dir, out, f"--dtype={dtype}", "--max_iters=60", "--lr_decay_iters=60",
                                 "--eval_interval=60", "--learning_rate=1e-2"), cwd=tmp_path)
    assert f"dtype {dtype}" in result.stdout
    losses = train_losses(out)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[60] < 0.7 * losses[1]
    scaler = torch.load(out / "ckpt.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (dtype == "float16")  # only float16 needs (and saves) a loss scale


def test_wandb_offline_writes_a_run(tmp_path, data_dir):
    pytest.importorskip("wandb")
    out = tmp_path / "out"
    run_train(tiny_args(data_dir, out, "--max_iters=3", "--eval_interval=3", "--wandb_log=True",
                        "--wandb_run_name=tiny-test"), cwd=tmp_path)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


# ------------------------------------------------------------------------------------ errors

def test_unknown_key_on_the_command_line_suggests_the_nearest(tmp_path):
    result = run_train(["--learning_rat=0.1"], cwd=tmp_path, check=False)
    assert_one_line_error(result, "learning_rat", "learning_rate")


def test_unknown_key_in_a_config_file_names_file_and_line(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("batch_size = 4\nn_layers = 2\n")
    result = run_train([config], cwd=tmp_path, check=False)
    assert_one_line_error(result, f"{config} line 2", "n_layers", "n_layer")


def test_wrong_type_names_field_value_and_expected_type(tmp_path):
    result = run_train(["--max_iters=ten"], cwd=tmp_path, check=False)
    assert_one_line_error(result, "max_iters", "'ten'", "int")


def test_config_file_line_that_is_not_a_plain_assignment_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    config = tmp_path / "evil.py"
    config.write_text(f"batch_size = 4\nimport os; os.mkdir({str(marker)!r})\n")
    result = run_train([config], cwd=tmp_path, check=False)
    assert_one_line_error(result, f"{config} line 2")
    assert not marker.exists()


def test_missing_data_that_cannot_be_prepared_prints_the_command(tmp_path):
    result = run_train(["--dataset=mybook", f"--data_dir={tmp_path / 'data'}", "--max_iters=1"], cwd=tmp_path,
                       check=False)
    assert_one_line_error(result, "python prepare.py text --source", "--name mybook", f"--data-dir {tmp_path / 'data'}")


@pytest.mark.parametrize("content, message", [(b"PK\x03\x04 this is not a checkpoint", "not a readable checkpoint"),
                                              (None, "no checkpoint at")])
def test_corrupt_or_missing_checkpoint_is_a_one_line_error(tmp_path, data_dir, content, message):
    out = tmp_path / "out"
    out.mkdir()
    if content is not None:
        (out / "ckpt.pt").write_bytes(content)
    result = run_train(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=2"), cwd=tmp_path, check=False)
    assert_one_line_error(result, "ckpt.pt", message)


def test_resuming_with_another_model_shape_is_a_one_line_error(tmp_path, data_dir, short_run):
    out = copy_of_run(short_run, tmp_path)
    result = run_train(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=20", "--n_embd=48"), cwd=tmp_path,
                       check=False)
    assert_one_line_error(result, "does not match", "n_embd 32 in the checkpoint vs 48")


def test_resuming_on_another_vocabulary_is_a_one_line_error(tmp_path, data_dir, short_run):
    out = copy_of_run(short_run, tmp_path)
    result = run_train([*tiny_args(data_dir, out, "--init_from=resume", "--max_iters=20"), "--dataset=reverse"],
                       cwd=tmp_path, check=False)
    assert_one_line_error(result, "vocab")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, short_run):
    out = copy_of_run(short_run, tmp_path)
    good = hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest()
    # a learning rate of 1e9 throws the weights so far that the next forward pass overflows
    result = run_train(tiny_args(data_dir, out, "--init_from=resume", "--max_iters=50", "--eval_interval=1000",
                                 "--learning_rate=1e9", "--decay_lr=False", "--always_save_checkpoint=True"),
                       cwd=tmp_path, check=False)
    line = assert_one_line_error(result, "non-finite loss (nan) at step ", f"last good checkpoint kept at {out / 'ckpt.pt'} (step {SHORT_STEPS})")
    assert SHORT_STEPS < int(line.split("at step ")[1].split(";")[0]) < 50
    assert hashlib.sha256((out / "ckpt.pt").read_bytes()).hexdigest() == good


# ------------------------------------------------------------------------------ config parser

def test_config_parser_converts_and_checks_types(tmp_path):
    config = tmp_path / "c.py"
    config.write_text("learning_rate = 1\nout_dir = 'from-file'\ncompile = False\n")
    cfg = load_config([str(config), "--out_dir=bare-string", "--wandb_run_name=123", "--dropout=0.1"])
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)  # int accepted for a float
    assert cfg.out_dir == "bare-string" and cfg.wandb_run_name == "123" and cfg.dropout == 0.1
    with pytest.raises(ConfigError, match="takes an int"):
        parse_overrides(TrainConfig(), ["--max_iters=True"])  # a bool is not an int
    with pytest.raises(ConfigError, match="--key=value"):
        parse_overrides(TrainConfig(), ["max_iters=3"])
    with pytest.raises(ConfigError, match="init_from"):
        load_config(["--init_from=resum"])


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
    """Answers a reverse prompt 'ABCDEF=' by the task's rule; wrong on every `wrong_every`-th example."""

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
                answers[row, -1] = (answers[row, -1] + 1) % 26  # one wrong letter spoils the example
        self.seen += len(answers)
        return torch.cat([idx, answers], dim=1)


def test_exact_match_scorer_gives_one_for_an_oracle_and_less_for_broken_models(data_dir):
    meta = json.loads((data_dir / "reverse" / "meta.json").read_text())
    examples = np.fromfile(data_dir / "reverse" / "val.bin", dtype=np.uint16).astype(np.int64).reshape(-1, meta["example_len"])
    prompt_len, equals_id = meta["prompt_len"], meta["vocab"].index("=")
    assert exact_match_accuracy(ReverseOracle(equals_id), examples, prompt_len, batch_size=64) == 1.0
    assert exact_match_accuracy(ReverseOracle(equals_id, wrong_every=2), examples, prompt_len, batch_size=64) == 0.5
    torch.manual_seed(0)
    untrained = GPT(GPTConfig(block_size=meta["example_len"], vocab_size=meta["vocab_size"], n_layer=1, n_head=2, n_embd=16))
    assert exact_match_accuracy(untrained, examples, prompt_len) < 0.05


def test_reverse_config_passes_the_bar_and_the_no_attention_ablation_fails(tmp_path, data_dir):
    passed = run_train(["configs/reverse.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'attn'}"], cwd=REPO)
    assert "test exact match: " in passed.stdout and "(bar 95%): PASS" in passed.stdout, passed.stdout[-1500:]
    failed = run_train(["configs/reverse.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'ablation'}",
                        "--attention=False"], cwd=REPO)
    assert "(bar 95%): FAIL" in failed.stdout, failed.stdout[-1500:]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["copy", "mixed"])
def test_copy_and_mixed_configs_pass_their_bars(tmp_path, task):
    result = run_train([f"configs/{task}.py", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}"],
                       cwd=REPO, timeout=900)
    assert ": PASS" in result.stdout, result.stdout[-1500:]


@pytest.mark.slow
def test_compiled_model_trains(tmp_path, data_dir):
    out = tmp_path / "out"
    run_train(tiny_args(data_dir, out, "--compile=True", "--max_iters=30", "--eval_interval=30",
                        "--learning_rate=1e-2"), cwd=tmp_path, timeout=900)
    losses = train_losses(out)
    assert losses[30] < 0.8 * losses[1]
