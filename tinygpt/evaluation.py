"""Losses and scores of a model: the estimate train.py logs at each evaluation, the loss over a whole
split, exact match on the attention tasks, and the final report that train.py prints at the end of a
run and tools/evaluate.py prints for any checkpoint (a chat model's own scores are chat.py's).

Under torchrun every process scores its share of the batches and the sums are all-reduced.
"""
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.data import EVAL_STREAM, batch_rng
from tinygpt.device import Dist, print0, sum_floats_over_ranks, sum_over_ranks
from tinygpt.chat import chat_report
from tinygpt.tokenizer import tokenizer_from_meta


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, batch_size, seed, step, ctx, dist=Dist(), rows=None) -> dict:
    """Mean loss over eval_iters random batches of batch_size sequences of each split, drawn from the eval stream
    of `step`; every process scores every world_size-th batch, in pieces of `rows` sequences (the size it
    trains on: a batch the size of the global one may not fit on one GPU)."""
    model.eval()
    losses = {}
    rows = rows or batch_size
    for part, split in enumerate(("train", "val")):
        picks = batches.random_picks(split, batch_rng(seed, EVAL_STREAM, step, part), (eval_iters, batch_size))
        mine = picks[dist.rank::dist.world_size]
        sums = score_table((len(mine), -(-batch_size // rows)), batches.device)
        for i, batch in enumerate(mine):
            for j, start in enumerate(range(0, batch_size, rows)):
                sums[i, j] = loss_and_tokens(model, batches, split, batch[start:start + rows], ctx)
        batch_means = []
        for pieces in sums.tolist():  # one host sync per split; each batch's mean over its scored tokens, on the host
            loss_sum, scored = 0.0, 0
            for loss, n in pieces:
                loss_sum, scored = loss_sum + loss * n, scored + n
            batch_means.append(loss_sum / scored)
        loss_sum, count = sum_floats_over_ranks([sum(batch_means), len(batch_means)], dist)
        losses[split] = loss_sum / count
    model.train()
    return losses


def score_table(shape, device):
    """A (*shape, 2) table of (mean loss, tokens scored) that an evaluation fills in place, read back in one
    transfer and summed on the host in float64 (MPS has no float64; a float32 sum of many batches would round the
    losses the tests compare by hand). In place: a tensor kept per batch would be carved out of the memory that
    batch's logits freed, and with keep_freed_memory glibc's heap then grew by a batch's logits every batch
    (docs/results.md measures it on configs/shakespeare.py's final evaluation)."""
    return torch.zeros((*shape, 2), device=device)  # counts below 2**24 per piece: exact in float32


def loss_and_tokens(model, batches, split, picks, ctx) -> torch.Tensor:
    """(mean loss, tokens scored) of the sequences picks, on the device."""
    x, y = batches.batch(split, picks)
    with ctx:
        loss = model(x, y)[1]
    return torch.stack([loss.float(), (y != -1).sum().float()])


@torch.inference_mode()  # no_grad, and no version counters to bump either: faster on a CPU
def full_split_loss(model, batches, split, batch_size, ctx, dist=Dist()):
    """(mean loss per scored token, tokens scored) over the whole split: every example of a task,
    or non-overlapping windows of text (the last partial window is left out)."""
    model.eval()
    picks = batches.full_split_picks(split)
    starts = range(dist.rank * batch_size, len(picks), batch_size * dist.world_size)
    sums = score_table((len(starts),), batches.device)
    for i, start in enumerate(starts):
        sums[i] = loss_and_tokens(model, batches, split, picks[start:start + batch_size], ctx)
    loss_sum, scored = 0.0, 0
    for loss, n in sums.tolist():
        loss_sum, scored = loss_sum + loss * n, scored + int(n)
    loss_sum, scored = sum_floats_over_ranks([loss_sum, scored], dist)
    return loss_sum / scored, int(scored)


@torch.no_grad()
def exact_match_accuracy(model, examples, prompt_len, batch_size=512, device="cpu", dist=Dist()) -> float:
    """Fraction of examples (n, example_len) whose greedy continuation of the first prompt_len
    tokens equals the rest of the example exactly; every process scores every world_size-th row."""
    model.eval()
    examples = torch.as_tensor(np.asarray(examples), dtype=torch.long)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for chunk in examples[dist.rank::dist.world_size].split(batch_size):
        chunk = chunk.to(device)
        out = model.generate(chunk[:, :prompt_len], chunk.size(1) - prompt_len, temperature=0)
        correct += (out[:, prompt_len:] == chunk[:, prompt_len:]).all(dim=1).sum()
    return int(sum_over_ranks(correct, dist)) / len(examples)


@torch.no_grad()
def streaming_losses(model, tokens, use_cache=True, sink_tokens=0):
    """(loss of predicting each of tokens[1:] (1-D), tokens per second) when the tokens arrive one at
    a time through generation's own steps (model.next_logits): past the window the losses show what
    the sliding window, the attention sinks or a full recomputation of the window keep."""
    model.eval()
    cache, losses = None, []
    began = time.perf_counter()
    for t in range(1, len(tokens)):
        logits, cache = model.next_logits(tokens[None, :t], cache, use_cache, sink_tokens)
        losses.append(F.cross_entropy(logits[0, -1].float(), tokens[t]))
    return torch.stack(losses), (len(tokens) - 1) / (time.perf_counter() - began)


def verdict_text(value, bar, higher_is_better=False, unit="") -> str:
    """' (bar B): PASS' when value reaches bar, ' (bar B): FAIL' when not; '' when there is no bar."""
    if not bar:
        return ""
    passed = value >= bar if higher_is_better else value <= bar
    return f" (bar {bar:g}{unit}): {'PASS' if passed else 'FAIL'}"


def final_report(model, batches, ctx, batch_size, val_loss_bar=0.0, exact_match_bar=0.0, dist=Dist()) -> list:
    """Print the final scores (rank 0 prints; every process computes its share); return the records."""
    records, trained = [], batches
    if batches.answer_loss:  # what it trains on first; the bar judges the whole text, as for plain training
        loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
        print0(f"final val loss on the answers (full split, {tokens:,} answer tokens): {loss:.4f}", flush=True)
        records.append({"kind": "final", "val_loss_answers": loss, "val_answer_tokens": tokens})
        batches = batches.whole_text() or batches  # None: a val split shorter than a window
    if not batches.answer_loss:
        loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
        print0(f"final val loss (full split, {tokens:,} tokens): {loss:.4f}"
               f"{verdict_text(loss, val_loss_bar)}", flush=True)
        records.append({"kind": "final", "val_loss_full": loss, "val_tokens": tokens})
    if not math.isfinite(loss):
        return records
    if batches.task:
        accuracy = exact_match_accuracy(model, batches.examples("val"), batches.prompt_len, device=batches.device, dist=dist)
        print0(f"test exact match: {100 * accuracy:.1f}%{verdict_text(100 * accuracy, 100 * exact_match_bar, True, '%')}")
        records.append({"kind": "test", "exact_match": accuracy})
    if trained.answer_loss and trained.meta.get("test_file") and dist.is_master:  # a chat's scores
        tokenizer = tokenizer_from_meta(trained.meta)
        records += chat_report(model, trained, tokenizer, ctx, exact_match_bar)
    return records
