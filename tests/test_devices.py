"""Every device a learner has, its rules checked on this CPU (docs/gpu.md, "Device rules"): the real
entry points (train.py's main with its evaluations, checkpoints and final report; sample.py;
tools.evaluate) run here under the rules of an Apple GPU (MPS), of an fp16-only CUDA GPU (T4, V100),
and of DDP on several processes.

A device absent here enters in one place: tinygpt.device.capabilities, which every hardware decision
reads."""
import json
import re
import shlex
import shutil
import sys
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sample
import tinygpt.device as device_module
import tools.bench
import tools.evaluate
import tools.interpret
from conftest import REPO, records, run_script, tiny_args, tiny_model, torchrun, train_here
from model import GPT, GPTConfig
from sample import SampleConfig
from tinygpt.checkpoint import check_free_space, checkpoint_bytes, load_checkpoint
from tinygpt.common import parse_options
from tinygpt.device import Capabilities, capabilities
from tinygpt.optim import clip_and_step, make_optimizers
from train import TrainConfig

# The real function's answer for an Apple GPU: no bf16, no fp16 autocast, no compile.
MPS = capabilities("mps")
# Compute capability 7.5: fp16 tensor cores, bf16 emulated.
T4 = Capabilities(bf16=False, fp16=True, compile=True, fused_adamw=True)
H100 = Capabilities(bf16=True, fp16=True, compile=True, fused_adamw=True)


@contextmanager
def pretending(caps):
    """Every device reads as one with caps, through the one function that asks the hardware."""
    real = device_module.capabilities
    device_module.capabilities = lambda device: caps
    try:
        yield
    finally:
        device_module.capabilities = real


