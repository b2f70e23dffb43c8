"""The memory plan as a specification: it counts the model's parameters, comes within a quarter of
what a CPU training step really takes, and a run that cannot fit stops in one line naming only
options that do fit."""
import re
from dataclasses import asdict, fields

import pytest
import torch

from conftest import REPO, tiny_args, train_refusing
from model import GPT, GPTConfig
from tinygpt.checkpoint import model_to_train
from tinygpt.common import ConfigError, parse_options
from tinygpt.data import split_global_batch
from tinygpt.parallel import (
    HEADROOM,
    check_fits,
    fits,
    memory_plan,
    parameter_counts,
    parameter_total,
)
from tools.bench import CPU_SHAPES, TRAIN_DEFAULTS, bench_memory, config_model_args, measured_peak
from train import TrainConfig


@pytest.mark.parametrize("overrides", [{}, {"bias": True}, {"tie_weights": False},
                                       {"pos": "rope", "qk_norm": True},
                                       {"pos": "alibi", "mlp": "relu2", "bias": True,
                                        "tie_weights": False}])
def test_the_plan_counts_the_models_parameters(overrides):
    shape = {"n_layer": 3, "n_head": 4, "n_embd": 64, "block_size": 32, "vocab_size": 50}
    config = GPTConfig(**{**shape, **overrides})
    with torch.device("meta"):
        model = GPT(config)
    assert parameter_total(asdict(config)) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_args, rows, options", CPU_SHAPES[:3],
                         ids=["activations", "logits", "recomputed-blocks"])
def test_the_plan_is_within_a_quarter_of_a_measured_cpu_training_peak(model_args, rows, options):
    """The rise of a fresh process's peak resident memory over two float32 training steps
    (tools/bench.py measures it)."""
    plan = memory_plan({**asdict(GPTConfig()), **model_args}, "float32", rows, **options)
    peak = measured_peak(model_args, "float32", rows, **options)
    assert 0.75 * peak <= plan.total <= 1.25 * peak, (plan, peak)


def test_fsdp_divides_what_each_process_keeps_but_accumulation_keeps_whole_gradients():
    args = {**asdict(GPTConfig()), "n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257}
    one = memory_plan(args, "float32", 4)
    sharded = memory_plan(args, "float32", 4, world_size=8, fsdp=True)
    accumulating = memory_plan(args, "float32", 4, micro_steps=4, world_size=8, fsdp=True)
    assert sharded.optimizer == one.optimizer // 8
    counts = parameter_counts(args)  # gathered: the root, a block and the next one's prefetch
    assert sharded.weights == one.weights // 8 + 4 * (counts["root"] + 2 * counts["block"])
    assert sharded.gradients == one.gradients // 8 + 4 * (counts["root"] + counts["block"])
    assert accumulating.gradients > one.gradients  # whole until the reduce-scatter, and shards
    assert memory_plan(args, "float32", 4, world_size=8).total == one.total  # DDP: whole copies
    half = memory_plan(args, "bfloat16", 4, world_size=8, fsdp=True)  # autocast: whole copies
    assert half.weights - sharded.weights == 2 * (12 * 12 * 768 ** 2 + 50257 * 768)


def named_options(message) -> list:
    return re.findall(r"--batch_size=(\d+) --gradient_accumulation_steps=(\d+)|"
                      r"(--checkpoint_activations=True)|--fsdp=True over (\d+) processes", message)


def refusal(settings, free) -> str:
    with pytest.raises(ConfigError) as refused:
        check_fits(settings, free)
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_a_run_that_cannot_fit_is_told_options_that_fit_by_the_same_estimate():
    """Each named option is planned again as train.py would run it: the batch options through the
    real split."""
    args = {**asdict(GPTConfig()), "n_layer": 8, "n_embd": 512, "n_head": 8, "block_size": 128,
            "vocab_size": 65}
    settings = dict(model_args=args, dtype="float32", rows=12, micro_steps=1, world_size=2)
    free = 0.85 * memory_plan(**settings).total / HEADROOM  # activations about half of it
    message = refusal(settings, free)
    options = named_options(message)
    assert len(options) == 3, message  # a smaller micro-batch, recomputation, FSDP
    for batch_size, accumulation, recompute, processes in options:
        if batch_size:
            micro_steps, rows = split_global_batch(int(accumulation), int(batch_size), 2)
            assert micro_steps * rows == 12  # the same global batch
            plan = memory_plan(**{**settings, "rows": rows, "micro_steps": micro_steps})
        elif recompute:
            plan = memory_plan(**{**settings, "checkpoint_activations": True})
        else:
            plan = memory_plan(**{**settings, "fsdp": True, "world_size": int(processes)})
        assert fits(plan, free), message
    check_fits(settings, memory_plan(**settings).total / HEADROOM)  # what fits is not refused


def test_options_that_would_not_fit_are_not_named():
    """Weights and AdamW state dominate: no micro-batch or recomputation helps, only sharding over
    4 GPUs."""
    args = {**asdict(GPTConfig()), "n_layer": 24, "n_embd": 1024, "n_head": 16, "block_size": 64,
            "vocab_size": 50257}
    settings = dict(model_args=args, dtype="bfloat16", rows=1)
    free = memory_plan(**{**settings, "fsdp": True, "world_size": 4}).total / HEADROOM
    assert not fits(memory_plan(**{**settings, "fsdp": True, "world_size": 2}), free)
    message = refusal(settings, free)
    assert named_options(message) == [("", "", "", "4")], message
    assert "torchrun --nproc_per_node=4" in message
    message = refusal(settings, free / 100)
    assert "would fit" not in message and "no single option fits" in message


def test_train_prints_the_plan_and_stops_a_run_too_big_for_this_host_in_one_line(tmp_path, data_dir,
                                                                                 capsys):
    train = train_refusing(tiny_args(data_dir, tmp_path / "out", "--max_iters=1"), capsys, tmp_path)
    assert train.returncode == 0, train.stderr
    assert "memory per process: weights" in train.stdout and "free on the device" in train.stdout
    huge = train_refusing(tiny_args(data_dir, tmp_path / "big", f"--batch_size={2 ** 26}"), capsys,
                          tmp_path)  # terabytes of activations
    assert huge.returncode == 1 and not (tmp_path / "big" / "ckpt.pt").exists()
    [line] = huge.stderr.strip().splitlines()
    assert line.startswith("error: this run needs ~") and "--batch_size=" in line, line


def test_the_bench_reads_configs_as_train_py_does():
    assert TRAIN_DEFAULTS == {name: getattr(TrainConfig(), name) for name in TRAIN_DEFAULTS}
    for path in sorted((REPO / "configs").glob("*.py")):
        if "init_from" in path.read_text():
            continue  # a fine-tune's shape is its weights'
        cfg = parse_options(TrainConfig, [str(path)], config_files=True)
        args = config_model_args(path)
        assert args == model_to_train(cfg, {"vocab_size": args["vocab_size"]}, None)[0], path.name
        assert {f.name for f in fields(GPTConfig)} <= args.keys()


def test_the_gpu_table_in_the_docs_is_the_one_the_bench_prints(capsys):
    bench_memory(None)
    table = capsys.readouterr().out.strip()
    assert table in (REPO / "docs" / "gpu.md").read_text(), "python -m tools.bench --only=memory"
