"""Dropout whose masks are cut from random 64-bit words: the regulariser of nn.Dropout at a fraction of its
cost on a CPU, where `bernoulli_` draws one float per element. GPTConfig.fast_dropout turns it on.

Each 64-bit word gives four 16-bit numbers u, uniform on 0..65535; an element is kept when u >= round(p * 65536),
so the drop probability is p rounded to a multiple of 1/65536 (exactly p when p * 65536 is whole, e.g. 0.25;
p = 0.2 drops 13107/65536 = 0.1999969), and kept elements are scaled by the inverse of that keep rate.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEVELS = 2 ** 16  # keep rates are multiples of 1 / LEVELS
FIELDS = ("dropout", "fast_dropout")  # GPTConfig's: how a run trains, so a resume or a fine-tune sets its own


def drop_threshold(p):
    """The 16-bit numbers below this are dropped: p rounded to 1/65536, never all of them."""
    return min(round(p * LEVELS), LEVELS - 1)


def keep_rate(p):
    """The probability that fast dropout keeps an element (1 - p, rounded as drop_threshold rounds p)."""
    return 1 - drop_threshold(p) / LEVELS


def keep_mask(shape, p, dtype=torch.bool, device=None):
    """A tensor of `shape` whose elements are 1 (True) with probability keep_rate(p) and else 0, independently."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)  # all 64 bits
    numbers = words.view(torch.int16)[:n]  # u - 32768 for u uniform on 0..65535 (int16: no uint16 ops everywhere)
    keep = torch.empty(shape, dtype=dtype, device=device)  # written as 0/1 in dtype: casting a bool mask costs more
    return torch.ge(numbers.view(shape), drop_threshold(p) - LEVELS // 2, out=keep)


class MaskedScale(torch.autograd.Function):
    """x * keep * scale with keep a 0/1 mask in x's dtype; the float scale is applied element by element, so a
    bf16 x carries no bias from a scale rounded to bf16."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        keep, = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


def fast_dropout(x, p):
    """Training-mode dropout of x with a keep_mask: kept elements scaled by 1 / keep_rate(p)."""
    if p == 0:
        return x
    return MaskedScale.apply(x, keep_mask(x.shape, p, x.dtype, x.device), 1 / keep_rate(p))


class Dropout(nn.Dropout):
    """nn.Dropout, or fast_dropout when fast is True (same state dict: none)."""

    def __init__(self, p, fast=False):
        super().__init__(p)
        self.fast = fast

    def forward(self, x):
        return fast_dropout(x, self.p) if self.fast and self.training else F.dropout(x, self.p, self.training)


def attention(q, k, v, attn_mask, is_causal, dropout_p, fast, scale=None):
    """F.scaled_dot_product_attention (scale: of q.k, None for 1/sqrt(head_dim)), or written out: with fast and
    dropout_p > 0, so that the attention weights take a fast_dropout mask (sdpa's math kernel, what a CPU runs
    when dropout_p > 0, but in q's dtype throughout, as nanoGPT's attention without flash: sdpa's computes a
    CPU's bf16 in fp32, at 2-3x the cost); and for one query in a compiled graph (the decode step), which
    inductor fuses into a few loops where sdpa's CPU kernel spends ~65 us a call on ~2 us of work (softmax in
    fp32 there, as sdpa's)."""
    decoding = q.size(-2) == 1 and torch.compiler.is_compiling()
    if not (fast and dropout_p) and not decoding:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, dropout_p=dropout_p,
                                              scale=scale)
    att = (q * (scale or 1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)
    if is_causal:
        att.masked_fill_(torch.ones(att.shape[-2:], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    elif attn_mask is not None and attn_mask.dtype == torch.bool:
        att.masked_fill_(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        att = att + attn_mask
    return fast_dropout(att.softmax(dim=-1, dtype=torch.float32 if decoding else None).to(v.dtype), dropout_p) @ v
