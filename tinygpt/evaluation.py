"""Losses and scores of a model: the estimate train.py logs at each evaluation, the loss over a whole
split, exact match on the attention tasks, the Q&A report on TinyTalks, and the final report that
train.py prints at the end of a run and tools/evaluate.py prints for any checkpoint.

Under torchrun every process scores its share of the batches and the sums are all-reduced.
"""
import math
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.data import EVAL_STREAM, batch_rng
from tinygpt.device import Dist, print0, sum_over_ranks
from tinygpt.tokenizer import qa_pairs, qa_prompt, tokenizer_from_meta


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, batch_size, seed, step, ctx, dist=Dist(), rows=None) -> dict:
    """Mean loss over eval_iters random batches of batch_size sequences of each split, drawn from the eval stream
    of `step`; every process scores every world_size-th batch, in pieces of `rows` sequences (the size it
    trains on: a batch the size of the global one may not fit on one GPU)."""
    model.eval()
    losses = {}
    for part, split in enumerate(("train", "val")):
        picks = batches.random_picks(split, batch_rng(seed, EVAL_STREAM, step, part), (eval_iters, batch_size))
        total = torch.zeros(2, dtype=torch.float64, device=batches.device)  # (sum of batch losses, batches)
        for row in picks[dist.rank::dist.world_size]:
            total[0] += token_mean_loss(model, batches, split, row, rows or batch_size, ctx)
            total[1] += 1
        loss_sum, count = sum_over_ranks(total, dist).tolist()
        losses[split] = loss_sum / count
    model.train()
    return losses


def token_mean_loss(model, batches, split, picks, rows, ctx):
    """The loss of one batch (mean over its scored tokens), computed in pieces of `rows` sequences."""
    loss_sum, scored = 0.0, 0
    for start in range(0, len(picks), rows):
        x, y = batches.batch(split, picks[start:start + rows])
        with ctx:
            loss = model(x, y)[1].double()
        n = (y != -1).sum()
        loss_sum, scored = loss_sum + loss * n, scored + n
    return loss_sum / scored


@torch.inference_mode()  # no_grad, and no version counters to bump either: faster on a CPU
def full_split_loss(model, batches, split, batch_size, ctx, dist=Dist()):
    """(mean loss per scored token, tokens scored) over the whole split: every example of a task,
    or non-overlapping windows of text (the last partial window is left out)."""
    model.eval()
    picks = batches.full_split_picks(split)
    total = torch.zeros(2, dtype=torch.float64, device=batches.device)  # (sum of token losses, tokens)
    for start in range(dist.rank * batch_size, len(picks), batch_size * dist.world_size):
        x, y = batches.batch(split, picks[start:start + batch_size])
        with ctx:
            loss = model(x, y)[1]
        scored = (y != -1).sum()
        total += torch.stack([loss.double() * scored, scored.double()])
    loss_sum, scored = sum_over_ranks(total, dist).tolist()
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
def qa_answer_loss(model, tokenizer, pairs, ctx, device) -> float:
    """Mean cross-entropy on the answer tokens (" answer\\n") of Q&A pairs, given the question."""
    model.eval()
    total, scored = 0.0, 0
    for question, answer in pairs:
        prompt = tokenizer.encode(qa_prompt(question))
        ids = torch.tensor(prompt + tokenizer.encode(f" {answer}\n"), device=device)
        x, y = ids[:-1], ids[1:].clone()
        y[:len(prompt) - 1] = -1  # no loss on the question
        x, y = x[-model.config.block_size:], y[-model.config.block_size:]
        with ctx:
            loss = model(x[None], y[None])[1]
        n = int((y != -1).sum())
        total, scored = total + loss.item() * n, scored + n
    return total / scored


