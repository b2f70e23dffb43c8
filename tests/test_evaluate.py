"""evaluate.py: the full-split loss is the mean over every scored token, and the command scores a
checkpoint exactly as the end of its training run did."""
import json
import math
import re
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (
    ENV,
    REPO,
    assert_one_line_error,
    exact_match_by_hand,
    full_split_loss_by_hand,
    records,
    run_script,
    split_tokens,
    tiny_model,
)
from model import GPT, GPTConfig
from tinygpt.checkpoint import save_checkpoint
from tinygpt.data import Batches, full_split_loss, load_meta
from tinygpt.evaluation import streaming_losses
from tools.evaluate import main as evaluate_main


def naive_token_mean(model, batches, split):
    """Cross-entropy of every scored target token of the split, averaged in one go."""
    picks = batches.full_split_picks(split)
    rows = torch.from_numpy(batches.rows(split, picks))
    targets = rows[:, 1:].clone()
    if batches.task:
        targets[:, :batches.prompt_len - 1] = -1
    logits, _ = model(rows[:, :-1], targets)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                                reduction="none")
    scored = targets.flatten() != -1
    return per_token[scored].mean().item(), int(scored.sum())


@pytest.mark.parametrize("dataset, block_size", [("reverse", 12), ("tiny", 16)])
def test_full_split_loss_weights_every_scored_token_equally(data_dir, dataset, block_size):
    meta = load_meta(data_dir / dataset)
    batches = Batches(data_dir / dataset, meta, block_size, "cpu")
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=block_size)
    # Reverse: 200 examples = 3 x 64 + 8, so an unweighted mean of batches would differ.
    batch_size = 64
    loss, tokens = full_split_loss(model, batches, "val", batch_size, nullcontext())
    expected, expected_tokens = naive_token_mean(model, batches, "val")
    assert tokens == expected_tokens
    assert loss == pytest.approx(expected, rel=1e-5)
    if dataset == "reverse":
        assert tokens == 200 * 6  # six answer letters per held-out example


def test_evaluate_scores_a_checkpoint_as_its_training_run_did(reverse_run, data_dir):
    """python -m tools.evaluate on a finished run prints the final scores its training run logged,
    and both are what a forward pass over the held-out examples gives, worked out here on best.pt
    (what both load)."""
    out, _ = reverse_run
    final = records(out, "final")[-1]
    test = [r for r in records(out, "test") if "exact_match" in r][-1]
    result = run_script("tools/evaluate.py", [f"--out_dir={out}", "--device=cpu"])
    loss = float(re.search(r"final val loss \(full split, [\d,]+ tokens\): ([\d.]+)",
                           result.stdout).group(1))
    accuracy = float(re.search(r"test exact match: ([\d.]+)%", result.stdout).group(1))
    assert loss == pytest.approx(final["val_loss_full"], abs=1e-4)
    assert accuracy == pytest.approx(100 * test["exact_match"], abs=0.05)
    best = torch.load(out / "best.pt", weights_only=True)
    model = GPT(GPTConfig(**best["model_args"]))
    model.load_state_dict(best["model"])
    by_hand, _ = full_split_loss_by_hand(model, data_dir / "reverse")
    assert final["val_loss_full"] == pytest.approx(by_hand, rel=1e-5)
    assert abs(test["exact_match"] - exact_match_by_hand(model, data_dir / "reverse")) <= 1 / 200
    assert json.loads((out / "config.json").read_text())["exact_match_bar"] == 0.95
    assert "(bar 95%)" in result.stdout


def test_evaluate_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_script("tools/evaluate.py", [f"--out_dir={tmp_path}", "--ckpt=nothing.pt"],
                        check=False)
    assert_one_line_error(result, "no checkpoint at", "nothing.pt")


