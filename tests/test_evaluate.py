"""evaluate.py: the full-split loss is the mean over every scored token, and the command scores a
checkpoint exactly as the end of its training run did."""
import json
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, records, run_script, run_train, tiny_args, tiny_model
from tinygpt.data import Batches, load_meta
from tinygpt.evaluation import full_split_loss, streaming_losses


def naive_token_mean(model, batches, split):
    """Cross-entropy of every scored target token of the split, averaged in one go."""
    picks = batches.full_split_picks(split)
    rows = torch.from_numpy(batches.rows(split, picks))
    targets = rows[:, 1:].clone()
    if batches.task:
        targets[:, :batches.prompt_len - 1] = -1
    logits, _ = model(rows[:, :-1], targets)
    per_token = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    scored = targets.flatten() != -1
    return per_token[scored].mean().item(), int(scored.sum())


@pytest.mark.parametrize("dataset, block_size", [("reverse", 12), ("tiny", 16)])
def test_full_split_loss_weights_every_scored_token_equally(data_dir, dataset, block_size):
    meta = load_meta(data_dir / dataset)
    batches = Batches(data_dir / dataset, meta, block_size, "cpu")
    model = tiny_model(vocab_size=meta["vocab_size"], block_size=block_size)
    batch_size = 64  # reverse: 200 examples = 3 x 64 + 8, so an unweighted mean of batches would differ
    loss, tokens = full_split_loss(model, batches, "val", batch_size, nullcontext())
    expected, expected_tokens = naive_token_mean(model, batches, "val")
    assert tokens == expected_tokens
    assert loss == pytest.approx(expected, rel=1e-5)
    if dataset == "reverse":
        assert tokens == 200 * 6  # six answer letters per held-out example


def test_evaluate_scores_a_checkpoint_as_its_training_run_did(tmp_path, data_dir):
    out = tmp_path / "out"
    run_train(["configs/reverse.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=40",
               "--eval_interval=20", "--device=cpu"])
    final = records(out, "final")[-1]
    test = [r for r in records(out, "test") if "exact_match" in r][-1]
    result = run_script("tools/evaluate.py", [f"--out_dir={out}", "--device=cpu"])
    loss = float(re.search(r"final val loss \(full split, [\d,]+ tokens\): ([\d.]+)", result.stdout).group(1))
    accuracy = float(re.search(r"test exact match: ([\d.]+)%", result.stdout).group(1))
    assert loss == pytest.approx(final["val_loss_full"], abs=1e-4)
    assert accuracy == pytest.approx(100 * test["exact_match"], abs=0.05)
    assert json.loads((out / "config.json").read_text())["exact_match_bar"] == 0.95
    assert "(bar 95%)" in result.stdout


def test_evaluate_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_script("tools/evaluate.py", [f"--out_dir={tmp_path}", "--ckpt=nothing.pt"], check=False)
    assert_one_line_error(result, "no checkpoint at", "nothing.pt")


def test_levels_are_told_from_the_question_where_the_rules_can():
    from tinygpt.evaluation import level_of
    assert level_of("What is 6 plus 3?") == level_of("Which is less, 4 or 6?") == "L3 math"
    assert level_of("Hello TinyBot!") == level_of("When were you made?") == level_of("Thanks!") == \
        "L1 greetings, identity"
    assert level_of("I like pop music.") == level_of("Yes, I did!") == "L5 statements (context)"
    assert level_of("What color is the sky?") == level_of("Can fish breathe underwater?") == \
        "L2/L4 facts, reasoning"


@pytest.mark.parametrize("use_cache, sink_tokens", [(True, 0), (True, 2), (False, 0)])
def test_streaming_losses_inside_the_window_are_the_full_forward_pass_losses(use_cache, sink_tokens):
    model = tiny_model(pos="alibi", vocab_size=20, block_size=16)
    tokens = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(0))
    losses, speed = streaming_losses(model, tokens, use_cache, sink_tokens)
    logits, _ = model(tokens[None, :16], tokens[None, 1:17])
    expected = F.cross_entropy(logits[0], tokens[1:17], reduction="none")
    assert losses.shape == (39,) and speed > 0
    torch.testing.assert_close(losses[:16], expected, rtol=0, atol=1e-5)  # every way sees the whole prefix


def test_evaluate_reads_past_the_window_where_positions_allow_and_says_so_where_not(tmp_path, data_dir):
    for pos in ("alibi", "learned"):
        run_train(tiny_args(data_dir, tmp_path / pos, f"--pos={pos}", "--max_iters=2"))
    longer = run_script("tools/evaluate.py", [f"--out_dir={tmp_path / 'alibi'}", "--block_size=32"])
    assert "windows of 32 tokens (2x the trained 16)" in longer.stdout and "final val loss" in longer.stdout
    stream = run_script("tools/evaluate.py", [f"--out_dir={tmp_path / 'alibi'}", "--stream=40", "--sink_tokens=2"])
    assert re.findall(r"(sliding window|2 sinks|full recompute).* loss [\d.]+ +[\d.]+ tokens/s", stream.stdout) == [
        "sliding window", "2 sinks", "full recompute"]
    refused = run_script("tools/evaluate.py", [f"--out_dir={tmp_path / 'learned'}", "--block_size=32"], check=False)
    assert_one_line_error(refused, "pos='learned' has positions for 16 tokens only")
