"""FSDP2 and activation checkpointing as a specification: two gloo processes that shard the model
under torchrun train as one process does, checkpoints move between FSDP, DDP and one process, and
recomputing the blocks in the backward pass changes no loss while keeping fewer activations."""
import json
import shutil

import pytest
import torch

from conftest import (
    assert_same_weights,
    records,
    run_script,
    tiny_args,
    torchrun,
    train_here,
    train_losses,
    weights,
)
from model import GPT, GPTConfig
from tinygpt.device import Dist
from tinygpt.parallel import spread as save_memory

STEPS = ["--max_iters=20", "--lr_decay_iters=20", "--eval_interval=10"]
HALF = ["--max_iters=10", "--lr_decay_iters=20", "--eval_interval=10"]


def assert_close_losses(a, b, rel):
    assert a.keys() == b.keys() == set(range(1, max(a) + 1))
    for step, loss in a.items():
        assert b[step] == pytest.approx(loss, rel=rel), step


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def train_two(data_dir, out, *args, cwd):
    """A 2-process torchrun of train.py; its stdout."""
    return run_script("train.py", tiny_args(data_dir, out, *args), cwd=cwd,
                      launcher=torchrun(2)).stdout


# With accumulation the same run also recomputes its blocks: FSDP's gathering meets recomputation.
@pytest.mark.parametrize("accumulation, recompute", [(1, False), (4, True)],
                         ids=["one-micro-step", "accumulation"])
