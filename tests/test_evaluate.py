"""evaluate.py: the full-split loss is the mean over every scored token, and the command scores a
checkpoint exactly as the end of its training run did."""
import json
import re
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_one_line_error, records, run_script, run_train, tiny_model
from dataset import Batches, load_meta
from evaluate import full_split_loss


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
    result = run_script("evaluate.py", [f"--out_dir={out}", "--device=cpu"])
    loss = float(re.search(r"final val loss \(full split, [\d,]+ tokens\): ([\d.]+)", result.stdout).group(1))
    accuracy = float(re.search(r"test exact match: ([\d.]+)%", result.stdout).group(1))
    assert loss == pytest.approx(final["val_loss_full"], abs=1e-4)
    assert accuracy == pytest.approx(100 * test["exact_match"], abs=0.05)
    assert json.loads((out / "config.json").read_text())["exact_match_bar"] == 0.95
    assert "(bar 95%)" in result.stdout


def test_evaluate_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    result = run_script("evaluate.py", [f"--out_dir={tmp_path}", "--ckpt=nothing.pt"], check=False)
    assert_one_line_error(result, "no checkpoint at", "nothing.pt")


def test_answer_scores_count_real_words_and_content_overlap_on_hand_made_answers():
    from evaluate import answer_scores
    known = {"the", "sky", "is", "blue", "cats", "say", "meow", "yes", "ice", "cold"}
    references = ["The sky is blue.", "Cats say meow.", "Yes, ice is cold."]
    answers = ["The sky is blue!", "Cats say woof zorp.", "It is."]
    real, overlap = answer_scores(answers, references, known)
    assert real == pytest.approx(7 / 10)  # 10 words; 'woof', 'zorp' and 'it' are not in the training text
    assert overlap == pytest.approx(2 / 3)  # sky/blue and cats/say match; 'it' and 'is' are too short to count
    assert answer_scores([], [], known) == (0.0, 0.0)


def test_levels_are_told_from_the_question_where_the_rules_can():
    from evaluate import level_of
    assert level_of("What is 6 plus 3?") == level_of("Which is less, 4 or 6?") == "L3 math"
    assert level_of("Hello TinyBot!") == level_of("When were you made?") == level_of("Thanks!") == \
        "L1 greetings, identity"
    assert level_of("I like pop music.") == level_of("Yes, I did!") == "L5 statements (context)"
    assert level_of("What color is the sky?") == level_of("Can fish breathe underwater?") == \
        "L2/L4 facts, reasoning"