@pytest.mark.parametrize("use_cache, sink_tokens", [(True, 0), (True, 2), (False, 0)])
def test_streaming_losses_inside_the_window_are_the_full_forward_pass_losses(use_cache,
                                                                             sink_tokens):
    model = tiny_model(pos="alibi", vocab_size=20, block_size=16)
    tokens = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(0))
    losses, speed = streaming_losses(model, tokens, use_cache, sink_tokens)
    logits, _ = model(tokens[None, :16], tokens[None, 1:17])
    expected = F.cross_entropy(logits[0], tokens[1:17], reduction="none")
    assert losses.shape == (39,) and speed > 0
    # Every way sees the whole prefix.
    torch.testing.assert_close(losses[:16], expected, rtol=0, atol=1e-5)


def save_random_run(folder, data_dir, **overrides):
    """A checkpoint of a random model (scaled up, so that the context matters) as a run on the
    'tiny' data would leave it; the model too."""
    meta = load_meta(data_dir / "tiny")
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=16, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    folder.mkdir()
    save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(),
                                         "model_args": asdict(model.config), "step": 2,
                                         "config": {"data_dir": str(data_dir), "dataset": "tiny"},
                                         "meta": meta})
    return model


def streamed_loss_by_hand(model, tokens, way, sinks=2):
    """Mean loss on the tokens past the window when they arrive one at a time and the context is
    kept as generation keeps it: 'slide' restarts a full window from its last half, 'sinks' keeps
    the first tokens and the latest, 'recompute' reads the last block_size tokens."""
    block, start, losses = model.config.block_size, 0, []
    for t in range(1, len(tokens)):
        if way == "slide" and t - start > block:
            start = t - block // 2
        if way == "slide":
            window = tokens[start:t]
        elif way == "sinks" and t > block:
            window = torch.cat([tokens[:sinks], tokens[t - block + sinks:t]])
        else:
            window = tokens[max(0, t - block):t]
        logits = model(window[None], window[None])[0][0, -1]
        losses.append(F.cross_entropy(logits, tokens[t]).item())
    return sum(losses[block:]) / len(losses[block:])


