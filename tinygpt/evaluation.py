"""Scores of a model beyond its loss: generation's losses when tokens stream in one at a time
(tools/evaluate.py). The losses over a split and the scores of the attention tasks live beside
the batches, in data.py; a chat model's own scores are chat.py's; HellaSwag is hellaswag.py's.
"""
import time

import torch
import torch.nn.functional as F


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