class AppleGpuRules(TorchDispatchMode):
    """Fails at the first operation an Apple GPU refuses or this repo must not use there: a float64
    tensor (MPS has none), pinned memory, or anything under autocast (dtype 'auto' is float32
    there). Fused AdamW runs: torch has an MPS kernel for it. On this CPU every tensor counts as on
    the device, host ones too: stricter than a Mac."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        assert "pin_memory" not in name, f"{name}: not on MPS"
        assert not torch.is_autocast_enabled("cpu"), \
            f"{name} under autocast, where MPS computes in float32"
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            assert not (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float64), \
                f"{name} made a float64 tensor: MPS has no float64"
        return out


def refuse_compile(*args, **kwargs):
    raise AssertionError("torch.compile on a device where it is off by default")


def test_a_mac_trains_evaluates_saves_samples_and_scores_under_the_apple_gpu_rules(
        tmp_path, data_dir, monkeypatch, capsys):
    # Before the fix the step-0 evaluation accumulated in float64 on the device: every Mac stopped
    # there.
    monkeypatch.setattr(torch, "compile", refuse_compile)
    out = tmp_path / "out"
    with pretending(MPS), AppleGpuRules():
        train_here(tiny_args(data_dir, out, "--dtype=auto", "--pos=rope", "--max_iters=4",
                             "--eval_interval=2"), tmp_path)
        printed = capsys.readouterr().out
        assert "dtype float32, compile False" in printed and "final val loss (full split" in printed
        # 40 tokens: past the 16-token window, with and without sinks.
        for extra in ([], ["--sink_tokens=4"]):
            code = sample.main([f"--out_dir={out}", "--device=cpu", "--dtype=auto", "--start=the ",
                                "--max_new_tokens=40", *extra])
            assert code == 0, capsys.readouterr().err
        # The final report; then the cache, the sinks and no cache at all.
        for extra in ([], ["--stream=48"]):
            argv = [f"--out_dir={out}", "--device=cpu", "--dtype=auto", *extra]
            assert tools.evaluate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "final val loss" in printed and "full recompute (no cache)" in printed


def test_gradscaler_steps_for_real_in_fp16_where_auto_picks_fp16(tmp_path, data_dir, monkeypatch,
                                                                  capsys):
    # An fp16-only GPU (T4) with a GELU model: 'auto' is fp16 with a GradScaler, run here in CPU
    # fp16 (eager: the T4 would compile; this CPU takes seconds to). A T4's MFU peak is its
    # datasheet's, not this CPU's emulated fp16.
    monkeypatch.setattr(device_module, "measured_matmul_flops", lambda dtype: 0.0)
    out = tmp_path / "out"
    with pretending(T4):
        train_here(tiny_args(data_dir, out, "--dtype=auto", "--compile=False", "--max_iters=6",
                             "--eval_interval=3", "--muon_lr=0.02"), tmp_path)
    assert "dtype float16," in capsys.readouterr().out
    scaler = load_checkpoint(out / "ckpt.pt")["scaler"]
    # Six steps without an overflow, scaled.
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 6
    [final] = records(out, "final")
    assert final["val_loss_full"] < records(out, "eval")[0]["val"]  # it learned


def train_model_args(config, overrides=()) -> dict:
    """The model fields train.py builds from config (a shipped config and overrides): a fine-tune's
    come from the weights it names: GPT-2's (GELU), or the run of the shipped config that writes
    that out_dir."""
    cfg = parse_options(TrainConfig, [str(config), *overrides], config_files=True)
    if cfg.init_from.startswith("gpt2"):
        return {"mlp": "gelu_tanh"}
    if cfg.init_from not in ("auto", "resume", "scratch"):
        [source] = [c for c in REPO.glob("configs/*.py")
                    if parse_options(TrainConfig, [str(c)], True).out_dir == cfg.init_from]
        return train_model_args(source)
    return {"mlp": cfg.mlp}


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.py")))
def test_every_shipped_config_gets_a_dtype_each_gpu_can_run(config):
    cfg = parse_options(TrainConfig, [str(REPO / "configs" / config)], config_files=True)
    model_args = train_model_args(REPO / "configs" / config)
    t4_fast = "float32" if model_args["mlp"] == "relu2" else "float16"
    for caps, fast in ((H100, "bfloat16"), (T4, t4_fast)):
        with pretending(caps):
            dtype = device_module.model_dtype(cfg.dtype, "cuda", model_args)
        assert dtype == (fast if cfg.dtype == "auto" else cfg.dtype)
        assert not (dtype == "float16" and model_args["mlp"] == "relu2"), "fp16 overflows ReLU^2"


class Asked(Exception):
    """Raised by the spy where an entry point would go on after asking for its dtype (a slow
    benchmark)."""


class Calls(list):
    stop = False  # True: raise Asked after recording


@pytest.fixture
def dtype_spy(monkeypatch):
    """[(dtype name, device, model_args, answer)] of every call of the one dtype decision, wherever
    it was imported."""
    calls, real = Calls(), device_module.model_dtype

    def spy(name, device, model_args):
        calls.append((name, device, dict(model_args), real(name, device, model_args)))
        if calls.stop:
            raise Asked
        return calls[-1][-1]
    for module in list(sys.modules.values()):
        if getattr(module, "model_dtype", None) is real:
            monkeypatch.setattr(module, "model_dtype", spy)
    return calls


def test_every_entry_point_takes_its_dtype_from_the_one_decision_and_the_models_own_config(
        tmp_path, data_dir, dtype_spy, capsys):
    # A ReLU^2 model on a T4: fp32, also when the command line leaves mlp at its default
    # (fine-tuning) or the tool never looked at mlp (tools.evaluate): before the fixes both got
    # fp16.
    relu2, tuned = tmp_path / "relu2", tmp_path / "tuned"
    train_here(tiny_args(data_dir, relu2, "--mlp=relu2", "--max_iters=2"), tmp_path)
    capsys.readouterr()
    dtype_spy.clear()
    with pretending(T4):
        train_here(tiny_args(data_dir, tuned, f"--init_from={relu2}", "--dtype=auto",
                             "--compile=False", "--max_iters=2"), tmp_path)
        assert "dtype float32," in capsys.readouterr().out
        runs = {"train.py (fine-tune)": dtype_spy[:]}
        entry_points = [("sample.py", sample.main, ["--max_new_tokens=4", "--start=a"]),
                        ("tools.evaluate", tools.evaluate.main, []),
                        ("tools.interpret", tools.interpret.main, ["--png=", "--prompt=the"])]
        for name, main, args in entry_points:
            dtype_spy.clear()
            code = main([f"--out_dir={tuned}", "--device=cpu", "--dtype=auto", *args])
            assert code == 0, capsys.readouterr().err
            runs[name] = dtype_spy[:]
        for name, calls in runs.items():
            asked = [(c[0], c[2]["mlp"], c[3]) for c in calls]
            assert asked == [("auto", "relu2", "float32")], name
        dtype_spy.clear()
        # The benchmark's generation model: GELU, on the CPU, at its --gen_dtype.
        dtype_spy.stop = True
        with pytest.raises(Asked):
            tools.bench.main(["--only=generate", "--gen_dtype=auto"])
    [(name, device, model_args, answer)] = dtype_spy
    assert (name, device, model_args["mlp"], answer) == ("auto", "cpu", "gelu", "float16")


def test_ddp_gradients_stay_in_their_buckets_across_steps_and_micro_steps(tmp_path, data_dir):
    # gradient_as_bucket_view: zeroing to None made every step's first backward allocate fresh
    # gradients (a second copy beside the buckets through the no_sync micro-steps), copied into the
    # buckets at the last one.
    args = tiny_args(data_dir, tmp_path / "out", "--max_iters=4", "--gradient_accumulation_steps=4",
                     "--eval_interval=1000")
    run_script("tests/grad_storage_driver.py", [tmp_path, *args], launcher=torchrun(2))
    for rank in (0, 1):
        # From step 2 on: 2 micro-steps, a step.
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(seen) > 5 and all(len(pointers) == 1 + 2 * (2 + 1) for pointers in seen.values())
        moved = {number: sorted(set(pointers)) for number, pointers in seen.items()
                 if len(set(pointers)) > 1}
        assert not moved, f"rank {rank}: gradients left their storage: {moved}"


def test_fp16_overflow_in_one_optimizer_clips_the_other_by_its_own_norm():
    # Before, an inf in Muon's gradients left AdamW's unclipped, on the very step where the loss
    # scale overflowed.
    model = tiny_model(n_layer=1).train()
    adamw, muon = make_optimizers(model, 0.0, 1e-2, (0.9, 0.99), "cpu", muon_lr=0.02)
    adamw_params = [p for group in adamw.param_groups for p in group["params"]]
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    torch.manual_seed(1)
    true = {p: torch.randn_like(p) for p in model.parameters()}  # norm well above the clip at 1
    scale = scaler.scale(torch.ones(())).item()  # the loss scale backward would have multiplied in
    for p in model.parameters():
        p.grad = true[p] * scale  # as backward of the scaled loss leaves them
    muon.param_groups[0]["params"][0].grad.view(-1)[0] = float("inf")
    clip_and_step([adamw, muon], scaler, model.parameters(), grad_clip=1.0)
    # The scale clip_grad_norm_ applies.
    factor = 1.0 / (torch.nn.utils.get_total_norm([true[p] for p in adamw_params]) + 1e-6)
    # AdamW's first moment after one step: (1 - beta1) x the gradient it stepped on.
    for p in adamw_params:
        torch.testing.assert_close(adamw.state[p]["exp_avg"], 0.1 * true[p] * factor, rtol=1e-5,
                                   atol=1e-8)
    assert not muon.state  # skipped: it overflowed


@pytest.mark.parametrize("caps, fused", [(capabilities("cpu"), True), (T4, True), (H100, True),
                                         (MPS, True)], ids=["this-cpu", "t4", "h100", "mps"])
def test_adamw_is_fused_where_the_device_has_the_kernel(caps, fused):
    # Elsewhere torch's default is its loop over the tensors: 4x the fused kernel's time on a CPU
    # (docs/results.md). A Mac ran that loop until the MPS rule followed torch's list of kernels.
    with pretending(caps):
        [adamw] = make_optimizers(tiny_model(n_layer=1), 0.1, 1e-2, (0.9, 0.99), "cpu")
    assert adamw.defaults["fused"] is fused


def test_checkpoint_size_is_estimated_before_the_run_and_a_disk_too_small_is_one_line(tmp_path,
                                                                                      data_dir):
    out = tmp_path / "out"
    train_here(tiny_args(data_dir, out, "--n_embd=64", "--max_iters=1"), tmp_path)
    model = GPT(GPTConfig(**load_checkpoint(out / "ckpt.pt")["model_args"]))
    real = (out / "ckpt.pt").stat().st_size
    # The weights and AdamW's two moments: most of it.
    assert 0.9 * real <= checkpoint_bytes(model) <= 1.1 * real
    # This disk's real figure; other processes may write meanwhile.
    free = shutil.disk_usage(tmp_path).free
    # Three checkpoints of a quarter of the free space fit.
    check_free_space(tmp_path / "new", free // 4)
    too_small = r"GB free, but this run needs up to .* another --out_dir"
    with pytest.raises(Exception, match=too_small) as error:
        # Folders not made yet: their disk is asked.
        check_free_space(tmp_path / "new" / "deeper", free // 2)
    assert "\n" not in str(error.value)


# ------------------------------------------------------ the first commands, as the docs print them

COMMENT = re.compile(r"(?P<device>cpu|cuda|mps), (?P<compile>compiled|eager), "
                     r"(?P<dtype>bf16|fp16|fp32|auto)"
                     r"(?: = (?P<fast>bf16|fp16|fp32)(?:, (?P<t4>bf16|fp16|fp32) on a T4)?)?")
SHORT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def commands(path, start, end) -> list:
    """(command words, comment) of the indented command lines between the headings start and end of
    a doc."""
    text = path.read_text()
    block = text[text.index(start):text.index(end, text.index(start))]
    lines = [line.strip() for line in block.splitlines()
             if line.startswith("    ") and "train.py" in line
             or line.startswith("    python sample.py")]
    return [(shlex.split(line.split("#")[0]), line.partition("#")[2]) for line in lines]


def check_command(words, comment, trained):
    """The options a command resolves to (its config file, then overrides, as the scripts parse
    them) are those its comment names: device, compiled or eager, and the dtype ('auto = X, Y on a
    T4': what auto gives)."""
    said = COMMENT.search(comment)
    assert said, f"{comment!r} does not say device, compiled or eager, and dtype"
    script = next(w for w in words if w.endswith(".py") and not w.startswith("configs/"))
    args = [str(REPO / w) if w.startswith("configs/") else w
            for w in words[words.index(script) + 1:]]
    is_train = script == "train.py"
    cfg = parse_options(TrainConfig if is_train else SampleConfig, args, config_files=is_train)
    model_args = (trained[cfg.out_dir] if script == "sample.py"
                  else train_model_args(args[0], args[1:]))
    trained[cfg.out_dir] = model_args
    assert cfg.device == said["device"], f"{shlex.join(words)}: device={cfg.device!r}"
    caps = {"cuda": H100, "mps": MPS, "cpu": capabilities("cpu")}[said["device"]]
    for device_caps, named in ((caps, said["fast"]), (T4, said["t4"])):
        with pretending(device_caps):
            compiled = getattr(cfg, "compile", False)  # sample.py always runs eager
            if compiled is None:
                compiled = device_module.capabilities(cfg.device).compile
            dtype = device_module.model_dtype(cfg.dtype, cfg.device, model_args)
        if device_caps is caps:
            assert compiled == (said["compile"] == "compiled"), \
                f"{shlex.join(words)}: compile={compiled}"
            assert cfg.dtype == ("auto" if said["dtype"] == "auto" else SHORT[said["dtype"]]), \
                f"{shlex.join(words)}: dtype={cfg.dtype!r}"
        if named:
            assert dtype == SHORT[named], f"{shlex.join(words)}: {dtype} on {device_caps}"
        assert not (dtype == "float16" and model_args["mlp"] == "relu2"), \
            f"{shlex.join(words)}: fp16 on ReLU^2"


def test_the_first_commands_on_a_gpu_do_what_their_comments_say():
    trained = {}
    found = commands(REPO / "docs" / "gpu.md", "## First commands on a GPU", "\n## ")
    assert len(found) >= 8
    for words, comment in found:
        check_command(words, comment, trained)


def test_the_readmes_mac_line_runs_on_the_apple_gpu_in_float32_eager():
    quick_start = commands(REPO / "README.md", "## Quick start", "\n## ")
    [mac] = [(w, c) for w, c in quick_start if "mps" in w[-1] + c]
    check_command(*mac, {})
    assert re.search(r"mps, eager, auto = fp32", mac[1])
