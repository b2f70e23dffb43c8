"""What a model writes and how it does beyond its loss: the samples a run prints while it trains,
and generation's losses when tokens stream in one at a time (tools/evaluate.py). The losses over
a split and the scores of the attention tasks live beside the batches, in data.py; a chat
model's own scores are chat.py's; HellaSwag is hellaswag.py's.
"""
import time

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt.parallel import whole_weights
from tinygpt.tokenizer import tokenizer_from_meta

PROMPT_TOKENS, SAMPLE_TOKENS = 16, 64  # the samples continue the val split's first tokens


@torch.no_grad()
def continuations(model, batches, step, dist) -> tuple:
    """(line, record) for the training log: a greedy and a sampled continuation of the val
    split's first tokens, drawn on rank 0 with the whole weights (FSDP gathers them on every
    process), the sample from a generator of its own, so that the training's random streams stay
    as they are."""
    record = {"kind": "samples", "step": step}
    with whole_weights(model):
        if dist.is_master:
            record |= sample_texts(model, batches, seed=step)
    line = f"samples at step {step}: {record.get('greedy')!r} | {record.get('sampled')!r}"
    return line, record


def sample_texts(model, batches, seed) -> dict:
    """{'prompt', 'greedy', 'sampled'}: the texts, at sample.py's defaults for the sample."""
    tokenizer = tokenizer_from_meta(batches.meta)
    prompt = np.asarray(batches.tokens("val")[:PROMPT_TOKENS], dtype=np.int64)
    idx = torch.from_numpy(prompt)[None].to(batches.device)
    generator = torch.Generator(device=batches.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    greedy = model.generate(idx, SAMPLE_TOKENS, temperature=0)
    sampled = model.generate(idx, SAMPLE_TOKENS, temperature=0.8, top_p=0.95, generator=generator)
    model.train(was_training)
    texts = [tokenizer.decode(ids[0, len(prompt):].tolist()) for ids in (greedy, sampled)]
    return {"prompt": tokenizer.decode(prompt.tolist()), "greedy": texts[0], "sampled": texts[1]}


@torch.no_grad()
def streaming_losses(model, tokens, use_cache=True, sink_tokens=0):
    """(loss of predicting each of tokens[1:] (1-D), tokens per second) when the tokens arrive one
    at a time through generation's own steps (model.next_logits): past the window the losses show
    what the sliding window, the attention sinks or a full recomputation of the window keep."""
    model.eval()
    cache, losses = None, []
    began = time.perf_counter()
    for t in range(1, len(tokens)):
        logits, cache = model.next_logits(tokens[None, :t], cache, use_cache, sink_tokens)
        losses.append(F.cross_entropy(logits[0, -1].float(), tokens[t]))
    return torch.stack(losses), (len(tokens) - 1) / (time.perf_counter() - began)
