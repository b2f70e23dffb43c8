"""Look inside a trained model: attention maps per layer and head, and a logit lens.

    python interpret.py --out_dir=out-reverse --prompt="QWERTY=" --png=reverse_attention.png

The prompt is completed greedily up to `answer_tokens` new tokens, then the whole sequence is
read back: each head's attention pattern is drawn as a heat map (row = query token, column =
the token it reads), and the logit lens prints, after every layer, the model's top guess for the
next token at each position (the final norm and LM head applied to the residual stream there).
"""
import math
import sys
from dataclasses import dataclass

import torch

from checkpoint import CheckpointError, load_for_inference
from dataset import DataError
from options import ConfigError, must, run_cli


@dataclass
class InterpretConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    prompt: str = "\n"           # the text to read the model on
    answer_tokens: int = 6       # greedy tokens appended to the prompt before reading the model
    png: str = "attention.png"   # where the attention maps go ('' = do not draw)
    device: str = "cpu"          # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "float32"       # 'float32' or 'bfloat16'

    def __post_init__(self):
        must(self.answer_tokens >= 0, f"answer_tokens={self.answer_tokens} must not be negative")
        must(self.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"dtype={self.dtype!r}: use auto, float32, bfloat16 or float16")


@torch.no_grad()
def attention_weights(model, idx):
    """Per layer, the attention probabilities (B, n_head, T, T) that the model's SDPA call computes,
    recomputed from the model's own queries and keys."""
    x, rope = model.embed(idx)
    T = idx.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
    weights = []
    for block in model.blocks:
        attn = block.attn
        if not attn.attention:  # the ablation: every token reads only itself
            w = torch.eye(T, device=idx.device).expand(idx.size(0), attn.n_head, T, T)
        else:
            q, k, _ = attn.queries_keys_values(block.ln_1(x), rope)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
            w = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        weights.append(w)
        x = block(x, rope)
    return weights


@torch.no_grad()
def logit_lens(model, idx):
    """Next-token probabilities (B, T, V) read from the residual stream after the embedding and
    after each block; the last entry equals the model's own output distribution."""
    x, rope = model.embed(idx)
    readouts = [model.lm_head(model.ln_f(x)).softmax(dim=-1)]
    for block in model.blocks:
        x = block(x, rope)
        readouts.append(model.lm_head(model.ln_f(x)).softmax(dim=-1))
    return readouts


def draw_attention(weights, labels, path):
    """One heat map per (layer, head), rows = layers, columns = heads, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    n_layer, n_head = len(weights), weights[0].size(1)
    fig, axes = plt.subplots(n_layer, n_head, figsize=(2.4 * n_head, 2.4 * n_layer), squeeze=False)
    for layer, w in enumerate(weights):
        for head in range(n_head):
            ax = axes[layer][head]
            ax.imshow(w[0, head].float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ticks = range(len(labels))
            ax.set_xticks(ticks, labels, fontsize=6)
            ax.set_yticks(ticks, labels, fontsize=6)
    fig.supxlabel("key (token read)")
    fig.supylabel("query (token reading)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def show_token(text):
    return {"\n": "\\n", " ": "␣"}.get(text, text)


def print_logit_lens(readouts, labels, decode):
    """A table: one row per layer, one column per position, cell = top guess and its probability."""
    print("logit lens: top next-token guess after each layer (probability)")
    print(" " * 10 + "".join(f"{label:>9s}" for label in labels))
    for layer, probs in enumerate(readouts):
        top_p, top_id = probs[0].max(dim=-1)
        cells = "".join(f"{show_token(decode([i])):>4s} {p:.2f}" for i, p in zip(top_id.tolist(), top_p.tolist()))
        print(f"{'embed' if layer == 0 else f'layer {layer - 1}':10s}{cells}")


def prompt_ids(tokenizer, prompt, room) -> list:
    """The prompt's token ids, cropped from the left to the room the window leaves (with a note)."""
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise ConfigError(f"the prompt cannot be encoded: {e}") from None
    if not ids:
        raise ConfigError("the prompt is empty; give some text with --prompt=...")
    if len(ids) > room:
        print(f"note: the prompt has {len(ids)} tokens; reading its last {room} (the window, less the answer)",
              file=sys.stderr)
    return ids[-room:]


def interpret(cfg):
    model, tokenizer, device = load_for_inference(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype)
    block = model.config.block_size
    answer_tokens = min(cfg.answer_tokens, block - 1)
    idx = torch.tensor([prompt_ids(tokenizer, cfg.prompt, block - answer_tokens)], dtype=torch.long, device=device)
    idx = model.generate(idx, answer_tokens, temperature=0)
    labels = [show_token(tokenizer.decode([i])) for i in idx[0].tolist()]
    print(f"sequence: {tokenizer.decode(idx[0].tolist())!r}")
    print_logit_lens(logit_lens(model, idx), labels, tokenizer.decode)
    if cfg.png:
        draw_attention(attention_weights(model, idx), labels, cfg.png)
        print(f"attention maps: {cfg.png}")


def main(argv) -> int:
    return run_cli(InterpretConfig, argv, "usage: python interpret.py [--key=value ...]", __doc__.split("\n\n")[0],
                   interpret, (CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
