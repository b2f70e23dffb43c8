"""model.py as a specification: causality, the KV cache, losses, weight tying, sampling."""
import copy
import io
import math

import pytest
import torch

import conftest
from model import GPTConfig, KVCache, apply_rope, sample_next, sincos_tables
from tinygpt.muon import BatchedMuon, newton_schulz
from tinygpt.optim import make_optimizers

VOCAB = 37
POSITIONS = ["learned", "sinusoidal", "rope", "alibi"]


def tiny_model(seed=0, **overrides):
    args = {"block_size": 24, "vocab_size": VOCAB, "n_embd": 32, **overrides}
    return conftest.tiny_model(seed, **args)


def random_tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def all_logits(model, idx):
    """Logits at every position (forward returns them all when given targets)."""
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    return logits


def scaled_up(model, factor=6):
    # At init the next token hardly depends on the context; scaled up, it does.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)
    return model


@pytest.mark.parametrize("pos", POSITIONS)
def test_changing_later_tokens_leaves_earlier_logits_unchanged(pos):
    model = tiny_model(pos=pos)
    idx = random_tokens(2, 20)
    t = 9
    changed = idx.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 5) % VOCAB
    before, after = all_logits(model, idx), all_logits(model, changed)
    torch.testing.assert_close(before[:, :t + 1], after[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(before[:, t + 1:], after[:, t + 1:])


@pytest.mark.parametrize("pos", POSITIONS)
def test_prefill_then_single_steps_match_full_forward(pos):
    model = tiny_model(pos=pos)
    idx = random_tokens(3, 24)
    full = all_logits(model, idx)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    prefill = 7
    logits, _ = model(idx[:, :prefill], cache=cache)
    torch.testing.assert_close(logits[:, 0], full[:, prefill - 1], rtol=0, atol=1e-5)
    for t in range(prefill, idx.size(1)):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, t], rtol=0, atol=1e-5)
    assert cache.pos == idx.size(1)


@pytest.mark.parametrize("pos", POSITIONS)
def test_multi_token_chunk_against_cache_uses_offset_mask(pos):
    model = tiny_model(pos=pos)
    idx = random_tokens(2, 20)
    full = all_logits(model, idx)
    cache = KVCache(model.config.n_layer, model.config.block_size)
    model(idx[:, :8], cache=cache)
    for start, end in [(8, 13), (13, 20)]:  # two chunks of several tokens each
        logits, _ = model(idx[:, start:end], cache=cache)
        torch.testing.assert_close(logits[:, 0], full[:, end - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
def test_greedy_generation_with_and_without_cache_agree_up_to_block_size(pos):
    model = tiny_model(pos=pos)
    prompt = random_tokens(3, 5)
    steps = model.config.block_size - prompt.size(1)
    cached = model.generate(prompt, steps, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, steps, temperature=0, use_cache=False)
    assert cached.shape == (3, model.config.block_size)
    assert torch.equal(cached, recomputed)


def sliding_window_reference(model, idx, steps):
    """Greedy decoding by full forward passes over the documented window: the last block_size
    tokens at first; once the window is full, restart it from the last block_size // 2 tokens."""
    block = model.config.block_size
    start = max(0, idx.size(1) - block)
    for _ in range(steps):
        if idx.size(1) - start > block:
            start = idx.size(1) - block // 2
        logits, _ = model(idx[:, start:])
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("prompt_len", [5, 30])  # shorter and longer than block_size (24)
def test_generation_past_block_size_follows_the_sliding_window(pos, prompt_len):
    model = scaled_up(tiny_model(pos=pos))
    prompt = random_tokens(2, prompt_len)
    steps = 3 * model.config.block_size
    out = model.generate(prompt, steps, temperature=0)
    assert torch.equal(out, sliding_window_reference(model, prompt, steps))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_one_layer_sink_cache_equals_recomputing_the_sinks_and_the_last_tokens(pos):
    """With one layer a cached key or value depends on its token alone (RoPE rotates it by slot
    at read time), so streaming with sinks must equal a full forward pass over the first 4 tokens
    followed by the last block_size - 4, step after step, far past the window."""
    model = scaled_up(tiny_model(pos=pos, n_layer=1))
    prompt = random_tokens(2, 5)
    steps = 3 * model.config.block_size
    cached = model.generate(prompt, steps, temperature=0, sink_tokens=4)
    uncached = model.generate(prompt, steps, temperature=0, use_cache=False, sink_tokens=4)
    assert torch.equal(cached, uncached)
    # The sinks change the result.
    assert not torch.equal(cached, model.generate(prompt, steps, temperature=0))


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_sink_cache_stays_bounded_and_keeps_the_first_tokens(pos):
    model = tiny_model(pos=pos)
    block = model.config.block_size
    idx, cache = random_tokens(2, 3), None
    for _ in range(4 * block):
        logits, cache = model.next_logits(idx, cache, sink_tokens=2)
        if idx.size(1) == 3:
            first_keys, first_cache = cache.k[0][:, :, :2].clone(), cache
        # The cache is never prefilled again.
        assert cache is first_cache and cache.pos <= block and cache.k[0].size(2) == block
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert cache.pos == block and torch.equal(cache.k[0][:, :, :2], first_keys)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal"])
def test_sinks_are_refused_where_positions_are_baked_into_the_keys(pos):
    with pytest.raises(ValueError, match="rope"):
        tiny_model(pos=pos).generate(random_tokens(1, 3), 5, sink_tokens=2)


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "alibi"])
def test_sequences_past_block_size_extend_the_positions_of_shorter_ones(pos):
    model = tiny_model(pos=pos)
    idx = random_tokens(2, 4 * model.config.block_size)  # past the stored sin/cos tables
    short = all_logits(model, idx[:, :20])
    torch.testing.assert_close(all_logits(model, idx)[:, :20], short, rtol=0, atol=1e-5)


