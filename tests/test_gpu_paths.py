"""The CUDA paths' bugs that a CPU can reproduce (docs/gpu.md): mixed precision at inference,
GradScaler with two optimizers, resuming another device's optimizer state, file decisions under
torchrun, batch copies, and the MFU peak table. Each test failed on the code before its fix."""
import copy
import math
import os
import signal
import socket
import subprocess
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import tinygpt.device as device_module
from conftest import ENV, REPO, TINY, records, run_train, tiny_model
from model import GPT, GPTConfig
from tinygpt.checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from tinygpt.data import Batches, estimate_loss, final_report, full_split_loss, load_meta
from tinygpt.device import gpu_peak_flops
from tinygpt.optim import clip_and_step, make_optimizers


def save_byte_checkpoint(out_dir, **model_args):
    """A tiny untrained byte-level GPT saved as train.py saves one, so that sample.py can load
    it."""
    args = dict(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16, **model_args)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    out_dir.mkdir()
    save_checkpoint(out_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": args,
                                          "config": {}, "step": 0,
                                          "meta": {"tokenizer": "byte", "vocab_size": 256}})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sample_loads_an_alibi_model_trained_with_fp32_attention_in_half_precision(tmp_path, dtype,
                                                                                   capsys):
    # sample.py casts the weights (and the ALiBi slopes with them) to the inference dtype, while
    # attn_float32 keeps q in fp32: the mask must follow the query's dtype, or sdpa rejects it.
    save_byte_checkpoint(tmp_path / "out", pos="alibi", attn_float32=True)
    for sinks in ("0", "4"):  # past the window, with and without attention sinks
        code = sample.main([f"--out_dir={tmp_path / 'out'}", "--device=cpu", f"--dtype={dtype}",
                            "--start=ab", "--max_new_tokens=24", "--temperature=0",
                            f"--sink_tokens={sinks}"])
        assert code == 0, capsys.readouterr().err


def optimizers_of(model, device_type="cpu", fused=None):
    return make_optimizers(model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99),
                           device_type=device_type, muon_lr=0.02, fused=fused)


@pytest.mark.parametrize("bad", [(0, math.inf), (1, math.inf), (0, math.nan), (1, math.nan)],
                         ids=["inf-adamw", "inf-muon", "nan-adamw", "nan-muon"])
def test_fp16_overflow_in_one_optimizer_skips_only_it_and_the_other_steps_on_its_own_gradients(bad):
    bad_index, bad_value = bad
    model = tiny_model(n_layer=1).train()
    reference = copy.deepcopy(model)
    optimizers, reference_optimizers = optimizers_of(model), optimizers_of(reference)
    scaler = torch.amp.GradScaler("cpu", enabled=True)  # what train.py's float16 runs use
    scale = scaler.scale(torch.ones(())).item()  # the loss scale backward would have multiplied in
    torch.manual_seed(1)
    for p, q in zip(model.parameters(), reference.parameters()):
        q.grad = torch.randn_like(p) * 1e-3  # small: the clip at 1.0 leaves them as they are
        p.grad = q.grad * scale  # as backward of the scaled loss leaves them
    overflowed = [p for group in optimizers[bad_index].param_groups for p in group["params"]]
    overflowed[0].grad.view(-1)[0] = bad_value
    before = [p.detach().clone() for p in model.parameters()]
    clip_and_step(optimizers, scaler, model.parameters(), grad_clip=1.0)
    reference_optimizers[1 - bad_index].step()  # the other optimizer alone, on the true gradients

    skipped = {id(p) for p in overflowed}
    for p, q, p0 in zip(model.parameters(), reference.parameters(), before):
        if id(p) in skipped:
            assert torch.equal(p, p0), "the optimizer whose gradients overflowed must skip its step"
        else:
            assert torch.isfinite(p).all()
            # A normal step on its own gradients.
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
            assert not torch.equal(p, p0)
    assert scaler.get_scale() == scale / 2  # and the scale backs off


