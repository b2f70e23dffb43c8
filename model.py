"""The whole GPT in one file, top to bottom: GPTConfig, the KV cache, token sampling,
CausalSelfAttention, MLP, Block, GPT. Token ids in, logits out: text lives at the edges."""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

POSITIONS = ("learned", "sinusoidal", "rope", "alibi")
SINK_POSITIONS = ("rope", "alibi")  # sinks move cached keys between slots: these positions follow


@dataclass
class GPTConfig:
    # nanoGPT's fields
    block_size: int = 256       # longest context the model sees
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False          # biases in Linear and LayerNorm layers (GPT-2 had them)
    # architecture choices
    pos: str = "learned"        # 'learned' (GPT-2), 'sinusoidal', 'rope' (rotary) or 'alibi'
    mlp: str = "gelu"           # 'gelu', 'gelu_tanh' (GPT-2's approximation) or 'relu2' (ReLU^2)
    tie_weights: bool = True    # LM head shares the token embedding matrix
    attention: bool = True      # False is an ablation: every token attends only to itself
    attn_dropout: bool = True   # False: no dropout on attention weights (most of its CPU cost)
    # speedrun levers (configs/speedrun_cpu.py; docs/results.md measures each)
    qk_norm: bool = False       # RMS-normalise queries and keys before attention
    zero_init_proj: bool = False  # residual output projections start at zero
    attn_float32: bool = False  # attention in fp32 under autocast: a CPU's bf16 backward is slow

    def __post_init__(self):
        if self.n_head < 1:
            raise ValueError(f"n_head={self.n_head} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos={self.pos!r}: use 'learned', 'sinusoidal', 'rope' or 'alibi'")
        width = self.n_embd if self.pos == "sinusoidal" else self.n_embd // self.n_head
        if self.pos in ("sinusoidal", "rope") and width % 2:
            raise ValueError(f"pos={self.pos!r} needs an even n_embd and head size")
        if self.mlp not in ("gelu", "gelu_tanh", "relu2"):
            raise ValueError(f"mlp={self.mlp!r}: use 'gelu', 'gelu_tanh' or 'relu2'")


