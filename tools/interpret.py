"""Look inside a trained model: attention maps per layer and head, a logit lens, activation
patching.

    python -m tools.interpret --out_dir=out-reverse --prompt="QWERTY=" --png=reverse_attention.png
    python -m tools.interpret --out_dir=out-reverse --prompt="QWERTY=" --corrupt="ASDFGH=" \
        --png=reverse_patching.png

The prompt is completed greedily up to `answer_tokens` new tokens, then the whole sequence is
read back: each head's attention pattern is drawn as a heat map (row = query token, column =
the token it reads), and the logit lens prints, after every layer, the model's top guess for the
next token at each position (the final norm and LM head applied to the residual stream there).

With --corrupt, activation patching instead: the prompt (clean) and the corrupted prompt (same
length) are each completed greedily, and for every answer token where the two answers differ,
one clean activation at a time is put into the corrupted run: the residual stream after the
embedding and after each block at one position, and each head's output at the answer's position.
The score is the share of the logit difference (clean answer minus corrupted answer, at the
position that predicts it) that the patch restores: 0 = the corrupted run's, 1 = the clean run's.
"""
import sys
from dataclasses import dataclass

import torch

from tinygpt.checkpoint import load_for_inference
from tinygpt.common import CheckpointError, ConfigError, DataError, must, run_cli
from tinygpt.device import DTYPES