def test_evaluate_reads_past_the_window_where_positions_allow_and_says_so_where_not(
        tmp_path, data_dir, capsys):
    """In-process (the CLI itself is run by the test above). One ALiBi layer, so that a sink cache
    holds exactly what a forward pass over the sinks and the latest tokens computes: every number
    evaluate prints is worked out here from the data file."""
    model = save_random_run(tmp_path / "alibi", data_dir, pos="alibi", n_layer=1)
    assert evaluate_main([f"--out_dir={tmp_path / 'alibi'}", "--block_size=32",
                          "--device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "windows of 32 tokens (2x the trained 16)" in out
    loss, tokens = full_split_loss_by_hand(model, data_dir / "tiny", block_size=32)
    reported = re.search(r"final val loss \(full split, ([\d,]+) tokens\): ([\d.]+)", out)
    assert int(reported.group(1).replace(",", "")) == tokens
    assert float(reported.group(2)) == pytest.approx(loss, abs=1.5e-4)

    assert evaluate_main([f"--out_dir={tmp_path / 'alibi'}", "--stream=40", "--sink_tokens=2",
                          "--device=cpu"]) == 0
    out = capsys.readouterr().out
    ways = re.findall(r"(sliding window|2 sinks|full recompute).* loss ([\d.]+) "
                      r"\(([\d.]+) bits per byte\) +[\d.]+ tokens/s", out)
    printed = {way: loss for way, loss, _ in ways}
    # Characters: a byte each.
    assert all(float(bpb) == pytest.approx(float(loss) / math.log(2), abs=2e-4)
               for _, loss, bpb in ways)
    val = split_tokens(data_dir / "tiny", "val")[:40]
    expected = {"sliding window": streamed_loss_by_hand(model, val, "slide"),
                "2 sinks": streamed_loss_by_hand(model, val, "sinks"),
                "full recompute": streamed_loss_by_hand(model, val, "recompute")}
    # The premise: the three ways differ here.
    assert len(set(round(v, 3) for v in expected.values())) == 3
    assert {k: float(v) for k, v in printed.items()} == pytest.approx(expected, abs=1.5e-4)

    save_random_run(tmp_path / "learned", data_dir)
    assert evaluate_main([f"--out_dir={tmp_path / 'learned'}", "--block_size=32",
                          "--device=cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pos='learned' has positions for 16 tokens only" in err


KEPT_MEMORY_CHILD = """
import sys
from contextlib import nullcontext
from pathlib import Path
import numpy as np
import torch
from model import GPT, GPTConfig
from tinygpt.data import Batches, load_meta
from tinygpt.device import keep_freed_host_memory
from tinygpt.data import estimate_loss, full_split_loss
from tinygpt.optim import make_optimizers

assert keep_freed_host_memory()  # glibc's heap keeps what is freed, as configs/shakespeare.py asks
folder, vocab = Path(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = GPT(GPTConfig(block_size=64, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32))
batches = Batches(folder, load_meta(folder), 64, "cpu")
[optimizer] = make_optimizers(model, 0.1, 1e-3, (0.9, 0.99), "cpu")
for step in range(2):  # a trained process: the freed logits and their gradients are in the heap
    model(*batches.batch("train", np.arange(16) * 64))[1].backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

logits_bytes = 16 * 64 * vocab * 4
for name, evaluate in [("full split",
                        lambda: full_split_loss(model, batches, "val", 16, nullcontext())),
                       ("estimate",
                        lambda: estimate_loss(model, batches, 20, 16, 0, 0, nullcontext()))]:
    before = rss()
    evaluate()
    print(name, (rss() - before) / logits_bytes)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(),
                    reason="reads Linux's /proc for the resident memory")
def test_evaluations_under_keep_freed_memory_do_not_grow_the_heap_batch_by_batch(tmp_path):
    # Each batch's loss used to be kept as a tensor until the end: glibc carved it out of the memory
    # the batch's logits had just freed, so the next batch's logits no longer fit there, and the
    # heap grew by a batch's logits or more every batch (over 20 batches here; 12 GB in
    # configs/shakespeare.py's final evaluation).
    vocab = 4096
    rng = np.random.default_rng(0)
    for split, n in (("train", 20000), ("val", 64 * 16 * 20 + 1)):
        rng.integers(0, vocab, n).astype("<u2").tofile(tmp_path / f"{split}.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab": [],
                                                    "vocab_size": vocab, "dtype": "uint16"}))
    result = subprocess.run([sys.executable, "-c", KEPT_MEMORY_CHILD, str(tmp_path), str(vocab)],
                            cwd=REPO, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = dict(line.rsplit(" ", 1) for line in result.stdout.splitlines())
    assert set(growth) == {"full split", "estimate"}
    # 20 batches each: a few logits at most.
    assert all(float(batches) < 4 for batches in growth.values()), growth


# -------------------------------------------------------------------------------- bits per byte


def test_bits_per_byte_converts_a_mean_loss_by_the_splits_tokens_per_byte():
    from tinygpt.data import bits_per_byte

    meta = {"val_tokens": 1000, "val_bytes": 3000}
    assert bits_per_byte(1.5, meta, "val") == pytest.approx(1.5 * 1000 / (math.log(2) * 3000))
    assert bits_per_byte(1.5, {"val_tokens": 10, "val_bytes": 10}, "val") == pytest.approx(
        1.5 / math.log(2)
    )
    assert (
        bits_per_byte(1.5, {"val_tokens": 1000}, "val") is None
    )  # a corpus: no byte count, no figure


def test_evaluate_prints_the_bits_per_byte_of_the_decoded_val_text_beside_the_loss(
    tmp_path, data_dir, capsys
):
    """Worked out from the files: the val text's UTF-8 bytes (tokens decoded), the loss by hand."""
    from tinygpt.tokenizer import tokenizer_from_meta

    model = save_random_run(tmp_path / "run", data_dir)
    assert evaluate_main([f"--out_dir={tmp_path / 'run'}", "--device=cpu"]) == 0
    out = capsys.readouterr().out
    loss, _ = full_split_loss_by_hand(model, data_dir / "tiny")
    meta, val = load_meta(data_dir / "tiny"), split_tokens(data_dir / "tiny", "val")
    val_bytes = len(tokenizer_from_meta(meta).decode(val.tolist()).encode("utf-8"))
    printed = re.search(
        r"final val loss \(full split, [\d,]+ tokens\): ([\d.]+) \(([\d.]+) bits per byte\)", out
    )
    assert float(printed.group(1)) == pytest.approx(loss, abs=1.5e-4)
    assert float(printed.group(2)) == pytest.approx(
        loss * len(val) / (math.log(2) * val_bytes), abs=2e-4
    )


# ------------------------------------------------------------------- batches sized from the logits

LIMITED_MEMORY_CHILD = """
import resource, sys
from tools.evaluate import main
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # no address space for more logits than fit
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.skipif(
    sys.platform != "linux", reason="limits the address space with Linux's RLIMIT_AS"
)
def test_evaluate_sizes_its_batches_so_a_gpt2_vocabulary_fits_in_memory(tmp_path):
    """A checkpoint with GPT-2's 50,257-token vocabulary: 64 windows of 128 tokens are 1.6 GB of
    logits and as much again for their log-softmax. In an address space of 3 GB the default must
    choose fewer windows and finish; 64 windows (the old default, asked for here) cannot."""
    vocab, block = 50257, 128
    data = tmp_path / "data" / "web"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4 * block + 1), ("val", 64 * block + 1)):
        rng.integers(0, vocab, n).astype("<u2").tofile(data / f"{split}.bin")
    meta = {
        "tokenizer": "gpt2",
        "vocab_size": vocab,
        "dtype": "uint16",
        "train_tokens": 4 * block + 1,
        "val_tokens": 64 * block + 1,
    }
    (data / "meta.json").write_text(json.dumps(meta))
    model = tiny_model(vocab_size=vocab, block_size=block, n_layer=1, n_embd=16)
    (tmp_path / "run").mkdir()
    save_checkpoint(
        tmp_path / "run" / "ckpt.pt",
        {
            "model": model.state_dict(),
            "model_args": asdict(model.config),
            "step": 1,
            "meta": meta,
            "config": {"data_dir": str(tmp_path / "data"), "dataset": "web"},
        },
    )

    def evaluate_in(limit, *args):
        return subprocess.run(
            [
                sys.executable,
                "-c",
                LIMITED_MEMORY_CHILD,
                str(limit),
                f"--out_dir={tmp_path / 'run'}",
                "--device=cpu",
                *args,
            ],
            cwd=REPO,
            env={**ENV, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    sized = evaluate_in(3 << 30)
    assert sized.returncode == 0, sized.stderr[-2000:]
    rows = int(re.search(r"trained 128\), (\d+) per pass", sized.stdout).group(1))
    assert 1 <= rows <= 16
    val = split_tokens(data, "val")
    x, y = val[:-1].view(64, block), val[1:].view(64, block)
    with torch.no_grad():  # by hand, four windows at a time
        loss = (
            torch.cat(
                [
                    F.cross_entropy(model(xb, yb)[0].flatten(0, 1), yb.flatten(), reduction="none")
                    for xb, yb in zip(x.split(4), y.split(4))
                ]
            )
            .mean()
            .item()
        )
    reported = re.search(r"final val loss \(full split, ([\d,]+) tokens\): ([\d.]+)", sized.stdout)
    assert int(reported.group(1).replace(",", "")) == 64 * block
    assert float(reported.group(2)) == pytest.approx(loss, abs=1.5e-4)
    old_default = evaluate_in(3 << 30, "--batch_size=64")
    assert (
        old_default.returncode != 0 and "memory" in old_default.stderr
    )  # the premise: 64 windows do not fit