class KVCache:
    """Keys and values so far: per layer k and v (B, n_head, max_len, head_dim), allocated at the
    first write, filled up to `pos` (GPT.forward advances it); make_room keeps `sinks` first."""

    def __init__(self, n_layer, max_len, sinks=0):
        self.n_layer, self.max_len, self.sinks = n_layer, max_len, sinks
        self.pos, self.k, self.v = 0, None, None  # k and v: lists of n_layer tensors

    def make_room(self, n):
        """Drop the oldest entries after the sinks so that n more tokens fit."""
        drop = self.pos + n - self.max_len
        if self.k is None or drop <= 0 or drop > self.pos - self.sinks:
            return
        for t in self.k + self.v:
            t[:, :, self.sinks:self.pos - drop] = t[:, :, self.sinks + drop:self.pos].clone()
        self.pos -= drop

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at `pos`, return those so far."""
        if self.k is None:
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self.k = [k.new_zeros(shape) for _ in range(self.n_layer)]
            self.v = [k.new_zeros(shape) for _ in range(self.n_layer)]
        end = self.pos + k.size(2)
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, V): temperature 0 is greedy; top_k keeps the k best; top_p
    the fewest best tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        best = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, best.indices, best.values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before it reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def window(idx, keep, sinks):
    """The last `keep` tokens of idx (B, T), its first `sinks` tokens among them."""
    if idx.size(1) <= keep:
        return idx
    return torch.cat((idx[:, :sinks], idx[:, sinks - keep:]), dim=1)


def sincos_tables(dim, length, device=None):
    """cos, sin of position x 10000^(-2i/dim), (length, dim // 2): sinusoidal's or RoPE's."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the pairs (x[i], x[i + d/2]) of x (..., head_dim) by the angles of their positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer = layer  # which of the cache's layers is this one's
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout = config.dropout if config.attn_dropout else 0.0  # on attention weights
        self.attention = config.attention
        self.qk_norm = config.qk_norm
        self.attn_float32 = config.attn_float32
        self.scale = 1 / math.sqrt(self.head_dim)
        slopes = 2.0 ** (-8.0 * torch.arange(1, config.n_head + 1) / config.n_head)  # ALiBi's
        self.register_buffer("alibi_slopes", slopes if config.pos == "alibi" else None, False)

    def queries_keys_values(self, x, rope=None, rotate_keys=True):
        """q, k, v (B, n_head, T, head_dim) as attention reads them; x's T tokens take rope's last T
        rows. q and k are normed and rotated as one tensor: one small op, not two."""
        B, T, C = x.size()  # batch size, sequence length, n_embd
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        if self.attn_float32:
            qkv = qkv.float()  # one cast: the norm and the rotation run in fp32 too
        qk, v = qkv.split((2, 1), dim=2)  # (B, T, 2, nh, hs), (B, T, 1, nh, hs)
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            cos = rope[0][-T:, None, None]  # (T, 1, 1, hs / 2): the same for q, k and every head
            sin = rope[1][-T:, None, None]
            if rotate_keys:
                qk = apply_rope(qk, cos, sin)
            else:  # only q: a sink cache rotates its keys when it reads them
                q = apply_rope(qk[:, :, :1], cos, sin)
                qk = torch.cat((q, qk[:, :, 1:]), dim=2)
        q, k = qk.unbind(2)  # (B, T, nh, hs) each
        return q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.size()
        keys_by_slot = rope is not None and cache is not None and cache.sinks > 0
        q, k, v = self.queries_keys_values(x, rope, rotate_keys=not keys_by_slot)  # (B, nh, T, hs)
        if not self.attention:
            y = v  # the ablation: each token sees only its own value
        else:
            start = 0  # the position of the first query among the keys
            if cache is not None:
                start = cache.pos
                k, v = cache.update(self.layer, k, v)  # (B, nh, keys, hs): cached, then these
            if keys_by_slot:  # a sink cache holds keys unrotated, as it moves them: rotate by slot
                k = apply_rope(k, *rope)
            mask = self.attention_mask(T, start, k.size(2), x.device)
            y = self.attend(q, k, v, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # the heads side by side again
        if self.attn_float32:
            y = y.to(self.c_proj.weight.dtype)  # cast weights need it; autocast casts anyway
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v, mask):
        fp32 = torch.autocast(q.device.type, enabled=False)
        precision = fp32 if self.attn_float32 else nullcontext()
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # ALiBi's bias in q's dtype: sdpa wants one dtype
        with precision:
            if q.size(2) > 1 or self.training:
                dropout_p = self.dropout if self.training else 0.0
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                      is_causal=mask is None, scale=self.scale)
            # Generation's one query, written out: sdpa's CPU kernel costs more in fixed overhead
            # than in work. Softmax in fp32, as sdpa's.
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, nh, 1, keys)
            if mask is not None:  # ALiBi's bias; a lone query needs no causal mask
                scores = scores + mask
            return scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v

    def attention_mask(self, T, start, n_keys, device):
        """attn_mask of T queries at positions start.. over n_keys keys: None where is_causal does
        it; else True where a query may read a key; for ALiBi the -slope x distance bias."""
        if self.alibi_slopes is None and (start == 0 or T == 1):
            return None
        query_positions = start + torch.arange(T, device=device)
        distance = query_positions[:, None] - torch.arange(n_keys, device=device)  # (T, keys)
        if self.alibi_slopes is None:
            return distance >= 0
        bias = -self.alibi_slopes[:, None, None] * distance  # (nh, T, keys): far keys count less
        return bias.masked_fill(distance < 0, float("-inf"))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"  # GPT-2's is tanh

    def forward(self, x):
        x = self.c_fc(x)
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate=self.approximate)
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None):
        x = x + self.attn(self.ln_1(x), rope, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.max_positions = math.inf  # only learned positions end; the others extrapolate
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
            self.max_positions = config.block_size
        if config.pos in ("sinusoidal", "rope"):  # fixed tables, rebuilt from the config: not saved
            dim = config.n_embd if config.pos == "sinusoidal" else config.n_embd // config.n_head
            cos, sin = sincos_tables(dim, config.block_size)
            self.register_buffer("pos_cos", cos, persistent=False)
            self.register_buffer("pos_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and writes them out
        for m in self.modules():  # GPT-2 init: weights N(0, 0.02), biases zero
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: each residual branch adds to the stream, so its output projection is scaled by
        # 1/sqrt(2 * n_layer) to keep the stream's variance flat with depth (or starts at zero).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                nn.init.zeros_(p)

    def sincos(self, start, end):
        """Rows start..end-1 of the cos and sin tables (computed afresh past block_size)."""
        if end <= len(self.pos_cos):
            return self.pos_cos[start:end], self.pos_sin[start:end]
        cos, sin = sincos_tables(2 * self.pos_cos.size(1), end, self.pos_cos.device)
        return cos[start:], sin[start:]

    def embed(self, idx, start=0):
        """(embeddings of idx (B, T) at positions start.., RoPE's (cos, sin) rows or None). RoPE's
        rows run from 0: attention takes the last T; a sink cache rotates every key by slot."""
        T = idx.size(1)
        x = self.wte(idx)  # (B, T, C)
        rope = None
        if self.config.pos == "learned":
            x = x + self.wpe(start + torch.arange(T, device=idx.device))
        elif self.config.pos == "sinusoidal":
            table = torch.cat(self.sincos(start, start + T), dim=-1)  # (T, C)
            x = x + 0.02 * math.sqrt(2) * table  # at the embeddings' scale: else it drowns them
        elif self.config.pos == "rope":
            rope = self.sincos(0, start + T)
        return self.drop(x), rope

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, V) and the mean cross-entropy when targets are given (target -1 is
        ignored); else the last position's logits (B, 1, V), all generation needs."""
        B, T = idx.size()
        if cache is not None and cache.sinks:
            cache.make_room(T)
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.max_positions
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {limit}")
        x, rope = self.embed(idx, start)
        for block in self.blocks:
            x = block(x, rope, cache)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        flat = logits.float().view(-1, logits.size(-1))
        loss = F.cross_entropy(flat, targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def next_logits(self, idx, cache=None, use_cache=True, sink_tokens=0):
        """(logits (B, 1, V) of the token after idx (B, T), the cache to pass back). The first call
        prefills a cache with idx's last block_size tokens, later ones feed its last token. A full
        cache restarts from the last half window, or keeps the first sink_tokens and drops the
        oldest others. use_cache=False recomputes."""
        block = self.config.block_size
        if sink_tokens and (self.config.pos not in SINK_POSITIONS or not 0 < sink_tokens < block):
            raise ValueError(f"sink_tokens={sink_tokens} needs pos='rope' or 'alibi' and fewer "
                             f"than {block} sinks")
        if not use_cache:
            return self(window(idx, block, sink_tokens))[0], None
        if cache is None or (cache.pos == block and not sink_tokens):
            keep = block if cache is None else block // 2
            cache = KVCache(self.config.n_layer, block, sink_tokens)
            return self(window(idx, keep, sink_tokens), cache=cache)[0], cache
        return self(idx[:, -1:], cache=cache)[0], cache

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, sink_tokens=0):
        """Yield the next token of every sequence, (B,), one step at a time (see next_logits)."""
        cache = None
        for _ in range(max_new_tokens):
            logits, cache = self.next_logits(idx, cache, use_cache, sink_tokens)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **options):
        """idx (B, T) with max_new_tokens tokens appended, sampled as generate_stream's options."""
        new_tokens = [t[:, None] for t in self.generate_stream(idx, max_new_tokens, **options)]
        return torch.cat([idx, *new_tokens], dim=1)

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out tables that do no matmul work per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.wpe.weight.numel()
        if non_embedding and not self.config.tie_weights:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (MFU): 6 a weight + 12 x layers x width x context (PaLM)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)
