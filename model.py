"""The whole GPT in one file, top to bottom: GPTConfig -> sin/cos helpers -> CausalSelfAttention -> MLP -> Block
-> GPT. Token ids only; text lives at the edges (prepare.py, sample.py); the cache and the token choice that
generation uses are kv_cache.py and sampling.py."""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chunked_loss import chunked_cross_entropy
from dropout import Dropout, attention
from kv_cache import KVCache
from sampling import sample_next

SINK_POSITIONS = ("rope", "alibi")  # attention sinks move cached keys to other slots: only these positions follow


@dataclass
class GPTConfig:
    block_size: int = 256       # longest context the model sees
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    fast_dropout: bool = False  # masks cut from random 64-bit words (p to 1/65536): CPU steps ~2x faster (dropout.py)
    bias: bool = False          # biases in Linear and LayerNorm layers (GPT-2 had them)
    pos: str = "learned"        # "learned" (GPT-2), "sinusoidal" (fixed sin/cos), "rope" (rotary) or "alibi" (distance bias)
    tie_weights: bool = True    # LM head shares the token embedding matrix
    attention: bool = True      # False is an ablation: every token attends only to itself
    mlp: str = "gelu"           # "gelu", "gelu_tanh" (GPT-2's tanh approximation) or "relu2" (ReLU squared)
    qk_norm: bool = False       # RMS-normalise queries and keys before attention
    zero_init_proj: bool = False  # residual output projections start at zero
    loss_chunk: int = 0         # > 0: loss over this many rows at a time, no full logits (chunked_loss.py)
    attn_float32: bool = False  # attention in fp32 under autocast: CPU's bf16 flash backward is ~4x slower
    unet_skips: bool = False    # the first half's block outputs feed their mirror blocks in the second half
    attn_scale: float = 0.0     # scale of q.k; 0: 1/sqrt(head_dim). With qk_norm |q.k| <= head_dim, so it caps sharpness
    rope_base: float = 10000.0  # RoPE's angles: position x base^(-2i/head_dim); a smaller base turns faster
    zero_init_head: bool = False  # an untied LM head starts at zero: the first prediction is uniform

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos not in ("learned", "sinusoidal", "rope", "alibi"):
            raise ValueError(f"pos={self.pos!r}: use 'learned', 'sinusoidal', 'rope' or 'alibi'")
        size = {"sinusoidal": self.n_embd, "rope": self.n_embd // self.n_head}.get(self.pos, 0)
        if size % 2:  # sin and cos come in pairs of dimensions
            raise ValueError(f"pos={self.pos!r} needs an even {'n_embd' if self.pos == 'sinusoidal' else 'head size'}, got {size}")
        if self.mlp not in ("gelu", "gelu_tanh", "relu2"):
            raise ValueError(f"mlp={self.mlp!r}: use 'gelu', 'gelu_tanh' or 'relu2'")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk} must be 0 (off) or a number of rows")
        if self.attn_scale < 0:
            raise ValueError(f"attn_scale={self.attn_scale} must be >= 0 (0 means 1/sqrt(head_dim))")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base={self.rope_base} must be > 1")
        if self.zero_init_head and self.tie_weights:
            raise ValueError("zero_init_head=True would zero the token embeddings too: set tie_weights=False")