def test_fsdp_two_processes_match_one_process_and_sync_once_a_step(tmp_path, data_dir, accumulation,
                                                                   recompute):
    args = [*STEPS, f"--gradient_accumulation_steps={accumulation}"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(tiny_args(data_dir, one, *args), cwd=tmp_path)
    sharded = [*args, "--fsdp=True", f"--checkpoint_activations={recompute}"]
    run_script("tests/fsdp_sync_driver.py", [tmp_path, *tiny_args(data_dir, two, *sharded)],
               cwd=tmp_path, launcher=torchrun(2))
    assert_close_losses(train_losses(one), train_losses(two), rel=1e-5)
    evals_one, evals_two = records(one, "eval"), records(two, "eval")
    assert [r["val"] for r in evals_two] == pytest.approx([r["val"] for r in evals_one], rel=1e-5)
    [final_one], [final_two] = records(one, "final"), records(two, "final")
    assert final_two["val_loss_full"] == pytest.approx(final_one["val_loss_full"], rel=1e-5)
    assert_close_weights(weights(one), weights(two))
    for rank in (0, 1):  # two blocks and the root: a reduce-scatter each a step, not a micro-step
        counts = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert counts == {"reduce_scatters": 3 * 20, "steps": 20}


def test_muon_under_fsdp_orthogonalizes_whole_matrices(tmp_path, data_dir):
    """Newton-Schulz mixes every row of a matrix: a shard alone would give another update. Muon's
    iterations amplify a gradient's last bits (DDP differs from one process as much), hence 1e-3."""
    args = [*STEPS, "--muon_lr=0.02"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(tiny_args(data_dir, one, *args), cwd=tmp_path)
    train_two(data_dir, two, *args, "--fsdp=True", cwd=tmp_path)
    assert_close_losses(train_losses(one), train_losses(two), rel=1e-3)
    assert torch.load(two / "ckpt.pt", weights_only=True)["muon"]["state"]  # whole momentum buffers


def test_fp16_under_fsdp_steps_fused_adamw_with_the_sharded_scaler(tmp_path, data_dir):
    """float16's loss scale over shards: torch's sharded scaler agrees on infs over the processes,
    and its flags must fit fused AdamW's step counts (a shape error there before)."""
    # No clip: the scaler unscales at the step.
    args = [*STEPS, "--dtype=float16", "--grad_clip=0.0"]
    one, two = tmp_path / "one", tmp_path / "two"
    train_here(tiny_args(data_dir, one, *args), cwd=tmp_path)
    train_two(data_dir, two, *args, "--fsdp=True", cwd=tmp_path)
    assert_close_losses(train_losses(one), train_losses(two), rel=1e-4)
    assert torch.load(two / "ckpt.pt", weights_only=True)["scaler"]["scale"] > 0


@pytest.fixture(scope="module")
def fsdp_runs(data_dir, tmp_path_factory):
    """(a straight FSDP run of 20 steps, an FSDP run stopped at step 10): out_dirs to copy."""
    root = tmp_path_factory.mktemp("fsdp")
    train_two(data_dir, root / "straight", *STEPS, "--fsdp=True", cwd=root)
    train_two(data_dir, root / "half", *HALF, "--fsdp=True", cwd=root)
    return root / "straight", root / "half"


def copied(run, folder):
    shutil.copytree(run, folder / "out")
    return folder / "out"


def test_resume_under_fsdp_matches_the_uninterrupted_run_bitwise(tmp_path, data_dir, fsdp_runs):
    straight, half = fsdp_runs
    out = copied(half, tmp_path)
    stdout = train_two(data_dir, out, *STEPS, "--fsdp=True", "--init_from=resume", cwd=tmp_path)
    assert "resuming from" in stdout and "at step 10" in stdout
    assert train_losses(out) == train_losses(straight)
    assert_same_weights(weights(out), weights(straight))


def test_an_fsdp_checkpoint_is_plain_and_resumes_under_ddp_and_in_one_process(tmp_path, data_dir,
                                                                             fsdp_runs):
    straight, half = fsdp_runs
    checkpoint = torch.load(half / "ckpt.pt", weights_only=True)
    plain = GPT(GPTConfig(**checkpoint["model_args"]))
    shapes = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in checkpoint["model"].items()} == shapes
    moments = checkpoint["optimizer"]["state"]  # torch's numbers: matrices first, then the rest
    in_groups = ([p for p in plain.parameters() if p.dim() >= 2]
                 + [p for p in plain.parameters() if p.dim() < 2])
    assert sorted(moments) == list(range(len(in_groups)))
    assert [moments[i]["exp_avg"].shape for i in sorted(moments)] == [p.shape for p in in_groups]
    ddp = copied(half, tmp_path / "ddp")
    train_two(data_dir, ddp, *STEPS, "--init_from=resume", cwd=tmp_path)
    single = copied(half, tmp_path / "single")
    train_here(tiny_args(data_dir, single, *STEPS, "--init_from=resume"), cwd=tmp_path)
    for out in (ddp, single):
        assert_close_losses(train_losses(straight), train_losses(out), rel=1e-5)
        assert_close_weights(weights(straight), weights(out))


@pytest.mark.parametrize("written_by", ["one process", "ddp"])
def test_one_process_and_ddp_checkpoints_resume_under_fsdp(tmp_path, data_dir, written_by):
    straight, out = tmp_path / "straight", tmp_path / "out"
    train_here(tiny_args(data_dir, straight, *STEPS), cwd=tmp_path)
    if written_by == "ddp":
        train_two(data_dir, out, *HALF, cwd=tmp_path)
    else:
        train_here(tiny_args(data_dir, out, *HALF), cwd=tmp_path)
    train_two(data_dir, out, *STEPS, "--fsdp=True", "--init_from=resume", cwd=tmp_path)
    assert_close_losses(train_losses(straight), train_losses(out), rel=1e-5)
    assert_close_weights(weights(straight), weights(out))


def test_activation_checkpointing_gives_the_same_losses_and_checkpoints(tmp_path, data_dir):
    """With dropout: the recomputed forward pass must draw the masks the first one drew."""
    args = [*STEPS, "--dropout=0.1"]
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    train_here(tiny_args(data_dir, plain, *args), cwd=tmp_path)
    train_here(tiny_args(data_dir, recomputed, *args, "--checkpoint_activations=True"),
               cwd=tmp_path)
    assert_close_losses(train_losses(plain), train_losses(recomputed), rel=1e-6)
    assert weights(recomputed).keys() == weights(plain).keys()  # no wrapper in the names


def saved_bytes(model, x, y) -> int:
    """Bytes of what autograd keeps for the backward pass of one forward pass (a storage once)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(x, y)[1]
    loss.backward()
    return sum(storages.values())


def test_activation_checkpointing_keeps_a_fraction_of_the_activations():
    """Counted, not timed: what autograd holds after the forward pass (peak memory of CPU runs:
    docs/gpu.md, from python -m tools.bench --only=memory_cpu)."""
    config = GPTConfig(n_layer=4, n_head=4, n_embd=64, block_size=64, vocab_size=32)
    x, y = torch.randint(0, 32, (8, 64)), torch.randint(0, 32, (8, 64))
    plain = saved_bytes(GPT(config), x, y)
    recomputed = saved_bytes(save_memory(GPT(config), Dist(), checkpoint_activations=True), x, y)
    assert recomputed < plain / 4