def test_resumed_optimizer_state_takes_this_runs_kernel_whatever_the_checkpoint_had():
    # An unfused run (a Mac, an older checkpoint) saves AdamW with fused=False (step counts on the
    # host); a CUDA run's fused kernel needs them on the GPU. `meta` stands in for the GPU: no data,
    # but devices are tracked as they would be on one.
    for saved_fused in (False, True):
        model = tiny_model(n_layer=1).train()
        cpu_optimizers = make_optimizers(model, 0.1, 1e-2, (0.9, 0.99), "cpu", muon_lr=0.02,
                                         fused=saved_fused)
        zeros = torch.zeros((1, 4), dtype=torch.long)
        model(zeros, zeros)[1].backward()
        for optimizer in cpu_optimizers:
            optimizer.step()
        with torch.device("meta"):
            gpu_model = tiny_model(n_layer=1)
        # As CUDA's capabilities say.
        gpu_optimizers = optimizers_of(gpu_model, device_type="cuda", fused=True)
        for optimizer, optimizer_on_cpu in zip(gpu_optimizers, cpu_optimizers):
            load_optimizer_state(optimizer, optimizer_on_cpu.state_dict())
            for group in optimizer.param_groups:
                kernel_on_device = group.get("fused") or group.get("capturable")
                for p in group["params"]:
                    for name, value in optimizer.state[p].items():
                        # torch keeps these on the host.
                        host_step = name == "step" and not kernel_on_device
                        expected = torch.device("cpu") if host_step else p.device
                        assert value.device == expected, (name, saved_fused)
                        assert value.dtype == torch.float32
        assert gpu_optimizers[0].param_groups[0]["fused"] is True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(tmp_path, args, timeout=120) -> list:
    """train.py as two one-process torchrun agents (two 'nodes' meeting at a c10d rendezvous on
    127.0.0.1), each in its own folder, so that a relative out_dir is a different folder on each
    node: the set-up of a multi-node job without shared storage. Returns both finished processes."""
    port = free_port()
    launcher = ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}"]
    nodes = []
    for name in ("node_a", "node_b"):
        (tmp_path / name).mkdir(exist_ok=True)
        command = [*launcher, str(REPO / "train.py"), *args]
        nodes.append(subprocess.Popen(command, cwd=tmp_path / name, env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        for node in nodes:
            node.stdout_text, node.stderr_text = node.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        raise AssertionError(f"the two nodes hung for {timeout} s "
                             "(mismatched collectives?)") from None
    return nodes


@pytest.mark.slow  # two torchrun agents, each a rendezvous: the longest test of the default suite
def test_two_nodes_without_a_shared_out_dir_judge_the_best_checkpoint_and_refuse_to_resume_it(
        tmp_path, data_dir):
    # The lr jumps from warmup to 20 after step 4: val improves at step 4 and explodes by step 8, so
    # the final evaluation must reload best.pt (step 4), which exists on rank 0's node only.
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--out_dir=out", "--max_iters=8",
            "--eval_interval=4", "--warmup_iters=4", "--lr_decay_iters=4", "--learning_rate=0.05",
            "--min_lr=20"]
    run_train(args, cwd=tmp_path)  # one process, for reference
    [reference] = records(tmp_path / "out", "final")
    evals = records(tmp_path / "out", "eval")
    assert min(evals, key=lambda r: r["val"])["step"] == 4 != evals[-1]["step"]  # the premise

    nodes = run_two_nodes(tmp_path, args)
    tails = [node.stderr_text[-2000:] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], tails
    [rank0_out] = [tmp_path / name / "out" for name in ("node_a", "node_b")
                   if (tmp_path / name / "out" / "best.pt").exists()]
    [final] = records(rank0_out, "final")
    # Judged best.pt, as one process.
    assert final["val_loss_full"] == pytest.approx(reference["val_loss_full"], rel=1e-4)
    saved = (rank0_out / "ckpt.pt").read_bytes()

    # A rerun: rank 0 resumes its ckpt.pt, which the other node lacks.
    nodes = run_two_nodes(tmp_path, args)
    assert [node.returncode for node in nodes] == [1, 1]
    errors = "".join(node.stderr_text for node in nodes)
    # torchrun adds its own report.
    lines = [line for line in errors.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "does not see" in lines[0] and "shares" in lines[0], errors[-2000:]
    assert 'train.py", line' not in errors  # a one-line error, not a traceback of ours
    assert (rank0_out / "ckpt.pt").read_bytes() == saved  # nothing lost


@pytest.mark.slow
def test_two_nodes_one_without_the_weights_to_fine_tune_stop_together_with_one_line(tmp_path,
                                                                                    data_dir):
    # The path was checked while parsing the options, before the process group existed: the node
    # without it exited, printing only if it was rank 0, while the other waited in
    # init_process_group (for up to 30 minutes where the rendezvous store outlives the failed node;
    # here both ended with torchrun's tracebacks only).
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", "--max_iters=2"]
    (tmp_path / "node_a").mkdir()
    run_train([*args, "--out_dir=weights"], cwd=tmp_path / "node_a")
    # node_b has no ./weights.
    nodes = run_two_nodes(tmp_path, [*args, "--out_dir=out", "--init_from=weights"])
    tails = [node.stderr_text[-2000:] for node in nodes]
    assert [node.returncode for node in nodes] == [1, 1], tails
    errors = "".join(node.stderr_text for node in nodes)
    lines = [line for line in errors.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, errors[-2000:]
    assert "init_from='weights': no such file or folder on rank" in lines[0], errors[-2000:]
    # Nothing half-written.
    assert not any((tmp_path / name / "out").exists() for name in ("node_a", "node_b"))


class Stop(Exception):
    pass


def stop(*args, **kwargs):
    raise Stop


def test_under_torchrun_cuda_n_makes_only_the_local_ranks_gpu_current(monkeypatch):
    # --device=cuda:3 under torchrun: each process computes on cuda:LOCAL_RANK; making GPU 3
    # current first created a CUDA context there (~0.5 GB) from every process. No GPU here:
    # torch.cuda's answers are a fake.
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(device_module.tdist, "rendezvous", stop)
    for name, value in {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(Stop):  # NCCL's process group cannot start here
        device_module.start_distributed("cuda:3")
    assert made_current == ["cuda:1"]
    monkeypatch.delenv("RANK")
    # A plain run.
    assert device_module.start_distributed("cuda:3").device == "cuda:3"
    assert made_current[-1] == "cuda:3"


@pytest.mark.parametrize("name, bf16_peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA B200", 2250e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("NVIDIA A10", 125e12), ("NVIDIA A40", 149.7e12),
    ("Tesla V100-SXM2-16GB", 125e12), ("Tesla T4", 65e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12), ("NVIDIA RTX A6000", 154.8e12),
    # 0: unknown, MFU n/a.
    ("NVIDIA A10G", 0.0), ("NVIDIA RTX A4000", 0.0), ("NVIDIA GeForce GTX 1080 Ti", 0.0)])
def test_mfu_peak_of_a_gpu_is_its_own_datasheet_figure_not_a_namesakes(name, bf16_peak):
    # The datasheets' dense bf16 figures; a substring lookup gave an L40S the L4's and every H100
    # the SXM's.
    assert gpu_peak_flops(name, "bfloat16") == bf16_peak
    assert gpu_peak_flops(name, "float16") == bf16_peak
    assert (gpu_peak_flops(name, "float32") < bf16_peak) or bf16_peak == 0.0  # tf32 is slower


def test_batches_are_contiguous_so_that_pinned_copies_can_be_asynchronous(data_dir):
    # a non-contiguous host tensor is copied to a GPU through a pageable staging copy, synchronously
    for dataset in ("tiny", "reverse"):
        meta = load_meta(data_dir / dataset)
        batches = Batches(data_dir / dataset, meta, 16, "cpu")
        x, y = batches.batch("train", np.arange(4))
        assert x.is_contiguous() and y.is_contiguous()
        rows = batches.rows("train", np.arange(4))
        assert torch.equal(x, torch.from_numpy(rows[:, :-1]))  # the same values as before


def test_evaluation_feeds_the_model_at_most_the_per_process_batch_and_scores_the_same(data_dir):
    # Under torchrun a process trains on batch_size / world_size sequences; evaluating the whole
    # global batch at once could run out of memory at step 0. Pieces of `rows` must give the same
    # losses as whole batches.
    meta = load_meta(data_dir / "reverse")  # a task: the loss falls on the answers only
    batches = Batches(data_dir / "reverse", meta, 16, "cpu")
    model = tiny_model(vocab_size=meta["vocab_size"])
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].size(0)))
    whole = estimate_loss(model, batches, 3, 8, 0, 0, nullcontext())
    assert set(seen) == {8}
    seen.clear()
    in_pieces = estimate_loss(model, batches, 3, 8, 0, 0, nullcontext(), rows=3)
    assert max(seen) == 3 and sum(seen) == 2 * 3 * 8  # every sequence of both splits, 3 at a time
    assert in_pieces == pytest.approx(whole, rel=1e-6)
    seen.clear()
    [final, *_] = final_report(model, batches, nullcontext(), 3)
    full = full_split_loss(model, batches, "val", 64, nullcontext())[0]
    assert max(seen) <= 512 and final["val_loss_full"] == pytest.approx(full)


def worker_of(agent_pid) -> int:
    return int(Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()[0])


@pytest.mark.slow
def test_two_torchrun_agents_relaunch_a_killed_worker_and_resume_together(tmp_path, data_dir):
    # Each agent counts its own node's failures; the store prefix the relaunched processes meet
    # under must not depend on that count, or the two nodes would wait for each other under
    # different prefixes.
    port = free_port()
    launcher = ["torchrun", "--nnodes=2", "--nproc_per_node=1", "--max-restarts=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=test{port}"]
    args = [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={tmp_path / 'out'}",
            "--max_iters=40", "--lr_decay_iters=40", "--eval_interval=10", "--init_from=scratch"]
    agents = [subprocess.Popen([*launcher, str(REPO / "train.py"), *args], env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    output = []
    for line in agents[0].stdout:  # rank 0 prints, under either agent: read both
        output.append(line)
        if line.startswith("step 25 |"):
            os.kill(worker_of(agents[1].pid), signal.SIGKILL)
            break
    output += agents[0].communicate(timeout=240)[0]
    output += agents[1].communicate(timeout=240)[0]
    text = "".join(output)
    assert [agent.returncode for agent in agents] == [0, 0], text[-3000:]
    assert "resuming from" in text and load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 40