def sincos_tables(dim, length, device=None, base=10000.0):
    """cos, sin of position x base^(-2i/dim), (length, dim // 2) each: side by side the sinusoidal table, or RoPE's angles."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=device).float() / dim)
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]) of x (B, n_head, T, head_dim) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head, self.head_dim = layer, config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = Dropout(config.dropout, config.fast_dropout)
        self.dropout, self.attention, self.qk_norm = config.dropout, config.attention, config.qk_norm
        self.attn_float32, self.scale = config.attn_float32, config.attn_scale or 1 / math.sqrt(self.head_dim)
        slopes = 2.0 ** (-8.0 * torch.arange(1, config.n_head + 1) / config.n_head)  # ALiBi: 2^(-8/n) .. 2^-8
        self.register_buffer("alibi_slopes", slopes if config.pos == "alibi" else None, persistent=False)

    def queries_keys_values(self, x, rope=None, rotate_keys=True):
        """q, k, v (B, n_head, T, head_dim) as attention sees them (fp32 with attn_float32); x's T tokens take rope's
        last T rows. q and k are normed and rotated together, in the (B, T, 3, n_head, head_dim) layout c_attn
        writes: on a CPU a small op costs more in overhead than in arithmetic, so one op for both halves the cost."""
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim)
        qkv = qkv.float() if self.attn_float32 else qkv  # one cast; norm and rotation then run in fp32 too
        qk, v = qkv.split((2, 1), dim=2)
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            cos, sin = (t[-T:, None, None] for t in rope)  # (T, 1, 1, head_dim / 2): over both, every head
            qk = apply_rope(qk, cos, sin) if rotate_keys else torch.cat((apply_rope(qk[:, :, :1], cos, sin), qk[:, :, 1:]), 2)
        q, k = qk.unbind(2)
        return q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2)

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        start = 0 if cache is None else cache.pos if cache.slot is None else cache.slot
        slot_keys = rope is not None and cache is not None and cache.sinks > 0
        q, k, v = self.queries_keys_values(x, rope, rotate_keys=not slot_keys)
        if cache is not None and self.attention:
            k, v = cache.update(self.layer, k, v)
        if slot_keys:  # a sink cache moves keys to other slots, so it holds them unrotated: rotate by slot here
            k = apply_rope(k, *rope)
        if not self.attention:
            y = v  # ablation: each token sees only its own value
        else:
            mask = self.attention_mask(T, start, k.size(2), x.device)
            with torch.autocast(x.device.type, enabled=False) if self.attn_float32 else nullcontext():
                y = attention(q, k, v, mask, mask is None and T > 1, self.dropout if self.training else 0.0,
                              fast=self.resid_dropout.fast, scale=self.scale)  # fast dropout masks the weights too
        y = y.to(self.c_proj.weight.dtype) if self.attn_float32 else y  # bf16 weights need it; autocast casts anyway
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))

    def attention_mask(self, T, start, n_keys, device):
        """attn_mask for T queries at positions start.. over n_keys keys: None if is_causal or one token does, else
        the causal diagonal shifted by `start` (an int, or decode_step's slot tensor, whose later slots are empty);
        ALiBi's -slope x distance in a float mask (no flash kernel on GPU, so only ALiBi)."""
        if self.alibi_slopes is None and not torch.is_tensor(start) and (start == 0 or T == 1):
            return None
        distance = (start + torch.arange(T, device=device))[:, None] - torch.arange(n_keys, device=device)
        if self.alibi_slopes is None:
            return distance >= 0
        return (-self.alibi_slopes[:, None, None] * distance).masked_fill(distance < 0, float("-inf"))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout, config.fast_dropout)
        self.relu2 = config.mlp == "relu2"
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"  # GPT-2's GELU is the tanh one

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
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos in ("sinusoidal", "rope"):  # fixed tables: buffers, rebuilt from the config, not saved
            dim = config.n_embd if config.pos == "sinusoidal" else config.n_embd // config.n_head
            self.table_base = config.rope_base if config.pos == "rope" else 10000.0
            for name, table in zip(("pos_cos", "pos_sin"), sincos_tables(dim, config.block_size, base=self.table_base)):
                self.register_buffer(name, table, persistent=False)
        self.drop = Dropout(config.dropout, config.fast_dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        if config.unet_skips and config.n_layer > 1:  # one block has no mirror: nothing to learn
            self.skip_weights = nn.Parameter(torch.ones(config.n_layer // 2))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and writes them out
        for m in self.modules():  # GPT-2 init: weights N(0, 0.02), biases zero
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        # GPT-2: each residual branch adds to the stream, so scale its output projection by
        # 1/sqrt(2 * n_layer) to keep the stream's variance flat with depth (or start it at zero).
        std = 0.02 / math.sqrt(2 * config.n_layer)
        for p in (p for name, p in self.named_parameters() if name.endswith("c_proj.weight")):
            nn.init.zeros_(p) if config.zero_init_proj else nn.init.normal_(p, mean=0.0, std=std)
        if config.zero_init_head:
            nn.init.zeros_(self.lm_head.weight)

    def sincos(self, start, end):
        """Rows start .. end - 1 of the cos and sin tables (past block_size computed afresh), or row `start` of a tensor."""
        if torch.is_tensor(start):
            return self.pos_cos[start], self.pos_sin[start]
        if end <= len(self.pos_cos):
            return self.pos_cos[start:end], self.pos_sin[start:end]
        return tuple(t[start:] for t in sincos_tables(2 * self.pos_cos.size(1), end, self.pos_cos.device, self.table_base))

    def embed(self, idx, start=0):
        """Embeddings of idx at positions start.. (+ learned/sinusoidal ones), and RoPE's (cos, sin) rows or None:
        rows from 0 (a sink cache rotates every key by its slot), or decode_step's one row at a slot tensor."""
        T, pos = idx.size(1), self.config.pos
        x = self.wte(idx)
        if pos == "learned":
            x = x + self.wpe(start + torch.arange(T, device=idx.device))
        elif pos == "sinusoidal":
            # scaled to the embeddings' init (std 0.02): at RMS 0.71 the table drowned the tokens (val 2.19 vs 1.88)
            x = x + 0.02 * math.sqrt(2) * torch.cat(self.sincos(start, start + T), dim=-1)
        return self.drop(x), self.sincos(start if torch.is_tensor(start) else 0, start + T) if pos == "rope" else None

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, V) and mean cross-entropy when targets are given (target -1 is ignored; with
        loss_chunk, logits None); else the last position's logits (B, 1, V), all generation needs.
        Without a cache, only learned positions stop at block_size; the others extrapolate."""
        B, T = idx.shape
        if cache is not None and cache.sinks:
            cache.make_room(T)
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.block_size if self.config.pos == "learned" else math.inf
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {limit}")
        x = self.trunk(*self.embed(idx, start), cache)
        if cache is not None:
            cache.pos += T
        x = self.ln_f(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        if self.config.loss_chunk:  # no logits come back: they never exist whole
            x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.loss_chunk)
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def trunk(self, x, rope, cache):
        """The blocks in turn; with unet_skips block i also gets the output of block n_layer - 1 - i."""
        n, half, skips = self.config.n_layer, self.config.n_layer // 2 if self.config.unet_skips else 0, []
        for i, block in enumerate(self.blocks):
            if i >= n - half:
                x = x + self.skip_weights[n - 1 - i] * skips.pop()
            x = block(x, rope, cache)
            skips += [x] if i < half else []
        return x

    @torch.no_grad()
    def next_logits(self, idx, cache=None, use_cache=True, sink_tokens=0, step=None):
        """(logits (B, 1, V) of the next token, the cache): a prefill, then one token per step, run by `step` when
        given (decode_step, maybe compiled); a full window restarts from its last half, or with sink_tokens=N keeps
        the first N and drops the oldest others (slots act as positions: RoPE and ALiBi only). Without the cache
        each step recomputes the same window."""
        block = self.config.block_size
        if sink_tokens and (self.config.pos not in SINK_POSITIONS or not 0 < sink_tokens < block or step):
            raise ValueError(f"sink_tokens={sink_tokens} needs pos='rope' or 'alibi', fewer than {block} sinks "
                             "and no fixed-shape step")

        def last(keep):  # the sinks, then the last keep - sink_tokens tokens
            return idx if idx.size(1) <= keep else torch.cat((idx[:, :sink_tokens], idx[:, sink_tokens - keep:]), 1)
        if not use_cache:
            return self(last(block))[0], None
        if cache is None or (cache.pos == block and not sink_tokens):
            window = last(block if cache is None else block // 2)
            cache = KVCache(self.config.n_layer, block, sink_tokens)
            logits = self(window, cache=cache)[0]
            cache.slot = torch.tensor([cache.pos], device=idx.device) if step else None
            return logits, cache
        if not step:
            return self(idx[:, -1:], cache=cache)[0], cache
        logits = step(idx[:, -1:].clone(memory_format=torch.contiguous_format), cache)  # strides fixed too
        cache.pos, cache.slot = cache.pos + 1, cache.slot.add_(1)  # the slot moves on the device: no host sync
        return logits, cache

    def decode_step(self, token, cache):
        """Logits (B, 1, V) of token (B, 1) written at cache.slot, attending over every slot (the later ones
        masked): all shapes fixed, so torch.compile takes the whole step (sample.py --compile)."""
        return self.lm_head(self.ln_f(self.trunk(*self.embed(token, cache.slot), cache)))

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None, sink_tokens=0, step=None):
        """Yield the next token of every sequence, (B,), one step at a time (see next_logits)."""
        cache = None
        for _ in range(max_new_tokens):
            logits, cache = self.next_logits(idx, cache, use_cache, sink_tokens, step)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **options):
        """idx (B, T) with max_new_tokens tokens appended, sampled as generate_stream's options say."""
        return torch.cat([idx, *(token[:, None] for token in self.generate_stream(idx, max_new_tokens, **options))], 1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None,
                             muon_lr=0.0, muon_momentum=0.95):
        """[AdamW] with weight decay on matrices only (fused on CUDA by default); with muon_lr > 0 [AdamW, Muon]:
        Muon (torch >= 2.9's, batched by shape: muon.py) takes the blocks' 2-D weights; AdamW the embeddings, the
        head and the gains."""
        named = dict(self.named_parameters())  # tied weights appear once
        hidden = [p for n, p in named.items() if muon_lr and n.startswith("blocks.") and p.dim() == 2]
        rest = [p for p in named.values() if all(p is not h for h in hidden)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" if fused is None else fused
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
        if hidden:  # imported here: torch.optim.Muon, its base, is torch >= 2.9
            from muon import BatchedMuon
            optimizers.append(BatchedMuon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=0.0,
                                          adjust_lr_fn="original"))
        return optimizers

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out tables that do no matmul work per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.wpe.weight.numel()
        if non_embedding and not self.config.tie_weights:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (MFU): 6 per weight + 12 x layers x width x context (PaLM, app. B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * (seq_len or cfg.block_size)
