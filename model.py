"""The whole GPT in one file: config, attention, MLP, blocks, the model, a KV cache and sampling.

Reads top to bottom: GPTConfig -> KVCache -> rotary helpers -> CausalSelfAttention -> MLP -> Block -> GPT.
The model works on token ids only; text lives at the edges (prepare.py, sample.py).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from chunked_loss import chunked_cross_entropy


@dataclass
class GPTConfig:
    block_size: int = 256       # longest context the model sees
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False          # biases in Linear and LayerNorm layers (GPT-2 had them)
    pos: str = "learned"        # "learned" absolute positions (GPT-2) or "rope" (rotary)
    tie_weights: bool = True    # LM head shares the token embedding matrix
    attention: bool = True      # False is an ablation: every token attends only to itself
    mlp: str = "gelu"           # "gelu", "gelu_tanh" (GPT-2's tanh approximation) or "relu2" (ReLU squared)
    qk_norm: bool = False       # RMS-normalise queries and keys before attention
    zero_init_proj: bool = False  # residual output projections start at zero
    loss_chunk: int = 0         # > 0: loss over this many rows at a time, no full logits (chunked_loss.py)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.pos not in ("learned", "rope"):
            raise ValueError(f"pos={self.pos!r}: use 'learned' or 'rope'")
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"pos='rope' needs an even head size, got {self.n_embd // self.n_head}")
        if self.mlp not in ("gelu", "gelu_tanh", "relu2"):
            raise ValueError(f"mlp={self.mlp!r}: use 'gelu', 'gelu_tanh' or 'relu2'")
        if self.loss_chunk < 0:
            raise ValueError(f"loss_chunk={self.loss_chunk} must be 0 (off) or a number of rows")


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated once.

    k, v: (n_layer, batch, n_head, max_len, head_dim), allocated on the first write with the
    dtype of the keys (so it follows autocast). `pos` is how many positions are filled; each
    layer writes at `pos` during a forward pass and GPT.forward advances `pos` after the last layer.
    """

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len = n_layer, max_len
        self.k = self.v = None
        self.pos = 0

    def update(self, layer, k, v):
        """Store k, v (batch, n_head, T, head_dim) at `pos`; return all keys and values so far."""
        if self.k is None:
            shape = (self.n_layer, k.size(0), k.size(1), self.max_len, k.size(3))
            self.k = torch.zeros(shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def rope_tables(head_dim, max_len, base=10000.0):
    """cos and sin of the rotation angles, (max_len, head_dim // 2) each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate pairs (x[i], x[i + d/2]) of x (B, n_head, T, head_dim) by the angles of its positions."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.layer, self.n_head = layer, config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.dropout, self.attention, self.qk_norm = config.dropout, config.attention, config.qk_norm

    def queries_keys_values(self, x, rope=None):
        """q, k, v of shape (B, n_head, T, head_dim), normalised and rotated as attention sees them."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v

    def forward(self, x, rope=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.queries_keys_values(x, rope)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(self.layer, k, v)
        if not self.attention:
            y = v[:, :, start:]  # ablation: each token sees only its own value
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self.chunk_mask(T, start, x.device),
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=(start == 0 and T > 1))
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

    @staticmethod
    def chunk_mask(T, start, device):
        """Mask for T new queries after `start` cached keys; None where no mask is needed.

        A full sequence uses is_causal. One new token may see every cached key. Several new
        tokens after a cache need the causal diagonal shifted right by `start`: is_causal would
        align it to the top-left corner and hide the cache from them.
        """
        if start == 0 or T == 1:
            return None
        return torch.ones(T, start + T, dtype=torch.bool, device=device).tril(diagonal=start)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
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
        else:
            cos, sin = rope_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight  # one matrix reads tokens in and writes them out
        self.apply(self._init_weights)
        # GPT-2: each residual branch adds to the stream, so scale its output projection by
        # 1/sqrt(2 * n_layer) to keep the stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def embed(self, idx, start=0):
        """Token (+ learned position) embeddings of idx placed at `start`, and the rotary angles
        (cos, sin) for those positions when pos='rope' (else None)."""
        T = idx.size(1)
        x, rope = self.wte(idx), None
        if self.config.pos == "learned":
            x = x + self.wpe(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        return self.drop(x), rope

    def forward(self, idx, targets=None, cache=None):
        """Logits (B, T, V) and mean cross-entropy when targets are given (target -1 is ignored;
        with loss_chunk, logits None); otherwise logits of the last position only (B, 1, V)."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.block_size
        if start + T > limit:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's {limit}")
        x, rope = self.embed(idx, start)
        for block in self.blocks:
            x = block(x, rope, cache)
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

    @torch.no_grad()
    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        use_cache=True, generator=None):
        """Yield the next token of every sequence, (B,), one step at a time.

        With the cache: one prefill pass over the prompt, then one token per step. When the
        window is full (block_size tokens), the cache is rebuilt from the last block_size // 2
        tokens (a sliding window that moves half a window at a time), so generation goes on past
        block_size at the cost of one prefill every block_size // 2 tokens. Without the cache
        (the reference path) every step recomputes the last block_size tokens.
        """
        block = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -block:])
            elif cache is None or cache.pos == block:
                keep = block if cache is None else block // 2
                cache = KVCache(self.config.n_layer, block)
                logits, _ = self(idx[:, -keep:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)
            next_token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None):
        """Return idx (B, T) with max_new_tokens sampled tokens appended: (B, T + max_new_tokens)."""
        steps = self.generate_stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, generator)
        new_tokens = [token[:, None] for token in steps]
        return torch.cat([idx, *new_tokens], dim=1)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, fused=None,
                             muon_lr=0.0, muon_momentum=0.95):
        """[AdamW] with weight decay on matrices (linear weights, embeddings) only, never on biases
        and norm gains; fused kernels on CUDA unless `fused` says otherwise. With muon_lr > 0,
        [AdamW, Muon]: Muon (torch >= 2.9) takes the 2-D weights inside the blocks, where
        orthogonalised updates train faster; AdamW keeps the embeddings, the head and the gains."""
        named = dict(self.named_parameters())  # tied weights appear once
        hidden = [p for n, p in named.items() if muon_lr and n.startswith("blocks.") and p.dim() == 2]
        rest = [p for p in named.values() if all(p is not h for h in hidden)]
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
        if fused is None:
            fused = device_type == "cuda"
        optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
        if hidden:
            optimizers.append(torch.optim.Muon(hidden, lr=muon_lr, momentum=muon_momentum,
                                               weight_decay=0.0, adjust_lr_fn="original"))
        return optimizers

    def num_params(self, non_embedding=True):
        """Parameter count; non_embedding leaves out the position table (and, when untied, the
        input embedding), which do no matmul work per token."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos == "learned":
            n -= self.wpe.weight.numel()
        if non_embedding and not self.config.tie_weights:
            n -= self.wte.weight.numel()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token: 6 per weight plus attention's
        12 * layers * width * context (PaLM appendix B), used for MFU."""
        cfg = self.config
        seq_len = seq_len or cfg.block_size
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * seq_len


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, V). temperature 0 is greedy; top_k keeps exactly the
    k best; top_p keeps the smallest set of best tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        best = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, best.indices, best.values)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(outside, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
