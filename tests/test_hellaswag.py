"""HellaSwag as a specification: examples the tests write, scored as build-nanogpt scores them (the
loss over each ending's tokens after the context; acc by the summed loss, acc_norm by the mean), the
same endings as transformers' GPT-2 picks with the same weights, and a verified download from a real
server."""

import http.server
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tinygpt.hellaswag as H
from conftest import REPO, assert_one_line_error, run_script, tiny_hf_gpt2, tiny_model
from tinygpt.checkpoint import load_weights
from tinygpt.common import DataError
from tinygpt.tokenizer import ByteTokenizer, GPT2Tokenizer
from tools.evaluate import main as evaluate_main

needs_gpt2 = pytest.mark.skipif(
    not Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")).is_dir(),
    reason="no tiktoken cache folder (TIKTOKEN_CACHE_DIR)",
)
WORDS = "the man woman dog runs jumps into water ball kitchen cuts tomato then puts it away".split()


def write_examples(path, n=24, seed=0):
    """n HellaSwag-shaped examples: contexts and endings of different lengths, random labels."""
    rng = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            endings = [sentence(1, 9) + "." for _ in range(4)]
            f.write(
                json.dumps(
                    {
                        "ind": i,
                        "ctx": sentence(4, 16),
                        "endings": endings,
                        "label": rng.randrange(4),
                    }
                )
                + "\n"
            )
    return path


def picks_by_hand(logits_of, tokenizer, examples):
    """[(ending of least summed loss, of least mean loss)] for each example, one forward pass per
    ending: the ending's tokens after the context, each predicted from the tokens before it."""
    picks = []
    for context, endings, _ in examples:
        sums, means = [], []
        for ending in endings:
            ctx_ids, end_ids = tokenizer.encode(context), tokenizer.encode(" " + ending)
            ids = torch.tensor([ctx_ids + end_ids])
            logits = logits_of(ids)[0, len(ctx_ids) - 1 : -1]
            losses = F.cross_entropy(logits.float(), torch.tensor(end_ids), reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        picks.append((min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)))
    return picks


def test_scores_are_the_shares_of_examples_whose_least_loss_ending_is_the_label(tmp_path):
    examples = H.hellaswag_examples(write_examples(tmp_path / "hs.jsonl"))
    model = tiny_model(vocab_size=256, block_size=256, n_embd=32)
    with torch.no_grad():
        for p in model.parameters():  # scaled up: a random model's near-uniform losses would tie
            p.mul_(3)
    tokenizer = ByteTokenizer()
    picks = picks_by_hand(lambda ids: model(ids, ids)[0], tokenizer, examples)
    labels = [label for _, _, label in examples]
    assert len({p for p, _ in picks}) > 1 and any(
        a != b for a, b in picks
    )  # premise: sum and mean disagree somewhere
    scores = H.hellaswag_score(model, tokenizer, examples, "cpu")
    assert scores["examples"] == len(examples)
    assert scores["acc"] == sum(p == label for (p, _), label in zip(picks, labels)) / len(examples)
    assert scores["acc_norm"] == sum(p == label for (_, p), label in zip(picks, labels)) / len(
        examples
    )
    # every example labelled with its own pick: a scorer that mixed up examples would not reach 1
    relabelled = [(c, e, p) for (c, e, _), (_, p) in zip(examples, picks)]
    assert H.hellaswag_score(model, tokenizer, relabelled, "cpu")["acc_norm"] == 1.0


def test_a_context_longer_than_the_window_loses_its_start_not_the_ending():
    rows = H.example_rows(ByteTokenizer(), ("x" * 50, ["abc", "de", "f", "ghij"], 0), block_size=16)
    for (ids, start), ending in zip(rows, ["abc", "de", "f", "ghij"]):
        assert len(ids) == 16 and bytes(ids[start:]).decode() == " " + ending


