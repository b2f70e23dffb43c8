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

from tinygpt.data import EVAL_STREAM, batch_rng, bits_per_byte
from tinygpt.device import Dist, print0, sum_floats_over_ranks, sum_over_ranks
from tinygpt.tokenizer import answer_room, chat_prompt_ids, qa_pairs, qa_prompt, tokenizer_from_meta


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
def greedy_answer(model, tokenizer, question, device, turns=()) -> str:
    """The model's greedy answer to a question, after the earlier (question, answer) turns as sample.py --chat
    puts them in front, up to the newline that ends answers in the data, and at most answer_room tokens long."""
    room = answer_room(model.config.block_size)
    ids = chat_prompt_ids(tokenizer, [(q, f" {a}") for q, a in turns], question, model.config.block_size - room)
    answer = []
    for token in model.generate_stream(torch.tensor([ids], device=device), room, temperature=0):
        text = tokenizer.decode([token.item()])
        if text == "\n":
            break
        answer.append(text)
    return "".join(answer).strip()


@torch.no_grad()
def greedy_matches(model, tokenizer, pairs, device, batch_size=64) -> list:
    """For each (question, answer) pair, whether the greedy answer is exactly the reference, from one forward
    pass per batch instead of generation: greedy decoding writes " <answer>\\n" exactly when each of those
    tokens is the top choice after the question and the tokens before it."""
    model.eval()
    matches = []
    room = answer_room(model.config.block_size)
    for start in range(0, len(pairs), batch_size):
        prompts = [tokenizer.encode(qa_prompt(q)) for q, _ in pairs[start:start + batch_size]]
        replies = [tokenizer.encode(f" {a}\n") for _, a in pairs[start:start + batch_size]]
        # an answer longer than the chat's room, or a pair beyond the window, is one greedy decoding cannot write
        fits = [len(p) + len(r) <= model.config.block_size and len(r) <= room for p, r in zip(prompts, replies)]
        width = max([len(p) + len(r) for p, r, fit in zip(prompts, replies, fits) if fit], default=1)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, (p, r, fit) in enumerate(zip(prompts, replies, fits)):
            if fit:
                ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        ids = ids.to(device)
        top = model(ids, ids)[0].argmax(dim=-1)  # any targets: they ask for every position's logits
        for row, (p, r, fit) in enumerate(zip(prompts, replies, fits)):
            matches.append(fit and top[row, len(p) - 1:len(p) + len(r) - 1].tolist() == r)
    return matches


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


def bpb_text(bpb) -> str:
    """' (1.2345 bits per byte)' beside a loss, or '' when the data set records no bytes."""
    return "" if bpb is None else f" ({bpb:.4f} bits per byte)"


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


def content_words(text) -> set:
    """Words of 3+ letters outside STOP_WORDS: what an answer must share with a text to be about it."""
    return {w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS}


def answer_scores(answers, references, known_words, questions=None) -> dict:
    """Shares of hand-comparable facts about answers: real_words, of the answers' words that occur in
    known_words; overlap, of answers sharing a content word with their reference; topic, of answers sharing
    one with their question (when questions are given)."""
    said = [w for answer in answers for w in words(answer)]
    n = max(1, len(answers))
    scores = {"real_words": sum(w in known_words for w in said) / max(1, len(said)),
              "overlap": sum(bool(content_words(a) & content_words(r)) for a, r in zip(answers, references)) / n}
    if questions is not None:
        scores["topic"] = sum(bool(content_words(a) & content_words(q)) for a, q in zip(answers, questions)) / n
    return scores


def repeated_share(chats) -> float:
    """Share of the answers, after a chat's first, that equal the answer just before them."""
    follow_ups = [(before, after) for answers in chats for before, after in zip(answers, answers[1:])]
    return sum(before == after for before, after in follow_ups) / max(1, len(follow_ups))


CHAT_TURNS = 5


def chat_answers(model, tokenizer, questions, device) -> list:
    """The greedy answers of one conversation: each question asked after the earlier turns."""
    turns = []
    for question in questions:
        turns.append((question, greedy_answer(model, tokenizer, question, device, turns)))
    return [answer for _, answer in turns]


def percent(share) -> str:
    return f"{100 * share:5.1f}%"


