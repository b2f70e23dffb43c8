"""Helpers the spec files share: the repo's scripts run as real processes on tiny models and real
data files that prepare.py builds in temp folders."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import GPT, GPTConfig  # noqa: E402
from tinygpt.datasets import prepare  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
if (SHARED_DATA / "tiktoken_cache").is_dir():  # GPT-2 BPE without a network (CI sets it too)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
# huggingface_hub's user-agent asks the Hub which AI agents exist (once a process):
# tests never touch the network
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# One thread per process: the same arithmetic in every run (bitwise comparisons rely on it), and
# several test processes can share two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
# The tests run in this process too: tiny models gain nothing from a second thread.
torch.set_num_threads(1)
# --plot=False: no picture-drawing process behind each of the suite's runs
# (test_plot.py draws them).
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8",
        "--dtype=float32", "--eval_iters=2", "--log_interval=1", "--device=cpu",
        "--warmup_iters=5", "--learning_rate=3e-3", "--plot=False"]


def gpt2_bpe_loads_offline() -> bool:
    """Whether tiktoken's GPT-2 files load from its cache (TIKTOKEN_CACHE_DIR, else its default
    folder). A proxy on a closed port makes any download attempt fail at once, so a missing file
    never waits on the network."""
    import tiktoken
    proxies = {k: os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")}
    os.environ.update({"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                       "NO_PROXY": "", "no_proxy": ""})
    try:
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:  # tiktoken raises requests' errors, or its own, by version
        return False
    finally:
        for key, value in proxies.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


needs_gpt2_bpe = pytest.mark.skipif(
    not gpt2_bpe_loads_offline(),
    reason="tiktoken's GPT-2 files are not cached: set TIKTOKEN_CACHE_DIR to a folder holding them")


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**args, **overrides})).eval()


def tiny_hf_gpt2(folder, seed=0, **overrides):
    """A tiny random GPT-2 from transformers (a test-only dependency), saved to folder with
    save_pretrained. Its weights are drawn wider than GPT-2's init (std 0.3, not 0.02) so that every
    part of the network, the GELU's curve included, moves the logits by more than the tolerance
    tests compare them to; and every tensor is random, biases and LayerNorm gains and biases (ln_f's
    too) included: at their defaults (0 and 1) a mapping that drops or swaps one of them would still
    give transformers' logits."""
    # Slow to import: only the tests that use it.
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**{"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 2,
                           "n_head": 4, "initializer_range": 0.3, **overrides})
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:  # the tensors GPT-2's init leaves at 0 or 1
                tensor.add_(torch.randn_like(tensor) * 0.3)
    assert all(t.std() > 0.1 for t in model.parameters()), "a tensor kept its default value"
    model.save_pretrained(folder)
    return model


def tiny_text(n_lines=1500, seed=0) -> str:
    """Text with learnable structure: short sentences from a small vocabulary."""
    rng = random.Random(seed)
    subjects, verbs = ["the cat", "a dog", "my friend", "the king"], ["sees", "likes", "eats"]
    objects = ["the fish.", "a hat.", "bread.", "the moon."]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}\n"
                   for _ in range(n_lines))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder with the text data set 'tiny' and the 'reverse' task, built by prepare.py."""
    root = tmp_path_factory.mktemp("data")
    source = root / "tiny.txt"
    source.write_text(tiny_text())
    prepare("tiny", source=source, data_dir=root)
    prepare("reverse", data_dir=root)
    return root


def run_script(script, args, cwd=REPO, check=True, timeout=300, stdin=None, launcher=None,
               env=None):
    """Run one of the repo's scripts (by default with this Python, with ENV plus env) and return the
    finished process. A tool ('tools/evaluate.py') runs as the README runs it,
    `python -m tools.evaluate`, with the repo on the path."""
    module = script.removesuffix(".py").replace("/", ".")
    target = ["-m", module] if script.startswith("tools/") else [str(REPO / script)]
    command = (launcher or [sys.executable]) + [*target, *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env={**ENV, "PYTHONPATH": str(REPO), **(env or {})},
                            capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_train(args, cwd=REPO, check=True, timeout=300):
    return run_script("train.py", args, cwd, check, timeout)


def train_main_in(cwd, args) -> int:
    """train.py's main(args), run in this process from the folder cwd."""
    import train
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return train.main([str(a) for a in args])
    finally:
        os.chdir(previous)


def train_here(args, cwd):
    """A training run through train.py's main() in this process (no second or two importing torch in
    a new one), for tests that read what it wrote; stdout and stderr are pytest's to capture. The
    command itself runs as a process in test_train.py, and under torchrun in test_distributed.py."""
    code = train_main_in(cwd, args)
    assert code == 0, f"train.py {' '.join(map(str, args))} exited with {code}"


