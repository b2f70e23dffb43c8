"""dropout.py as a specification: fast masks keep 1 - p of the units (p rounded to 1/65536), scale them by the
inverse keep rate, pass gradients only through them, vanish in eval mode; with fast_dropout off nothing changes."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import conftest
from checkpoint import CheckpointError, check_resumable
from dropout import Dropout, attention, drop_threshold, fast_dropout, keep_mask, keep_rate


def within(observed, expected, n, sigmas=5):
    """observed, a share of n independent draws, is within `sigmas` standard deviations of expected."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def test_keep_rate_is_p_rounded_to_a_65536th():
    assert keep_rate(0.25) == 0.75 and keep_rate(0.0) == 1.0  # exact where p * 65536 is whole
    assert keep_rate(0.2) == 1 - 13107 / 65536 and abs(keep_rate(0.1) - 0.9) <= 0.5 / 65536
    assert drop_threshold(0.9999999) == 65535  # never drops everything


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_mask_keeps_the_keep_rate_independently(p):
    torch.manual_seed(0)
    n = 1 << 20
    keep = keep_mask((n,), p).double()
    q = keep_rate(p)
    assert within(keep.mean().item(), q, n)
    # neighbours come from the same 64-bit word, and every 4th from the same position in a word: independent too
    assert within((keep[:-1] * keep[1:]).mean().item(), q * q, n)
    assert within(keep.view(-1, 4)[:, 3].mean().item(), q, n // 4)


def test_keep_mask_in_a_float_dtype_holds_zeros_and_ones():
    torch.manual_seed(0)
    keep = keep_mask((3, 1000), 0.3, torch.bfloat16)
    assert keep.dtype == torch.bfloat16 and keep.shape == (3, 1000)
    assert set(keep.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_dropout_scales_kept_units_and_passes_gradients_only_through_them(dtype):
    torch.manual_seed(0)
    p, x = 0.2, torch.randn(64, 512, dtype=dtype, requires_grad=True)
    y = fast_dropout(x, p)
    kept = y != 0
    assert within(kept.double().mean().item(), keep_rate(p), x.numel())
    expected = (x.detach().float() * (1 / keep_rate(p))).to(dtype)  # scaled in float, rounded once
    assert torch.equal(y[kept], expected[kept])
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, torch.where(kept, torch.tensor(1 / keep_rate(p)).to(dtype), 0).to(dtype))


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(4, 8)
    assert fast_dropout(x, 0.0) is x
    assert torch.equal(Dropout(0.5, fast=True).eval()(x), x)


def test_fast_off_is_nn_dropout_and_sdpa_bit_for_bit():
    x = torch.randn(4, 16, 32)
    torch.manual_seed(3)
    ours = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ours, nn.Dropout(0.3).train()(x))
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    torch.manual_seed(3)
    ours = attention(q, k, v, None, True, 0.3, fast=False)
    torch.manual_seed(3)
    assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3))


def test_a_model_with_fast_dropout_off_computes_what_nn_dropout_did():
    idx = torch.randint(0, 20, (2, 16))
    losses = []
    for old in (False, True):
        model = conftest.tiny_model(dropout=0.3).train()
        if old:  # what model.py held before: nn.Dropout modules
            for module in model.modules():
                if isinstance(module, Dropout):
                    module.__class__ = nn.Dropout
        torch.manual_seed(5)
        losses.append(model(idx, idx)[1])
    assert torch.equal(*losses)


def causal_bias(T, S):
    return torch.zeros(T, S).masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))


@pytest.mark.parametrize("mask, scale", [("causal", None), ("bool", None), ("float", None), ("causal", 0.9)])
def test_written_out_attention_is_sdpa_when_nothing_is_dropped(mask, scale):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 7, 8).unbind(0)
    attn_mask = {"causal": None, "bool": causal_bias(7, 7) == 0, "float": causal_bias(7, 7) - torch.rand(3, 7, 7)}[mask]
    tiny_p = 1e-6  # rounds to a drop threshold of 0: every weight kept, scale 1
    ours = attention(q, k, v, attn_mask, mask == "causal", tiny_p, fast=True, scale=scale)
    assert torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=mask == "causal",
                                                               scale=scale), atol=1e-6)


def test_written_out_attention_drops_attention_weights_with_a_fast_mask():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 7, 8, dtype=torch.float64).unbind(0)
    torch.manual_seed(1)
    ours = attention(q, k, v, None, True, 0.4, fast=True)
    torch.manual_seed(1)
    keep = keep_mask((2, 3, 7, 7), 0.4, torch.float64)
    weights = ((q @ k.transpose(-2, -1)) / math.sqrt(8) + causal_bias(7, 7)).softmax(-1)
    assert torch.allclose(ours, (weights * keep / keep_rate(0.4)) @ v)


def test_a_model_with_fast_dropout_trains_and_evaluates_as_without():
    idx = torch.randint(0, 20, (2, 16))
    fast, plain = conftest.tiny_model(dropout=0.2, fast_dropout=True), conftest.tiny_model(dropout=0.2)
    assert torch.equal(fast(idx, idx)[0], plain(idx, idx)[0])  # eval mode: same weights, same logits
    loss = fast.train()(idx, idx)[1]
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fast.parameters())


def test_a_run_resumes_or_fine_tunes_with_its_own_dropout_fields():
    saved = {"block_size": 16, "vocab_size": 20, "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0}  # as of old
    checkpoint = {"model_args": saved, "optimizer": {}, "muon": None, "meta": {}}
    check_resumable(checkpoint, {**saved, "dropout": 0.2, "fast_dropout": True}, {}, False, "ckpt.pt")
    with pytest.raises(CheckpointError, match="n_embd"):
        check_resumable(checkpoint, {**saved, "n_embd": 32, "fast_dropout": True}, {}, False, "ckpt.pt")
