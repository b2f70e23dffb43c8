"""The CUDA paths' bugs that a CPU can reproduce (docs/gpu.md): mixed precision at inference, GradScaler
with two optimizers, resuming another device's optimizer state, file decisions under torchrun, batch
copies, and the MFU peak table. Each test failed on the code before its fix."""
import copy
import math

import pytest
import torch

from conftest import REPO, run_script, tiny_model
from model import GPT, GPTConfig
from tinygpt.checkpoint import save_checkpoint
from tinygpt.optim import clip_and_step, load_optimizer_state, make_optimizers

import sample


def save_byte_checkpoint(out_dir, **model_args):
    """A tiny untrained byte-level GPT saved as train.py saves one, so that sample.py can load it."""
    args = dict(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16, **model_args)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**args))
    out_dir.mkdir()
    save_checkpoint(out_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": args, "config": {}, "step": 0,
                                          "meta": {"tokenizer": "byte", "vocab_size": 256}})


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sample_loads_an_alibi_model_trained_with_fp32_attention_in_half_precision(tmp_path, dtype, capsys):
    # sample.py casts the weights (and the ALiBi slopes with them) to the inference dtype, while attn_float32
    # keeps q in fp32: the mask must follow the query's dtype, or sdpa rejects it.
    save_byte_checkpoint(tmp_path / "out", pos="alibi", attn_float32=True)
    for sinks in ("0", "4"):  # past the window, with and without attention sinks
        code = sample.main([f"--out_dir={tmp_path / 'out'}", "--device=cpu", f"--dtype={dtype}", "--start=ab",
                            "--max_new_tokens=24", "--temperature=0", f"--sink_tokens={sinks}"])
        assert code == 0, capsys.readouterr().err


def optimizers_of(model, device_type="cpu"):
    return make_optimizers(model, weight_decay=0.1, learning_rate=1e-2, betas=(0.9, 0.99), device_type=device_type,
                           muon_lr=0.02)


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
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)  # a normal step on its own gradients
            assert not torch.equal(p, p0)
    assert scaler.get_scale() == scale / 2  # and the scale backs off


def test_resumed_optimizer_state_takes_this_runs_kernel_whatever_the_checkpoint_had():
    # A CPU run saves AdamW with fused=False (step counts on the host); a CUDA run's fused kernel needs them on
    # the GPU. `meta` stands in for the GPU: no data, but devices are tracked as they would be on one.
    for saved_fused in (False, True):
        model = tiny_model(n_layer=1).train()
        cpu_optimizers = make_optimizers(model, 0.1, 1e-2, (0.9, 0.99), "cpu", muon_lr=0.02, fused=saved_fused)
        model(torch.zeros((1, 4), dtype=torch.long), torch.zeros((1, 4), dtype=torch.long))[1].backward()
        for optimizer in cpu_optimizers:
            optimizer.step()
        with torch.device("meta"):
            gpu_model = tiny_model(n_layer=1)
        gpu_optimizers = optimizers_of(gpu_model, device_type="cuda")  # fused, as on CUDA
        for optimizer, optimizer_on_cpu in zip(gpu_optimizers, cpu_optimizers):
            load_optimizer_state(optimizer, optimizer_on_cpu.state_dict())
            for group in optimizer.param_groups:
                kernel_on_device = group.get("fused") or group.get("capturable")
                for p in group["params"]:
                    for name, value in optimizer.state[p].items():
                        host_step = name == "step" and not kernel_on_device  # torch keeps these on the host
                        assert value.device == (torch.device("cpu") if host_step else p.device), (name, saved_fused)
                        assert value.dtype == torch.float32
        assert gpu_optimizers[0].param_groups[0]["fused"] is True