def qa_report(model, batches, ctx, exact_match_bar=0.0) -> dict:
    """Score the model as a chat model, overall and per level, printing every test answer beside its reference:
    exact match of the greedy answers to the train questions (what it was taught; levels 1-2 judged PASS/FAIL
    against exact_match_bar when given); for the held-out test questions real words, overlap with the reference
    and naming the question's topic; and in 5-turn chats of test questions, the share of answers that repeat
    the previous one."""
    tokenizer = tokenizer_from_meta(batches.meta)
    train_text = tokenizer.decode(batches.tokens("train"))
    taught = qa_pairs(train_text)
    pairs = qa_pairs((batches.folder / batches.meta["test_file"]).read_text(encoding="utf-8"))
    loss = qa_answer_loss(model, tokenizer, pairs, ctx, batches.device)
    matches = greedy_matches(model, tokenizer, taught, batches.device)
    questions = [question for question, _ in pairs]
    answers = [greedy_answer(model, tokenizer, question, batches.device) for question in questions]
    references = [reference for _, reference in pairs]
    chats = [chat_answers(model, tokenizer, questions[i:i + CHAT_TURNS], batches.device)
             for i in range(0, len(questions) - CHAT_TURNS + 1, CHAT_TURNS)]
    known = set(words(train_text))
    scores = {"exact_match_train": sum(matches) / max(1, len(matches)),
              **answer_scores(answers, references, known, questions), "repeated_in_chat": repeated_share(chats)}
    print0(f"held-out test answers: loss {loss:.4f} over {len(pairs)} pairs")
    print0(f"{'level (rule)':24} {'train':>5} {'exact':>6} | {'test':>4} {'real w.':>7} {'overlap':>7} {'topic':>6}")
    taught_levels = [level_of(q) for q, _ in taught]
    levels = [level_of(q) for q in questions]
    for name in [name for name, _ in LEVEL_RULES] + ["all"]:
        mine = [m for m, level in zip(matches, taught_levels) if name in (level, "all")]
        picked = [i for i, level in enumerate(levels) if name in (level, "all")]
        s = answer_scores([answers[i] for i in picked], [references[i] for i in picked], known,
                          [questions[i] for i in picked])
        print0(f"{name:24} {len(mine):5} {percent(sum(mine) / max(1, len(mine)))} | {len(picked):4} "
               f"{percent(s['real_words']):>7} {percent(s['overlap']):>7} {percent(s['topic']):>6}")
    easy = [m for m, level in zip(matches, taught_levels) if level.startswith(("L1", "L2"))]
    scores["exact_match_train_l1_l2"] = sum(easy) / max(1, len(easy))
    print0(f"train questions, exact match of the greedy answer: {percent(scores['exact_match_train'])} of "
           f"{len(matches)}; levels 1-2 (L1 and L2/L4 rules): {percent(scores['exact_match_train_l1_l2'])} of {len(easy)}"
           f"{verdict_text(100 * scores['exact_match_train_l1_l2'], 100 * exact_match_bar, True, '%')}")
    print0(f"5-turn chats of test questions: {percent(scores['repeated_in_chat'])} of the answers repeat the "
           f"previous one ({len(chats)} chats)")
    for (question, reference), answer, level in zip(pairs, answers, levels):
        print0(f"  [{level.split()[0]}] Q: {question}\n     model: {answer}\n     reference: {reference}")
    for number, chat in enumerate(chats, 1):
        print0(f"  chat {number}: " + " | ".join(f"Q: {q} A: {a}" for q, a in
                                              zip(questions[(number - 1) * CHAT_TURNS:], chat)))
    return {"kind": "test", "qa_answer_loss": loss, **scores}


def final_report(model, batches, ctx, batch_size, val_loss_bar=0.0, exact_match_bar=0.0, dist=Dist()) -> list:
    """Print the final scores (rank 0 prints; every process computes its share); return the records."""
    records = []
    if batches.answer_loss:  # what it trains on first; the bar judges the whole text, as for plain training
        loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
        bpb = bits_per_byte(loss, batches.meta, "val")
        print0(f"final val loss on the answers (full split, {tokens:,} answer tokens): "
               f"{loss:.4f}{bpb_text(bpb)}", flush=True)
        records.append({"kind": "final", "val_loss_answers": loss, "val_answer_tokens": tokens,
                        "val_bpb_answers": bpb})
        batches = batches.whole_text()
    loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
    bpb = bits_per_byte(loss, batches.meta, "val")
    print0(f"final val loss (full split, {tokens:,} tokens): {loss:.4f}{bpb_text(bpb)}"
           f"{verdict_text(loss, val_loss_bar)}", flush=True)
    records.append({"kind": "final", "val_loss_full": loss, "val_tokens": tokens, "val_bpb": bpb})
    if not math.isfinite(loss):
        return records
    if batches.task:
        accuracy = exact_match_accuracy(model, batches.examples("val"), batches.prompt_len, device=batches.device, dist=dist)
        print0(f"test exact match: {100 * accuracy:.1f}%{verdict_text(100 * accuracy, 100 * exact_match_bar, True, '%')}")
        records.append({"kind": "test", "exact_match": accuracy})
    if batches.meta.get("qa") and batches.meta.get("test_file") and dist.is_master:
        records.append(qa_report(model, batches, ctx, exact_match_bar))
    return records