def train_refusing(args, capsys, cwd):
    """train.py's main(args) in this process, for a command that must stop before training (an
    option, a data set or a checkpoint it refuses): what it printed and its exit code, as run_train
    returns them, without the second or two a fresh process spends importing torch."""
    code = train_main_in(cwd, args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def torchrun(nproc, *extra):
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *extra]


def tiny_args(data_dir, out_dir, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *extra]


def records(out_dir, kind) -> list:
    lines = (Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train_losses(out_dir) -> dict:
    """{step: loss} of the training lines in out_dir/log.jsonl (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in records(out_dir, "train")}


def weights(out_dir, name="ckpt.pt") -> dict:
    return torch.load(Path(out_dir) / name, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different}"


def assert_one_line_error(result, *fragments):
    """The process failed with exit code 1 and a single `error: ...` line holding every fragment."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ references computed by hand
# Second implementations of what the scripts report, written from the spec and reading the data
# files directly: tests compare the scripts' numbers with these, never with the functions the
# scripts call.

def load_meta_json(folder) -> dict:
    return json.loads((Path(folder) / "meta.json").read_text())


def split_tokens(folder, split) -> torch.Tensor:
    """A split's token ids (1-D int64) as prepare.py wrote them: a flat little-endian stream."""
    import numpy as np
    meta = load_meta_json(folder)
    ids = np.fromfile(Path(folder) / f"{split}.bin",
                      dtype=np.dtype(meta["dtype"]).newbyteorder("<"))
    return torch.from_numpy(ids.astype(np.int64))


@torch.no_grad()
def full_split_loss_by_hand(model, folder, split="val", block_size=None):
    """(mean cross-entropy per scored token, tokens scored) over a whole split: for text, windows of
    block_size tokens side by side from the start (a last window without a next token is left out);
    for a task, every example with the loss on its answer (the tokens after prompt_len) only."""
    model.eval()
    meta, tokens = load_meta_json(folder), split_tokens(folder, split)
    if meta.get("task"):
        examples = tokens.view(-1, meta["example_len"])
        logits = model(examples[:, :-1], examples[:, 1:])[0]
        answer_logits = logits[:, meta["prompt_len"] - 1:]  # position t predicts token t + 1
        answers = examples[:, meta["prompt_len"]:]
        losses = F.cross_entropy(answer_logits.flatten(0, 1).float(), answers.flatten(),
                                 reduction="none")
        return losses.mean().item(), losses.numel()
    block = block_size or model.config.block_size
    n_windows = (len(tokens) - 1) // block
    x = tokens[:n_windows * block].view(n_windows, block)
    y = tokens[1:n_windows * block + 1].view(n_windows, block)
    losses = torch.cat([F.cross_entropy(model(xb, yb)[0].flatten(0, 1).float(), yb.flatten(),
                                        reduction="none")
                        for xb, yb in zip(x.split(64), y.split(64))])
    return losses.mean().item(), losses.numel()


@torch.no_grad()
def exact_match_by_hand(model, folder, split="val"):
    """Share of a task split's examples whose answer greedy decoding (a full forward pass per token,
    no cache) writes exactly."""
    model.eval()
    meta = load_meta_json(folder)
    examples = split_tokens(folder, split).view(-1, meta["example_len"])
    seq = examples[:, :meta["prompt_len"]]
    while seq.size(1) < examples.size(1):
        logits = model(seq, torch.zeros_like(seq))[0][:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return (seq == examples).all(dim=1).float().mean().item()


@torch.no_grad()
def greedy_by_hand(model, idx, steps, sinks=0):
    """Greedy decoding by a full forward pass for every token, over the window generation documents:
    the last block_size tokens at first; once full, with sinks=0 the window restarts from the last
    block_size // 2 tokens and slides on from there; with sinks=N it is the first N tokens and the
    latest block_size - N."""
    block = model.config.block_size
    start = max(0, idx.size(1) - block)
    for _ in range(steps):
        if sinks:
            latest = idx[:, idx.size(1) - block + sinks:]
            window = idx if idx.size(1) <= block else torch.cat([idx[:, :sinks], latest], 1)
        else:
            if idx.size(1) - start > block:
                start = idx.size(1) - block // 2
            window = idx[:, start:]
        logits = model(window, torch.zeros_like(window))[0][:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.fixture(scope="session")
def reverse_run(data_dir, tmp_path_factory):
    """(out_dir, stdout) of configs/reverse.py as written (300 steps), trained once for every test
    that needs a model that solves a task; copy its files before changing anything."""
    out = tmp_path_factory.mktemp("reverse")
    result = run_train(["configs/reverse.py", f"--data_dir={data_dir}", f"--out_dir={out}"])
    return out, result.stdout