@needs_gpt2
def test_our_gpt2_picks_the_same_endings_as_transformers_gpt2_with_the_same_weights(
    tmp_path, capsys
):
    hf = tiny_hf_gpt2(tmp_path / "hf", vocab_size=50257, n_positions=64)
    source = write_examples(tmp_path / "hs.jsonl", n=16)
    examples = H.hellaswag_examples(source)
    expected = picks_by_hand(lambda ids: hf(ids).logits, GPT2Tokenizer(), examples)
    assert len({p for p, _ in expected}) > 1 and any(
        a != b for a, b in expected
    )  # premise: the choices vary
    weights = load_weights(tmp_path / "hf")
    from tinygpt.checkpoint import ready_for_inference

    model, tokenizer, _ = ready_for_inference(weights, "cpu", "float32")
    for example, pick in zip(examples, expected):
        losses = H.ending_losses(model, H.example_rows(tokenizer, example, 64), "cpu")
        assert tuple(losses.argmin(dim=0).tolist()) == pick

    labels = [label for _, _, label in examples]
    assert (
        evaluate_main(
            [
                "--task=hellaswag",
                f"--init_from={tmp_path / 'hf'}",
                f"--source={source}",
                "--device=cpu",
                "--dtype=float32",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    acc = sum(p == label for (p, _), label in zip(expected, labels)) / len(labels)
    acc_norm = sum(p == label for (_, p), label in zip(expected, labels)) / len(labels)
    assert f"hellaswag (16 examples): acc {acc:.4f}, acc_norm {acc_norm:.4f}" in out
    assert "(not the pinned file)" in out


def test_the_command_scores_a_checkpoint_with_a_limit_and_a_progress_line(
    tmp_path, monkeypatch, capsys
):
    from dataclasses import asdict

    from tinygpt.checkpoint import save_checkpoint

    model = tiny_model(vocab_size=256, block_size=64)
    (tmp_path / "run").mkdir()
    save_checkpoint(
        tmp_path / "run" / "ckpt.pt",
        {
            "model": model.state_dict(),
            "model_args": asdict(model.config),
            "step": 1,
            "config": {},
            "meta": {"tokenizer": "byte"},
        },
    )
    source = write_examples(tmp_path / "hs.jsonl")
    monkeypatch.setattr(H, "PROGRESS_S", 0.0)  # a line after every pass
    monkeypatch.setattr("tinygpt.hellaswag.rows_within", lambda *args: 8)  # two examples a pass
    assert (
        evaluate_main(
            [
                "--task=hellaswag",
                f"--out_dir={tmp_path / 'run'}",
                f"--source={source}",
                "--limit=10",
                "--device=cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    expected = H.hellaswag_score(
        model, ByteTokenizer(), H.hellaswag_examples(source, limit=10), "cpu", progress=False
    )
    assert "hellaswag: 10 examples of" in out and "hellaswag 2/10 examples, acc_norm so far" in out
    assert f"acc {expected['acc']:.4f}, acc_norm {expected['acc_norm']:.4f}" in out


def test_what_the_command_refuses_it_refuses_in_one_line(tmp_path, data_dir):
    from dataclasses import asdict

    from tinygpt.checkpoint import save_checkpoint

    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 1}) + '\n{"ctx": 3}\n'
    )
    with pytest.raises(DataError, match="line 2 is not a HellaSwag example"):
        H.hellaswag_examples(bad)
    char = tiny_model(vocab_size=4, block_size=32)
    (tmp_path / "char").mkdir()
    save_checkpoint(
        tmp_path / "char" / "ckpt.pt",
        {
            "model": char.state_dict(),
            "model_args": asdict(char.config),
            "step": 1,
            "config": {},
            "meta": {"tokenizer": "char", "vocab": list("abc ")},
        },
    )
    source = write_examples(tmp_path / "hs.jsonl")
    result = run_script(
        "tools/evaluate.py",
        [
            "--task=hellaswag",
            f"--out_dir={tmp_path / 'char'}",
            f"--source={source}",
            "--device=cpu",
        ],
        check=False,
    )
    assert_one_line_error(result, "cannot read HellaSwag", "byte, gpt2 or bpe")
    result = run_script(
        "tools/evaluate.py", [f"--out_dir={tmp_path / 'char'}", "--limit=5"], check=False
    )
    assert_one_line_error(result, "go with --task=hellaswag")


# ------------------------------------------------------------------------ the pinned download


class Files(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits.append(self.path)
        body = self.server.files.get(self.path)
        if body is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    httpd.files, httpd.hits = (
        {"/hs.jsonl": write_examples(tmp_path / "served.jsonl").read_bytes()},
        [],
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_the_blob_id_is_what_git_computes(tmp_path):
    path = write_examples(tmp_path / "hs.jsonl")
    git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True)
    if git.returncode != 0:
        pytest.skip("no git here")
    assert H.git_blob_id(path) == git.stdout.strip()


def test_the_download_is_checked_against_its_pin_and_kept_once_it_matches(server, tmp_path):
    url, pin = f"{server.url}/hs.jsonl", H.git_blob_id(tmp_path / "served.jsonl")
    data = tmp_path / "data"
    with pytest.raises(
        DataError, match="is not the pinned HellaSwag validation file.*nothing was saved"
    ):
        H.hellaswag_file("", data, url=url, blob="0" * 40)
    assert list((data / "hellaswag").iterdir()) == []
    path = H.hellaswag_file("", data, url=url, blob=pin)
    assert (
        path == data / "hellaswag" / "hellaswag_val.jsonl"
        and path.read_bytes() == server.files["/hs.jsonl"]
    )
    hits = len(server.hits)
    assert (
        H.hellaswag_file("", data, url=url, blob=pin) == path and len(server.hits) == hits
    )  # not fetched again


def test_a_source_url_is_held_to_the_real_pin_by_the_command(server, tmp_path):
    result = run_script(
        "tools/evaluate.py",
        [
            "--task=hellaswag",
            "--init_from=nothing",
            f"--data_dir={tmp_path}",
            f"--source={server.url}/hs.jsonl",
        ],
        check=False,
        cwd=REPO,
    )
    assert_one_line_error(result, "is not the pinned HellaSwag validation file", H.GIT_BLOB)
    assert not (tmp_path / "hellaswag" / "hellaswag_val.jsonl").exists()


def test_a_run_with_hellaswag_interval_logs_the_score_of_its_weights(tmp_path, data_dir,
                                                                     monkeypatch):
    """--hellaswag_interval=N scores the validation set at evaluations every N steps and logs it;
    the logged score is the one the scorer gives the saved weights. The download is tested
    above: here the file the test writes stands in for it."""
    from conftest import records, tiny_args, tiny_text, train_here
    from tinygpt.checkpoint import load_checkpoint, model_from_checkpoint
    from tinygpt.datasets import prepare
    (tmp_path / "text.txt").write_text(tiny_text())
    prepare("tinybytes", source=tmp_path / "text.txt", data_dir=tmp_path, tokenizer="byte")
    examples = write_examples(tmp_path / "hs.jsonl", n=12)
    monkeypatch.setattr(H, "hellaswag_file", lambda source, data_dir: examples)
    out = tmp_path / "out"
    args = tiny_args(data_dir, out, "--max_iters=6", "--eval_interval=3", "--hellaswag_interval=6")
    train_here([*args, f"--data_dir={tmp_path}", "--dataset=tinybytes"], tmp_path)
    first, logged = records(out, "hellaswag")  # the untrained model's, then step 6's
    assert (first["step"], logged["step"], logged["examples"]) == (0, 6, 12)
    model = model_from_checkpoint(load_checkpoint(out / "ckpt.pt"))
    expected = H.hellaswag_score(model, ByteTokenizer(), H.hellaswag_examples(examples), "cpu")
    assert (logged["acc"], logged["acc_norm"]) == (expected["acc"], expected["acc_norm"])
