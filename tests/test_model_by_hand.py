"""model.py against values worked out by hand: ALiBi's slopes and the sign of its bias, RoPE's
angles and the direction it turns, the sinusoidal table's size, GPT-2's initialisation. The other
tests of the model check that its paths agree with each other; these check that what they agree on
is the published recipe."""
import math

import pytest
import torch

from model import GPT, CausalSelfAttention, GPTConfig, apply_rope, sincos_tables


def attention_that_averages_values(n_head, head_dim, pos):
    """An attention layer whose queries and keys are zero (every score is 0 before the position
    bias), whose values are its input and whose output projection is the identity: it returns, per
    head, the attention-weighted mean of the inputs."""
    n_embd = n_head * head_dim
    config = GPTConfig(n_embd=n_embd, n_head=n_head, pos=pos, block_size=16)
    attn = CausalSelfAttention(config, layer=0).eval()
    with torch.no_grad():
        attn.c_attn.weight.zero_()
        attn.c_attn.weight[2 * n_embd:] = torch.eye(n_embd)  # rows of q, then k, then v
        attn.c_proj.weight.copy_(torch.eye(n_embd))
    return attn


def test_alibi_weighs_each_key_by_minus_slope_times_distance_with_the_papers_slopes():
    """Press et al.: head h of n gets slope 2^(-8h/n), h = 1..n (1/2, 1/4, ..., 1/256 for 8 heads),
    and the score of a key d tokens back gets -slope x d: nearer keys count more."""
    n_head, head_dim, T = 8, 2, 10
    attn = attention_that_averages_values(n_head, head_dim, "alibi")
    x = torch.randn(1, T, n_head * head_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = attn(x)
    for h in range(n_head):
        slope = 0.5 ** (h + 1)  # 2^(-8(h+1)/8)
        for t in range(T):
            w = torch.tensor([math.exp(-slope * (t - j)) for j in range(t + 1)])
            w /= w.sum()
            head = slice(h * head_dim, (h + 1) * head_dim)
            expected = (w[:, None] * x[0, :t + 1, head]).sum(0)
            torch.testing.assert_close(y[0, t, head], expected, rtol=0, atol=1e-5)


def test_alibi_slopes_for_a_head_count_that_is_not_eight():
    attn = attention_that_averages_values(n_head=2, head_dim=2, pos="alibi")
    x = torch.zeros(1, 3, 4)
    # Only the first token has a value: the output is the weight of the key 2 tokens back.
    x[0, 0] = 1.0
    with torch.no_grad():
        y = attn(x)
    for h, slope in enumerate([2 ** -4, 2 ** -8]):  # 2^(-8/2) and 2^(-16/2)
        weights = [math.exp(-slope * d) for d in (2, 1, 0)]
        assert y[0, 2, 2 * h].item() == pytest.approx(weights[0] / sum(weights), abs=1e-6)


def test_rope_tables_hold_position_times_10000_to_the_minus_2i_over_d():
    cos, sin = sincos_tables(dim=4, length=5)
    for m in range(5):
        for i, theta in enumerate([1.0, 0.01]):  # 10000^(-0/4), 10000^(-2/4)
            assert cos[m, i].item() == pytest.approx(math.cos(m * theta), abs=1e-6)
            assert sin[m, i].item() == pytest.approx(math.sin(m * theta), abs=1e-6)
    model = GPT(GPTConfig(pos="rope", n_embd=16, n_head=2, block_size=8, vocab_size=5))
    angles = torch.outer(torch.arange(8.0), 10000.0 ** (-torch.arange(0, 8, 2) / 8))  # head_dim 8
    torch.testing.assert_close(model.pos_cos, angles.cos())
    torch.testing.assert_close(model.pos_sin, angles.sin())


def test_rope_turns_each_pair_counterclockwise_by_its_angle():
    """RoFormer's rotation of the pair (x_i, x_{i+d/2}) by +angle: (x cos - y sin, x sin + y cos).
    Its inverse would also make scores depend on distance only, but checkpoints trained one way
    would compute something else loaded the other way."""
    cos = torch.tensor([[math.cos(1.0), math.cos(0.1)]])
    sin = torch.tensor([[math.sin(1.0), math.sin(0.1)]])
    x = torch.tensor([[2.0, 0.0, 0.0, 3.0]])  # pair 0: (2, 0); pair 1: (0, 3)
    rotated = apply_rope(x, cos, sin)
    expected = [2 * math.cos(1.0), -3 * math.sin(0.1), 2 * math.sin(1.0), 3 * math.cos(0.1)]
    assert rotated[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_rope_attention_scores_are_those_of_the_rotated_query_and_key():
    """One head of 2 dimensions: q and k are the input itself, so the score of query t over key j is
    |x_t||x_j| cos(phi_t - phi_j + (t - j)), the pair turning 1 radian a position; the layer's
    output with values = inputs is the softmax-weighted mean under those scores, worked out here."""
    config = GPTConfig(n_embd=2, n_head=1, pos="rope", block_size=8)
    attn = CausalSelfAttention(config, layer=0).eval()
    with torch.no_grad():
        attn.c_attn.weight.copy_(torch.cat([torch.eye(2)] * 3))  # q = k = v = x
        attn.c_proj.weight.copy_(torch.eye(2))
    T = 6
    x = torch.randn(1, T, 2, generator=torch.Generator().manual_seed(3)) * 2
    cos, sin = sincos_tables(dim=2, length=T)  # base^0: one radian a position
    with torch.no_grad():
        y = attn(x, rope=(cos, sin))
    z = torch.complex(x[0, :, 0].double(), x[0, :, 1].double())  # the pair as a complex number
    # Counterclockwise by t radians.
    rotated = z * torch.exp(1j * torch.arange(T, dtype=torch.float64))
    for t in range(T):
        scores = torch.tensor([(rotated[t] * rotated[j].conj()).real.item() / math.sqrt(2)
                               for j in range(t + 1)])
        w = scores.softmax(0)
        expected = (w[:, None] * x[0, :t + 1].double()).sum(0)
        torch.testing.assert_close(y[0, t].double(), expected, rtol=0, atol=1e-5)


def test_sinusoidal_positions_have_the_embeddings_scale_and_turn_by_the_transformers_angles():
    """Each position adds sin/cos pairs of amplitude 0.02 * sqrt(2), so that, like a token embedding
    at init (std 0.02), its RMS over the channels is 0.02; pair i turns by position x
    10000^(-2i/C)."""
    C = 16
    model = GPT(GPTConfig(pos="sinusoidal", n_embd=C, n_head=2, block_size=32, vocab_size=5))
    idx = torch.zeros(1, 32, dtype=torch.long)
    with torch.no_grad():
        added = model.embed(idx)[0] - model.wte(idx)
    rms = added[0].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full((32,), 0.02))
    # The pair (a_i, b_i): cos and sin of one angle.
    a, b = added[0, :, :C // 2], added[0, :, C // 2:]
    for p in (1, 5, 31):
        for i in range(C // 2):
            angle = p * 10000.0 ** (-2 * i / C)
            got = math.atan2(b[p, i].item(), a[p, i].item())
            assert math.cos(got - angle) == pytest.approx(1.0, abs=1e-5), (p, i)


@pytest.mark.parametrize("n_layer", [2, 8])
def test_initialisation_is_gpt2s_with_residual_projections_scaled_by_depth(n_layer):
    """Weights N(0, 0.02), biases 0, LayerNorm gains 1; the two projections that add to the residual
    stream in each block N(0, 0.02 / sqrt(2 n_layer)), so that the stream's variance does not grow
    with depth."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=128, vocab_size=300, block_size=64,
                          bias=True))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert p.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif name.startswith(("ln", "blocks")) and p.dim() == 1 or name.startswith("ln_f"):
            assert torch.all(p == 1), name
        else:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
            assert abs(p.mean().item()) < 0.002, name