def test_streaming_yields_each_token_as_it_is_decided():
    """generate_stream is lazy: one step of the generator, one token per sequence, the greedy one of
    a full forward pass (worked out by hand); the rest follow one at a time, the same as greedy
    decoding."""
    model = scaled_up(tiny_model())
    prompt = random_tokens(2, 4)
    expected = conftest.greedy_by_hand(model, prompt, 10)[:, 4:]
    stream = model.generate_stream(prompt, 10, temperature=0)
    first = next(stream)
    assert first.shape == (2,) and torch.equal(first, expected[:, 0])
    rest = list(stream)
    assert len(rest) == 9 and torch.equal(torch.stack(rest, dim=1), expected[:, 1:])


def test_loss_at_init_is_close_to_uniform():
    model = tiny_model(vocab_size=512, n_embd=64)
    idx = torch.randint(0, 512, (4, 24))
    targets = torch.randint(0, 512, (4, 24))
    _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(512)) < 0.1


def test_target_minus_one_is_ignored():
    model = tiny_model()
    idx = random_tokens(2, 12)
    targets = random_tokens(2, 12, seed=2)
    masked = targets.clone()
    masked[:, :6] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, 6:].reshape(-1, VOCAB),
                                                 targets[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("overrides, muon_lr", [
    ({}, 0.0), ({"pos": "rope", "mlp": "relu2", "qk_norm": True, "tie_weights": False}, 0.0),
    ({"pos": "rope", "mlp": "relu2", "qk_norm": True, "zero_init_proj": True}, 0.02)])
def test_tiny_model_overfits_one_batch(overrides, muon_lr):
    model = tiny_model(**overrides).train()
    idx = random_tokens(4, 16)
    targets = random_tokens(4, 16, seed=3)
    optimizers = make_optimizers(model, 0.0, 3e-3, (0.9, 0.99), "cpu", muon_lr=muon_lr)
    for _ in range(300):
        _, loss = model(idx, targets)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert loss.item() < 0.1


def test_zero_init_projections_start_at_zero_and_still_learn():
    model = tiny_model(zero_init_proj=True).train()
    projections = [p for name, p in model.named_parameters() if name.endswith("c_proj.weight")]
    assert projections and all(p.abs().sum() == 0 for p in projections)
    [optimizer] = make_optimizers(model, 0.0, 1e-2, (0.9, 0.99), "cpu")
    _, loss = model(random_tokens(2, 8), random_tokens(2, 8, seed=4))
    loss.backward()
    optimizer.step()
    assert all(p.abs().sum() > 0 for p in projections)


def test_tied_weights_share_storage_and_untied_do_not():
    tied, untied = tiny_model(), tiny_model(tie_weights=False)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    extra = untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False)
    assert extra == VOCAB * 32


@pytest.mark.parametrize("pos", POSITIONS)
def test_state_dict_holds_the_weights_only_and_the_fixed_tables_come_from_the_config(pos):
    """A checkpoint stores learned weights; the sin/cos tables and ALiBi's slopes are rebuilt from
    the config (so a checkpoint does not freeze them), and a model of another seed loaded with
    weights_only computes the same logits."""
    model = tiny_model(pos=pos)
    state = model.state_dict()
    assert set(state) == {name for name, _ in model.named_parameters(remove_duplicate=False)}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = tiny_model(seed=99, pos=pos)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    idx = random_tokens(2, 10)
    assert torch.equal(all_logits(model, idx), all_logits(restored, idx))


