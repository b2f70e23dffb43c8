"""What a first real run meets, from the review of the device and torchrun paths: each test fails
on the code before its fix. Signals are real, torchrun is real, the runs are tiny."""
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinygpt.device as device_module
from conftest import (
    ENV,
    REPO,
    assert_one_line_error,
    run_script,
    run_train,
    tiny_args,
    torchrun,
    train_here,
)

TRAIN = str(REPO / "train.py")


def start_train(args, cwd):
    return subprocess.Popen([sys.executable, TRAIN, *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(proc, prefix) -> list:
    """The lines proc prints up to and including the first that starts with prefix."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError("".join(lines) + proc.stderr.read())


def test_sighup_saves_a_fine_tune_and_the_printed_command_resumes_it(tmp_path, data_dir):
    """A closed SSH session sends SIGHUP (torchrun forwards it): the run saves like after SIGTERM.
    The command it prints keeps --init_from, so a fine-tune of weights shaped unlike the config
    resumes its own checkpoint instead of being refused as a mismatch."""
    train_here(tiny_args(data_dir, tmp_path / "pre", "--n_embd=48", "--max_iters=4"), tmp_path)
    out = tmp_path / "tuned"
    args = tiny_args(data_dir, out, f"--init_from={tmp_path / 'pre'}", "--max_iters=5000",
                     "--eval_interval=1000")
    proc = start_train(args, tmp_path)
    read_until(proc, "step 3 |")
    proc.send_signal(signal.SIGHUP)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:] + stderr
    [stopped] = [line for line in stdout.splitlines() if line.startswith("interrupted at step")]
    command = shlex.split(stopped.split("resume with: ", 1)[1])
    assert f"--init_from={tmp_path / 'pre'}" in command
    step = int(stopped.split()[3].rstrip(";"))
    resumed = run_train([*command[2:], f"--max_iters={step + 2}"], cwd=tmp_path)
    assert f"resuming from {out / 'ckpt.pt'} at step {step}" in resumed.stdout


def test_ctrl_c_during_the_first_evaluation_stops_before_the_first_step(tmp_path, data_dir):
    """The stop flag is read before the first step, not after it: nothing is trained or saved."""
    out = tmp_path / "out"
    proc = start_train(tiny_args(data_dir, out, "--eval_iters=5000", "--max_iters=50"), tmp_path)
    read_until(proc, "tokens per optimizer step")
    time.sleep(3)  # set-up is done a moment after that line; the evaluation takes far longer
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:] + stderr
    assert "interrupted before the first step; nothing was saved" in stdout
    assert "step 1 |" not in stdout and not (out / "ckpt.pt").exists()


def test_a_second_signal_a_moment_later_stops_at_once(tmp_path, data_dir):
    """The first signal asks the run to finish its step and save; a second one, a second or more
    later, stops it at once (here inside a long evaluation), keeping what was saved before."""
    out = tmp_path / "out"
    proc = start_train(tiny_args(data_dir, out, "--eval_iters=100000", "--max_iters=50"), tmp_path)
    read_until(proc, "tokens per optimizer step")
    time.sleep(3)  # set-up is done a moment after that line; the evaluation takes far longer
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout[-2000:] + stderr
    assert time.monotonic() - began < 30 and "Traceback" not in stderr
    assert stderr.strip().startswith("interrupted; out_dir keeps the checkpoints")


def test_a_missing_web_corpus_is_refused_under_torchrun_without_waiting(tmp_path):
    """Building a corpus takes hours; inside a torchrun job the other processes would wait for it
    in a collective with a timeout. train.py refuses in one line and names the command instead."""
    began = time.monotonic()
    result = run_script("train.py", ["--dataset=fineweb_edu", f"--data_dir={tmp_path}",
                                     "--device=cpu", f"--out_dir={tmp_path / 'out'}"],
                        cwd=tmp_path, check=False, launcher=torchrun(2))
    assert result.returncode != 0 and time.monotonic() - began < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "python prepare.py fineweb_edu" in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "fineweb_edu").exists()


def test_the_torch_version_message_is_reachable_without_muon(tmp_path):
    """On a torch without torch.optim.Muon, train.py still imports, and a Muon config says which
    torch it needs in one line (BatchedMuon is imported only by Muon runs)."""
    code = ("import sys, torch; del torch.optim.Muon; sys.path.insert(0, sys.argv[1]); "
            "import train; sys.exit(train.main(sys.argv[2:]))")
    result = subprocess.run([sys.executable, "-c", code, str(REPO), "--muon_lr=0.02"],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "needs torch.optim.Muon (torch >= 2.9)")


@pytest.mark.parametrize("capability, triton, fp16, compiles", [
    ((8, 0), True, True, True),     # an A100 with Triton
    ((8, 0), False, True, False),   # Windows wheels: no Triton, so inductor cannot compile
    ((6, 1), True, False, False)])  # Pascal: no tensor cores, so neither fp16 nor compile pays
def test_a_cuda_gpu_compiles_only_with_triton_and_uses_fp16_only_with_tensor_cores(
        monkeypatch, capability, triton, fp16, compiles):
    """The hardware's answers stand in for a GPU this machine lacks; the rule is the real code."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(device_module, "has_triton", lambda: triton)
    caps = device_module.capabilities("cuda")
    assert (caps.fp16, caps.compile) == (fp16, compiles)
    expected = "float16" if fp16 else "float32"
    assert device_module.model_dtype("auto", "cuda", {"mlp": "gelu"}) == expected
