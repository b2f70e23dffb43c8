"""torchrun's evaluations against one process: the final scores of a 2-process run are the ones a
single process computes by hand on the same weights, and dropout differs between the processes.

Every process scores its share of the split and the shares are summed: overlapping shares, or every
rank scoring every example, would count tokens and answers twice (up to 200% exact match)."""
import json
import shutil

import numpy as np
import torch

from conftest import (
    TINY,
    exact_match_by_hand,
    full_split_loss_by_hand,
    records,
    run_script,
    torchrun,
    train_here,
    train_losses,
    weights,
)
from model import GPT, GPTConfig


def test_torchrun_final_scores_on_a_task_with_dropout_are_one_process_scores_of_the_same_weights(
        tmp_path, data_dir, reverse_run):
    # The run solves the task: exact match near 100%, so counting twice cannot hide.
    trained, _ = reverse_run
    out = tmp_path / "out"
    out.mkdir()
    for name in ("ckpt.pt", "best.pt"):
        shutil.copy(trained / name, out / name)
    args = ["configs/reverse.py", f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=304",
            "--eval_interval=2", "--dropout=0.1", "--device=cpu"]
    run_script("train.py", args, launcher=torchrun(2))
    best = torch.load(out / "best.pt", weights_only=True)  # what the final evaluation judges
    model = GPT(GPTConfig(**best["model_args"]))
    model.load_state_dict(best["model"])
    loss, tokens = full_split_loss_by_hand(model, data_dir / "reverse")
    accuracy = exact_match_by_hand(model, data_dir / "reverse")
    [final], [test] = records(out, "final")[-1:], records(out, "test")[-1:]
    assert final["val_tokens"] == tokens == 200 * 6  # every held-out answer letter once
    assert abs(final["val_loss_full"] - loss) <= 1e-5 * loss
    # A near-tie may flip one answer.
    assert accuracy > 0.5 and abs(test["exact_match"] - accuracy) <= 1 / 200


def one_window_data_set(folder, text="the cat sees the moon."):
    """A data set whose train and val splits are one window of 16 tokens and its next token each:
    every sequence of every batch, on every process, is the same."""
    folder.mkdir(parents=True)
    vocab = sorted(set(text))
    ids = np.array([vocab.index(c) for c in text[:17]], dtype="<u2")
    for split in ("train", "val"):
        ids.tofile(folder / f"{split}.bin")
    meta = {"tokenizer": "char", "vocab": vocab, "vocab_size": len(vocab), "dtype": "uint16"}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_torchrun_processes_draw_different_dropout(tmp_path):
    """With every sequence the same, two processes of 4 sequences each compute the gradient one
    process of 4 computes, unless their dropout masks differ: they must, or the second process adds
    no new noise and dropout under torchrun would be that of half the batch."""
    one_window_data_set(tmp_path / "data" / "one")
    args = [*TINY, f"--data_dir={tmp_path / 'data'}", "--dataset=one", "--dropout=0.5",
            "--max_iters=3", "--eval_interval=1000"]
    train_here([*args, "--batch_size=4", f"--out_dir={tmp_path / 'single'}"], cwd=tmp_path)
    run_script("train.py", [*args, "--batch_size=8", f"--out_dir={tmp_path / 'two'}"], cwd=tmp_path,
               launcher=torchrun(2))
    single, two = weights(tmp_path / "single"), weights(tmp_path / "two")
    assert max((single[k] - two[k]).abs().max().item() for k in single) > 1e-4
    # Rank 1's masks differ.
    assert train_losses(tmp_path / "single")[1] != train_losses(tmp_path / "two")[1]
