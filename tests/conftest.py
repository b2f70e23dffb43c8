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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from model import GPT, GPTConfig  # noqa: E402
from tinygpt.datasets import prepare  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
if (SHARED_DATA / "tiktoken_cache").is_dir():  # GPT-2 BPE without a network (CI sets it too)
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED_DATA / "tiktoken_cache"))
# One thread per process: the same arithmetic in every run (bitwise comparisons rely on it), and
# several test processes can share two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=8", "--dtype=float32",
        "--eval_iters=2", "--log_interval=1", "--device=cpu", "--warmup_iters=5", "--learning_rate=3e-3"]


def tiny_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    args = dict(block_size=16, vocab_size=20, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**args, **overrides})).eval()


def tiny_hf_gpt2(folder, seed=0, **overrides):
    """A tiny random GPT-2 from transformers (a test-only dependency), saved to folder with save_pretrained.
    Its weights are drawn wider than GPT-2's init (std 0.3, not 0.02) so that every part of the network,
    the GELU's curve included, moves the logits by more than the tolerance tests compare them to."""
    from transformers import GPT2Config, GPT2LMHeadModel  # slow to import: only the tests that use it
    torch.manual_seed(seed)
    config = GPT2Config(**{"vocab_size": 50, "n_positions": 32, "n_embd": 32, "n_layer": 2, "n_head": 4,
                           "initializer_range": 0.3, **overrides})
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def tiny_text(n_lines=1500, seed=0) -> str:
    """Text with learnable structure: short sentences from a small vocabulary."""
    rng = random.Random(seed)
    subjects, verbs = ["the cat", "a dog", "my friend", "the king"], ["sees", "likes", "eats"]
    objects = ["the fish.", "a hat.", "bread.", "the moon."]
    return "".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}\n" for _ in range(n_lines))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A data folder with the text data set 'tiny' and the 'reverse' task, built by prepare.py."""
    root = tmp_path_factory.mktemp("data")
    source = root / "tiny.txt"
    source.write_text(tiny_text())
    prepare("tiny", source=source, data_dir=root)
    prepare("reverse", data_dir=root)
    return root


def run_script(script, args, cwd=REPO, check=True, timeout=300, stdin=None, launcher=None, env=None):
    """Run one of the repo's scripts (by default with this Python, with ENV plus env) and return the finished process.
    A tool ('tools/evaluate.py') runs as the README runs it, `python -m tools.evaluate`, with the repo on the path."""
    target = ["-m", script.removesuffix(".py").replace("/", ".")] if script.startswith("tools/") else [str(REPO / script)]
    command = (launcher or [sys.executable]) + [*target, *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env={**ENV, "PYTHONPATH": str(REPO), **(env or {})},
                            capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def run_train(args, cwd=REPO, check=True, timeout=300):
    return run_script("train.py", args, cwd, check, timeout)


def torchrun(nproc, *extra):
    return ["torchrun", "--standalone", f"--nproc_per_node={nproc}", *extra]


def tiny_args(data_dir, out_dir, *extra):
    return [*TINY, f"--data_dir={data_dir}", "--dataset=tiny", f"--out_dir={out_dir}", *extra]


def records(out_dir, kind) -> list:
    return [r for r in map(json.loads, (Path(out_dir) / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


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