def test_weight_decay_only_on_matrices():
    model = tiny_model(bias=True)
    [adamw] = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = adamw.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = tiny_model(tie_weights=False)
    adamw, muon = make_optimizers(model, 0.1, 1e-3, (0.9, 0.95), "cpu", muon_lr=0.02)
    in_muon = {id(p) for group in muon.param_groups for p in group["params"]}
    in_adamw = {id(p) for group in adamw.param_groups for p in group["params"]}
    expected = {id(p) for n, p in model.named_parameters()
                if n.startswith("blocks.") and p.dim() == 2}
    assert in_muon == expected and not in_muon & in_adamw
    assert in_muon | in_adamw == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("weight_decay, nesterov", [(0.0, True), (0.1, False)])
def test_batched_muon_steps_as_torch_muon_does_and_shares_its_state(weight_decay, nesterov):
    """Square, wide and tall matrices (the tall ones orthogonalized transposed), two of each shape;
    the state torch's Muon saved after three steps carries on in BatchedMuon as it does in torch's
    own."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(16, 16), (16, 48), (64, 16), (16, 16), (16, 48), (64, 16)]
    ours, theirs = ([torch.randn(s, generator=torch.Generator().manual_seed(i))
                     for i, s in enumerate(shapes)] for _ in range(2))
    options = dict(lr=0.02, momentum=0.85, weight_decay=weight_decay, nesterov=nesterov,
                   adjust_lr_fn="original")
    torch_muon = torch.optim.Muon(theirs, **options)

    def step(optimizer, params, grads):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    for _ in range(3):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        step(torch_muon, theirs, grads)
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    batched = BatchedMuon(ours, ns_dtype=torch.bfloat16, **options)  # torch's precision, on any CPU
    batched.load_state_dict(copy.deepcopy(torch_muon.state_dict()))  # a copy, as from a checkpoint
    for _ in range(3):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        step(torch_muon, theirs, grads)
        step(batched, ours, grads)
        # The bf16 norm may round differently in its last bit: 2e-4 << a step's ~4e-3.
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-4)
    assert batched.state_dict()["state"].keys() == torch_muon.state_dict()["state"].keys()


def test_newton_schulz_in_fp32_orthogonalizes_as_bf16_does():
    """The fp32 iterations (a CPU without bf16 hardware) give torch's bf16 result to bf16's
    precision."""
    stack = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(0))
    coefficients = torch.optim.Muon([torch.zeros(2, 2)]).param_groups[0]["ns_coefficients"]
    in_bf16, in_fp32 = (newton_schulz(stack, coefficients, 5, 1e-7, dtype)
                        for dtype in (torch.bfloat16, torch.float32))
    assert in_fp32.dtype == torch.float32
    torch.testing.assert_close(in_fp32, in_bf16.float(), rtol=0, atol=0.03)
    # The iterations did change the matrices.
    assert not torch.allclose(stack / stack.norm(dim=(-2, -1), keepdim=True), in_fp32, atol=0.03)


def test_attention_ablation_sees_no_other_token():
    model = tiny_model(attention=False)
    idx = random_tokens(1, 12)
    changed = idx.clone()
    changed[:, :5] = (changed[:, :5] + 1) % VOCAB
    torch.testing.assert_close(all_logits(model, idx)[:, 5:], all_logits(model, changed)[:, 5:])


def test_top_k_samples_only_and_all_of_the_k_best():
    order = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    logits = torch.empty(VOCAB)
    # order[0] is the best token, order[1] the next, ...
    logits[order] = torch.linspace(2.0, 0.0, VOCAB)
    generator = torch.Generator().manual_seed(1)
    picked = sample_next(logits.repeat(2000, 1), temperature=5.0, top_k=3, generator=generator)
    assert set(picked.tolist()) == set(order[:3].tolist())


def test_top_p_keeps_only_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(200, 1)
    picked = sample_next(logits, top_p=0.75, generator=torch.Generator().manual_seed(0))
    assert set(picked.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75; tokens 2 and 3 are outside
    greedy_like = sample_next(logits, top_p=0.4, generator=torch.Generator().manual_seed(0))
    assert set(greedy_like.tolist()) == {0}


def test_same_seed_same_sample_and_different_seed_differs():
    model = tiny_model()
    prompt = random_tokens(2, 3)

    def sample(seed):
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 30, temperature=1.0, generator=generator)

    assert torch.equal(sample(7), sample(7))
    assert not torch.equal(sample(7), sample(8))


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False, "pos": "rope"}])
def test_flops_per_token_matches_torchs_count_of_a_training_step(overrides):
    """torch's FlopCounterMode counts every matmul of a forward and backward pass; the math
    attention kernel does attention as two full T x T matmuls, as the formula counts it. Norms and
    activations are left out by both; the norm gains (counted as weights) are the ~0.5% gap."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    model = tiny_model(**overrides).train()
    idx = random_tokens(2, model.config.block_size)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(idx, idx)[1].backward()
    counted = counter.get_total_flops()
    assert model.flops_per_token() * idx.numel() == pytest.approx(counted, rel=0.01)