@dataclass
class InterpretConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    prompt: str = "\n"           # the text to read the model on
    answer_tokens: int = 6       # greedy tokens appended to the prompt before reading the model
    corrupt: str = ""            # --prompt changed: --prompt's run is patched into its run
    png: str = "attention.png"   # where the attention maps (or patching maps) go ('' = do not draw)
    device: str = "cpu"          # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "float32"       # 'float32' or 'bfloat16'

    def __post_init__(self):
        must(self.answer_tokens >= 0, f"answer_tokens={self.answer_tokens} must not be negative")
        must(not self.corrupt or self.answer_tokens > 0,
             "patching needs answer_tokens >= 1: the answer it restores")
        must(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")


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
            scores = (q @ k.transpose(-2, -1)) * attn.scale
            # ALiBi's float mask (the distance bias, and -inf ahead), or None for plain causal.
            bias = attn.attention_mask(T, 0, T, idx.device)
            if bias is None:
                scores = scores.masked_fill(~causal, float("-inf"))
            else:
                scores = scores + bias
            w = scores.softmax(dim=-1)
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


# Activation patching. A site is where an activation is read and replaced: ('resid', 0) the
# embedding's output and ('resid', i + 1) block i's output, the residual stream (B, T, C);
# ('attn', i) block i's attention output; ('heads', i) the input of that attention's output
# projection, the heads' outputs side by side (head h in channels h * head_dim to
# (h + 1) * head_dim), so one head can be replaced.

def site_module(model, site, layer):
    """The module whose output (input, for 'heads') is the activation at (site, layer)."""
    if site == "resid":
        return model.drop if layer == 0 else model.blocks[layer - 1]
    attn = model.blocks[layer].attn
    return attn.c_proj if site == "heads" else attn


def all_sites(model):
    n_layer = model.config.n_layer
    return ([("resid", i) for i in range(n_layer + 1)] + [("attn", i) for i in range(n_layer)]
            + [("heads", i) for i in range(n_layer)])


def hook(module, site, fn):
    """Register fn(activation) -> a replacement, or None to keep it, on a site's module; return
    the handle."""
    if site == "heads":  # the activation is the module's input
        def replace_input(m, args):
            y = fn(args[0])
            return None if y is None else (y,)
        return module.register_forward_pre_hook(replace_input)
    return module.register_forward_hook(lambda m, args, out: fn(out))


def all_logits(model, idx, hooks=()):
    """Logits (B, T, V) at every position, with the given (module, site, fn) hooks in place."""
    handles = [hook(*h) for h in hooks]
    try:
        # Given targets, the model returns the logits of every position, not the last one only.
        logits, _ = model(idx, targets=torch.zeros_like(idx))
    finally:
        for handle in handles:
            handle.remove()
    return logits


@torch.no_grad()
def run_with_cache(model, idx):
    """The logits of idx and {(site, layer): activation} for every site (see above)."""
    cache = {}
    hooks = [(site_module(model, *key), key[0], lambda a, key=key: cache.__setitem__(key, a))
             for key in all_sites(model)]
    return all_logits(model, idx, hooks), cache


@torch.no_grad()
def patched_logits(model, idx, cache, site, layer, positions, heads=None):
    """Logits of idx with the cached activation at (site, layer) put in at `positions` (a list),
    in all channels, or for site 'heads' only in those of `heads` (a list; None = all)."""
    if heads is not None and site != "heads":
        raise ValueError(f"heads={heads} applies to site 'heads' only, not {site!r}")
    T, C = idx.size(1), model.config.n_embd
    mask = torch.zeros(T, C, dtype=torch.bool, device=idx.device)
    head_dim = C // model.config.n_head
    for h in (range(model.config.n_head) if heads is None else heads):
        mask[positions, h * head_dim:(h + 1) * head_dim] = True
    clean = cache[(site, layer)]
    module = site_module(model, site, layer)
    return all_logits(model, idx, [(module, site, lambda a: torch.where(mask, clean, a))])


def restored_fraction(logits, clean_logits, corrupt_logits, steps):
    """Per answer step (position, clean token, corrupted token): how much of the logit difference
    (clean minus corrupted token) that separates the corrupted run from the clean one `logits`
    restore."""
    positions, good, bad = (torch.tensor(column) for column in zip(*steps))
    patched, clean, corrupt = (lg[0, positions, good].float() - lg[0, positions, bad].float()
                               for lg in (logits, clean_logits, corrupt_logits))
    return (patched - corrupt) / (clean - corrupt)


@torch.no_grad()
def patching_scores(model, clean_idx, corrupt_idx, steps):
    """Restored fractions (see restored_fraction) of two sweeps, for every answer step:
    resid (steps, n_layer + 1, T), one position of the residual stream at a time, after the
    embedding and after each block; heads (steps, n_layer, n_head + 1), one head's output at a time
    and then all of them (the layer's attention), at the position that predicts that step's
    answer."""
    clean_logits, cache = run_with_cache(model, clean_idx)
    corrupt_logits = all_logits(model, corrupt_idx)

    def score(logits):
        return restored_fraction(logits, clean_logits, corrupt_logits, steps)

    cfg, T = model.config, clean_idx.size(1)
    resid = torch.zeros(len(steps), cfg.n_layer + 1, T)
    for layer in range(cfg.n_layer + 1):
        for t in range(T):
            logits = patched_logits(model, corrupt_idx, cache, "resid", layer, [t])
            resid[:, layer, t] = score(logits)
    heads = torch.zeros(len(steps), cfg.n_layer, cfg.n_head + 1)
    for s, (position, _, _) in enumerate(steps):
        for layer in range(cfg.n_layer):
            for h in range(cfg.n_head + 1):  # the last column patches every head at once
                chosen = [h] if h < cfg.n_head else None
                logits = patched_logits(model, corrupt_idx, cache, "heads", layer, [position],
                                        chosen)
                heads[s, layer, h] = score(logits)[s]
    return resid, heads


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


def draw_patching(resid, heads, labels, titles, path, columns=3):
    """Per answer step, two heat maps of the restored share, one above the other: layer x position
    for the residual stream, layer x head at the predicting position; `columns` steps a row; a
    PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_steps, n_rows, T = resid.shape
    n_layer, n_columns = heads.shape[1:]
    columns, rows = min(columns, n_steps), -(-n_steps // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(0.42 * T * columns + 1.5, 2.6 * rows),
                             squeeze=False, layout="constrained",
                             gridspec_kw={"height_ratios": [n_rows, n_layer] * rows})
    for ax in axes.flat:  # shown again below when a step fills it
        ax.set_visible(False)
    for s in range(n_steps):
        row, column = 2 * (s // columns), s % columns
        top, bottom = axes[row][column], axes[row + 1][column]
        for ax, scores, x_labels, y_labels in (
                (top, resid[s], labels, ["embed"] + [f"layer {i}" for i in range(n_rows - 1)]),
                (bottom, heads[s], head_labels(n_columns), [f"layer {i}" for i in range(n_layer)])):
            ax.set_visible(True)
            image = ax.imshow(scores.numpy(), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
            ax.set_xticks(range(len(x_labels)), x_labels, fontsize=7)
            ax.set_yticks(range(len(y_labels)), y_labels, fontsize=7)
        top.set_title(titles[s], fontsize=9)
        for layer, row in enumerate(heads[s].tolist()):
            for h, x in enumerate(row):
                bottom.text(h, layer, f"{x:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(x) > 0.6 else "black")  # white on the dark ends
    fig.colorbar(image, ax=axes, shrink=0.6, label="share of the logit difference restored")
    fig.supylabel("top: residual stream after each layer, one position patched\n"
                  "bottom: one head's output (then all) patched at the predicting position",
                  fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def head_labels(columns):
    return [f"head {h}" for h in range(columns - 1)] + ["all heads"]


def print_patching(resid, heads, labels, titles):
    """The same numbers as draw_patching, one table pair per answer step."""
    print("patching: share restored of the logit difference clean answer minus corrupted answer "
          "(0 = the corrupted run, 1 = the clean run)")
    for s, title in enumerate(titles):
        print(f"\n{title}\nresidual stream, one position patched at a time:")
        print(" " * 10 + "".join(f"{label:>6s}" for label in labels))
        for row, scores in enumerate(resid[s].tolist()):
            name = "embed" if row == 0 else f"layer {row - 1}"
            print(f"{name:10s}" + "".join(f"{x:6.2f}" for x in scores))
        print("one head patched at a time (then all heads), at the predicting position:")
        print(" " * 10 + "".join(f"{label:>10s}" for label in head_labels(heads.size(2))))
        for layer, scores in enumerate(heads[s].tolist()):
            print(f"layer {layer:<4d}" + "".join(f"{x:10.2f}" for x in scores))


def show_token(text):
    return {"\n": "\\n", " ": "␣"}.get(text, text)


def print_logit_lens(readouts, labels, decode):
    """A table: one row per layer, one column per position, cell = top guess and its probability."""
    print("logit lens: top next-token guess after each layer (probability)")
    print(" " * 10 + "".join(f"{label:>9s}" for label in labels))
    for layer, probs in enumerate(readouts):
        top_p, top_id = probs[0].max(dim=-1)
        cells = "".join(f"{show_token(decode([i])):>4s} {p:.2f}"
                        for i, p in zip(top_id.tolist(), top_p.tolist()))
        print(f"{'embed' if layer == 0 else f'layer {layer - 1}':10s}{cells}")


def encoded(tokenizer, text, option="prompt") -> list:
    """The token ids of an option's text, or a ConfigError naming the option."""
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise ConfigError(f"--{option} cannot be encoded: {e}") from None
    if not ids:
        raise ConfigError(f"--{option} is empty; give some text with --{option}=...")
    return ids


def prompt_ids(ids, room) -> list:
    """The prompt's token ids, cropped from the left to the room the window leaves (with a note)."""
    if len(ids) > room:
        print(f"note: the prompt has {len(ids)} tokens; reading its last {room} (the window, less "
              "the answer)", file=sys.stderr)
    return ids[-room:]


def interpret(cfg):
    model, tokenizer, device = load_for_inference(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype)
    if cfg.corrupt:
        return patch(cfg, model, tokenizer, device)
    block = model.config.block_size
    answer_tokens = min(cfg.answer_tokens, block - 1)
    ids = prompt_ids(encoded(tokenizer, cfg.prompt), block - answer_tokens)
    idx = torch.tensor([ids], device=device)
    idx = model.generate(idx, answer_tokens, temperature=0)
    labels = [show_token(tokenizer.decode([i])) for i in idx[0].tolist()]
    print(f"sequence: {tokenizer.decode(idx[0].tolist())!r}")
    print_logit_lens(logit_lens(model, idx), labels, tokenizer.decode)
    if cfg.png:
        draw_attention(attention_weights(model, idx), labels, cfg.png)
        print(f"attention maps: {cfg.png}")


def answer_steps(clean_run, corrupt_run, answer_tokens):
    """(position, clean token, corrupted token) for each answer token where the two greedy runs
    (1, T) differ; position is the one whose logits predict it."""
    start = clean_run.size(1) - answer_tokens - 1
    pairs = zip(clean_run[0, start + 1:].tolist(), corrupt_run[0, start + 1:].tolist())
    return [(start + k, good, bad) for k, (good, bad) in enumerate(pairs) if good != bad]


def patch(cfg, model, tokenizer, device):
    """Activation patching of --prompt (clean) into --corrupt: printed tables and, with --png, the
    heat maps."""
    clean, corrupt = encoded(tokenizer, cfg.prompt), encoded(tokenizer, cfg.corrupt, "corrupt")
    if len(clean) != len(corrupt):
        raise ConfigError(f"--prompt has {len(clean)} tokens and --corrupt {len(corrupt)}; "
                          "patching pairs positions, so give two prompts of the same length")
    answer_tokens = min(cfg.answer_tokens, model.config.block_size - 1)
    room = model.config.block_size - answer_tokens + 1  # the last answer token is never read
    clean, corrupt = prompt_ids(clean, room), corrupt[-room:]
    runs = [model.generate(torch.tensor([ids], device=device), answer_tokens, temperature=0)
            for ids in (clean, corrupt)]
    print(f"clean:     {tokenizer.decode(runs[0][0].tolist())!r}")
    print(f"corrupted: {tokenizer.decode(runs[1][0].tolist())!r}")
    steps = answer_steps(*runs, answer_tokens)
    if not steps:
        raise ConfigError("both prompts get the same answer: nothing for patching to restore; "
                          "corrupt a token the answer depends on")
    # The last answer token predicts nothing that is scored, so the runs are read without it.
    clean_idx, corrupt_idx = runs[0][:, :-1], runs[1][:, :-1]
    resid, heads = patching_scores(model, clean_idx, corrupt_idx, steps)

    def token(i):
        return show_token(tokenizer.decode([i]))

    labels = [token(a) + ("" if a == b else "/" + token(b))
              for a, b in zip(clean_idx[0].tolist(), corrupt_idx[0].tolist())]
    titles = [f"predicting {token(good)} (not {token(bad)}) at {p} ({labels[p]})"
              for p, good, bad in steps]
    print_patching(resid, heads, labels, titles)
    if cfg.png:
        draw_patching(resid, heads, labels, titles, cfg.png)
        print(f"patching maps: {cfg.png}")


def main(argv) -> int:
    usage = "usage: python -m tools.interpret [--key=value ...]"
    return run_cli(InterpretConfig, argv, usage, __doc__.split("\n\n")[0], interpret,
                   (CheckpointError, DataError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