@torch.no_grad()
def greedy_answer(model, tokenizer, question, device) -> str:
    """The model's greedy answer to a question, up to the newline that ends answers in the data, and
    at most half a window long (as sample.py --chat allows)."""
    idx = torch.tensor([tokenizer.encode(qa_prompt(question))], device=device)
    answer = []
    for token in model.generate_stream(idx, model.config.block_size // 2, temperature=0):
        text = tokenizer.decode([token.item()])
        if text == "\n":
            break
        answer.append(text)
    return "".join(answer).strip()


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


STOP_WORDS = frozenset("the and you your are was were what how does can this that with for have has not "
                       "but its it's".split())
# TinyTalks records no level; these rules tell three of its five from the question (DATASHEET: L1 greetings
# and identity, L2 facts, L3 math, L4 reasoning, L5 multi-turn context) and leave L2 and L4 together.
LEVEL_RULES = [("L3 math", r"\d"),
               ("L1 greetings, identity", r"\b(hello|hi|hey|greetings|good (morning|afternoon|evening)|bye|thanks?|"
                                          r"tinybot|yourself|your name|who are you|how are you|were you)\b"),
               ("L5 statements (context)", r"[^?]$"),
               ("L2/L4 facts, reasoning", r"")]


def level_of(question) -> str:
    return next(name for name, rule in LEVEL_RULES if re.search(rule, question.lower().strip()))


def words(text) -> list:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def answer_scores(answers, references, known_words) -> tuple:
    """(share of the answers' words that are real words, i.e. occur in known_words; share of answers
    that share a content word, one of 3+ letters outside STOP_WORDS, with their reference)."""
    said = [w for answer in answers for w in words(answer)]
    real = sum(w in known_words for w in said) / max(1, len(said))

    def content(text):
        return {w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS}
    overlap = sum(bool(content(a) & content(r)) for a, r in zip(answers, references)) / max(1, len(answers))
    return real, overlap


def qa_report(model, batches, ctx) -> dict:
    """Score greedy answers to the held-out test questions (real words, content overlap, overall and per
    level) and print every answer next to its reference."""
    pairs = qa_pairs((batches.folder / batches.meta["test_file"]).read_text(encoding="utf-8"))
    tokenizer = tokenizer_from_meta(batches.meta)
    loss = qa_answer_loss(model, tokenizer, pairs, ctx, batches.device)
    answers = [greedy_answer(model, tokenizer, question, batches.device) for question, _ in pairs]
    references = [reference for _, reference in pairs]
    known = set(words(tokenizer.decode(batches.tokens("train"))))
    real, overlap = answer_scores(answers, references, known)
    print0(f"held-out test answers: loss {loss:.4f} over {len(pairs)} pairs; greedy answers: {100 * real:.1f}% of "
        f"their words are real words (in the training text), {100 * overlap:.1f}% share a content word with "
        "the reference (3+ letters, not a stop word)")
    levels = [level_of(question) for question, _ in pairs]
    for name, _ in LEVEL_RULES:
        picked = [i for i, level in enumerate(levels) if level == name]
        if picked:
            r, o = answer_scores([answers[i] for i in picked], [references[i] for i in picked], known)
            print0(f"  {name:24} {len(picked):3} answers: {100 * r:5.1f}% real words, {100 * o:5.1f}% overlap")
    for (question, reference), answer, level in zip(pairs, answers, levels):
        print0(f"  [{level.split()[0]}] Q: {question}\n     model: {answer}\n     reference: {reference}")
    return {"kind": "test", "qa_answer_loss": loss, "real_words": real, "answer_overlap": overlap}


def final_report(model, batches, ctx, batch_size, val_loss_bar=0.0, exact_match_bar=0.0, dist=Dist()) -> list:
    """Print the final scores (rank 0 prints; every process computes its share); return the records."""
    loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
    print0(f"final val loss (full split, {tokens:,} tokens): {loss:.4f}{verdict_text(loss, val_loss_bar)}", flush=True)
    records = [{"kind": "final", "val_loss_full": loss, "val_tokens": tokens}]
    if not math.isfinite(loss):
        return records
    if batches.task:
        accuracy = exact_match_accuracy(model, batches.examples("val"), batches.prompt_len, device=batches.device, dist=dist)
        print0(f"test exact match: {100 * accuracy:.1f}%{verdict_text(100 * accuracy, 100 * exact_match_bar, True, '%')}")
        records.append({"kind": "test", "exact_match": accuracy})
    if batches.meta.get("qa") and batches.meta.get("test_file") and dist.is_master:
        records.append(qa_report(model, batches, ctx))
    return records