def test_rope_scores_depend_only_on_the_distance_between_positions():
    cos, sin = sincos_tables(dim=16, length=64)
    q, k = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))

    def score(m, n):
        rotated_q = apply_rope(q[None, None, None], cos[m:m + 1], sin[m:m + 1])
        rotated_k = apply_rope(k[None, None, None], cos[n:n + 1], sin[n:n + 1])
        return (rotated_q * rotated_k).sum().item()

    for m, n, shift in [(5, 2, 10), (20, 20, 30), (3, 9, 40)]:
        assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)  # and it does depend on the distance
    assert score(0, 0) == pytest.approx((q * k).sum().item(), abs=1e-5)  # position 0 is no rotation


def test_bad_configs_are_rejected_with_a_reason():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="alibi"):
        GPTConfig(pos="absolute")
    with pytest.raises(ValueError, match="even n_embd"):
        GPTConfig(pos="sinusoidal", n_embd=9, n_head=3)
    with pytest.raises(ValueError, match="longer"):
        tiny_model()(random_tokens(1, 25))


# ------------------------------------------------------------- speedrun options (off by default)

SPEEDRUN_OPTIONS = [{"attn_float32": True}, {"qk_norm": True}]


def test_speedrun_options_are_off_by_default_and_add_no_parameters():
    config = GPTConfig()
    assert (config.attn_float32, config.zero_init_proj, config.qk_norm) == (False, False, False)
    names = {name for name, _ in tiny_model(n_layer=4).named_parameters()}
    for overrides in [*SPEEDRUN_OPTIONS, {"zero_init_proj": True}]:
        assert {name for name, _ in tiny_model(n_layer=4, **overrides).named_parameters()} == names


def test_attn_float32_changes_nothing_in_float32_and_stays_close_under_bf16_autocast():
    idx = random_tokens(2, 20)
    plain = scaled_up(tiny_model(pos="rope"))
    fp32_attention = scaled_up(tiny_model(pos="rope", attn_float32=True))
    reference = all_logits(plain, idx)
    assert torch.equal(all_logits(fp32_attention, idx), reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, mixed = all_logits(plain, idx), all_logits(fp32_attention, idx)
    # The attention output goes back to the autocast dtype.
    assert mixed.dtype == bf16.dtype == torch.bfloat16
    bf16_error = (bf16.float() - reference).abs().max()
    assert (mixed.float() - reference).abs().max() <= bf16_error * 1.5 + 1e-3


def test_attn_float32_model_with_bf16_weights_generates_as_sample_py_loads_it():
    """sample.py casts the weights to bf16 and runs no autocast: attention still runs in fp32, the
    KV cache keeps fp32 keys, and c_proj gets the attention output back in its own dtype."""
    fp32 = scaled_up(tiny_model(pos="rope", attn_float32=True))
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    idx = random_tokens(2, 8)
    with torch.no_grad():
        reference, logits = fp32(idx)[0], bf16(idx)[0]
    assert logits.dtype == torch.bfloat16
    atol = 0.05 * reference.abs().max().item()
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=atol)
    # A prefill, then one cached token a step.
    assert bf16.generate(idx, 6, top_k=1).shape == (2, 14)


@pytest.mark.parametrize("overrides", SPEEDRUN_OPTIONS)
def test_speedrun_options_train_and_every_parameter_gets_a_gradient(overrides):
    model = tiny_model(**{"pos": "rope", "zero_init_proj": False, **overrides}).train()
    idx, targets = random_tokens(4, 16), random_tokens(4, 16, seed=3)
    optimizers = make_optimizers(model, 0.0, 3e-3, (0.9, 0.99), "cpu", muon_lr=0.02)
    first = None
    for _ in range(60):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(idx, targets)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        first = first or loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("overrides", SPEEDRUN_OPTIONS)
def test_cached_generation_equals_recomputed_with_speedrun_options(overrides):
    model = scaled_up(tiny_model(**{"pos": "rope", **overrides}), factor=3)
    prompt = random_tokens(3, 4)
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 20, temperature=0, use_cache=False))
    idx = random_tokens(2, 24)
    full, cache = all_logits(model, idx), KVCache(model.config.n_layer, model.config.block_size)
    model(idx[:, :7], cache=cache)
    steps = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 24)], dim=1)
    torch.testing.assert_close(steps, full[:, 7:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_dropout", [True, False])
def test_attn_dropout_false_leaves_the_attention_weights_undropped(attn_dropout):
    model = conftest.tiny_model(dropout=0.5, attn_dropout=attn_dropout)
    attn = model.blocks[0].attn
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = attn(x)  # eval mode: no dropout anywhere
    attn.train()
    attn.resid_dropout.eval()  # only the attention weights' own dropout is left to differ
    torch.manual_seed(0)
    assert torch.equal(attn(x), expected) != attn_dropout
