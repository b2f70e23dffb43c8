"""prepare.py as a specification: verified downloads that leave nothing half-written, tokenizers
that round-trip, the data sets' documented sizes, no-op re-runs, and the attention tasks."""
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED_DATA as SHARED  # noqa: E402

SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
TINYTALKS = SHARED / "tinytalks"
TIKTOKEN_CACHE = SHARED / "tiktoken_cache"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(TIKTOKEN_CACHE))  # before tiktoken is first used

import prepare as cli  # noqa: E402
import tinygpt.datasets as P  # noqa: E402
from tinygpt.checkpoint import check_vocabulary  # noqa: E402
from tinygpt.common import CheckpointError, DataError  # noqa: E402
from tinygpt.data import load_meta  # noqa: E402
from tinygpt.datasets import prepare  # noqa: E402
from tinygpt.tokenizer import ByteTokenizer, CharTokenizer, tokenizer_from_meta  # noqa: E402

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"no local copy at {SHAKESPEARE}")
needs_tinytalks = pytest.mark.skipif(not TINYTALKS.is_dir(), reason=f"no local copy at {TINYTALKS}")
needs_gpt2 = pytest.mark.skipif(not Path(os.environ["TIKTOKEN_CACHE_DIR"]).is_dir(),
                                reason="no tiktoken cache folder (TIKTOKEN_CACHE_DIR)")

SMALL = b"To be, or not to be, that is the question.\n" * 50
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()


# ------------------------------------------------------------------- a real HTTP server on 127.0.0.1

class Handler(http.server.BaseHTTPRequestHandler):
    """/small.txt, /input.txt (TinyShakespeare), /tinytalks/splits/*.txt, and broken answers:
    /error (500), /blank (empty), /short (promises more bytes than it sends, then hangs up)."""

    def do_GET(self):
        self.server.hits.append(self.path)
        if self.path == "/error":
            return self.send_error(500)
        if self.path == "/short":
            return self.reply(SMALL[:100], length=len(SMALL))
        body = self.server.files.get(self.path)
        if body is None:
            return self.send_error(404)
        self.reply(body() if callable(body) else body)

    def reply(self, body, length=None):
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    files = {"/small.txt": SMALL, "/blank": b"", "/input.txt": SHAKESPEARE.read_bytes}
    for split in ("train", "val", "test"):
        files[f"/tinytalks/splits/{split}.txt"] = (TINYTALKS / "splits" / f"{split}.txt").read_bytes
        files[f"/tampered/tinytalks/splits/{split}.txt"] = lambda split=split: tampered(TINYTALKS / "splits" / f"{split}.txt")
    files["/tampered/input.txt"] = lambda: tampered(SHAKESPEARE)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.hits = files, []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def tampered(path) -> bytes:
    """The file with one character changed in its middle: same size, another sha256."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 1
    return bytes(data)


def files_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------- downloads

def test_download_writes_the_verified_file_and_does_not_fetch_it_again(server, tmp_path):
    dest = tmp_path / "d" / "small.txt"
    assert P.download(f"{server.url}/small.txt", dest, SMALL_SHA) == dest
    assert dest.read_bytes() == SMALL and files_under(tmp_path) == ["d/small.txt"]
    hits = len(server.hits)
    P.download(f"{server.url}/small.txt", dest, SMALL_SHA)
    assert len(server.hits) == hits


@needs_shakespeare
def test_shakespeare_char_downloads_into_its_data_folder(server, tmp_path):
    out = prepare("shakespeare_char", source=f"{server.url}/input.txt", data_dir=tmp_path)
    assert out == tmp_path / "shakespeare_char"
    assert files_under(out) == ["input.txt", "meta.json", "train.bin", "val.bin"]
    assert P.sha256_of(out / "input.txt") == P.TINYSHAKESPEARE[0].sha256
    meta = load_meta(out)
    assert (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"]) == (65, 1_003_854, 111_540)
    assert meta["source_url"] == f"{server.url}/input.txt"


@pytest.mark.parametrize("path, sha, message", [
    ("/small.txt", "0" * 64, "sha256 mismatch"),
    ("/error", None, "HTTP 500"),
    ("/short", None, "truncated"),
    ("/blank", None, "empty"),
    ("/missing", None, "HTTP 404"),
])
def test_failed_download_says_why_and_leaves_no_file(server, tmp_path, path, sha, message):
    with pytest.raises(DataError, match=message):
        P.download(f"{server.url}{path}", tmp_path / "input.txt", sha)
    assert files_under(tmp_path) == []


def test_server_errors_are_retried_but_a_bad_checksum_is_not(server, tmp_path):
    for path, attempts in (("/error", P.RETRIES), ("/small.txt", 1)):
        server.hits.clear()
        with pytest.raises(DataError):
            P.download(f"{server.url}{path}", tmp_path / "x.txt", "0" * 64)
        assert server.hits == [path] * attempts


@needs_shakespeare
@needs_tinytalks
@pytest.mark.parametrize("name, path", [("shakespeare_char", "/tampered/input.txt"), ("tinytalks", "/tampered/tinytalks")])
def test_a_tampered_copy_of_a_pinned_file_is_refused_in_one_line_with_nothing_saved(server, tmp_path, capsys, name, path):
    code = cli.main([name, f"--source={server.url}{path}", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: sha256 mismatch"), err
    assert f"{server.url}{path}" in err and "nothing was saved" in err
    assert files_under(tmp_path) == []


def test_connection_refused_names_the_url_and_the_source_way_out(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/input.txt"
    with pytest.raises(DataError, match="refused") as err:
        P.download(url, tmp_path / "input.txt", SMALL_SHA)
    assert url in str(err.value) and "--source" in str(err.value) and "\n" not in str(err.value)
    assert files_under(tmp_path) == []


def test_a_local_source_that_is_not_tinyshakespeare_is_refused(tmp_path):
    fake = tmp_path / "fake.txt"
    fake.write_bytes(SMALL)
    with pytest.raises(DataError, match="not the pinned input.txt"):
        prepare("shakespeare_char", source=fake, data_dir=tmp_path / "data")
    assert files_under(tmp_path / "data") == []


# ------------------------------------------------------------------------ tokenizers and data sets

def test_char_tokenizer_round_trips_and_names_an_unknown_character():
    tok = CharTokenizer(sorted(set("hello world\n")))
    assert tok.decode(tok.encode("hello\nworld")) == "hello\nworld"
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("hello Zed")


def test_byte_tokenizer_round_trips_any_text_and_holds_back_a_cut_character():
    tok = ByteTokenizer()
    text = "Q: Ünïcode, emoji \U0001F600 and\r\n tabs\t?"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half of a two-byte character: not yet text
    with pytest.raises(ValueError, match="256"):
        tok.decode([256])


@needs_shakespeare
@needs_tinytalks
def test_byte_data_sets_share_one_vocabulary_so_one_fine_tunes_on_the_other(tmp_path):
    """The joint vocabulary: a model pretrained on shakespeare_byte can be fine-tuned on tinytalks_byte,
    while the character data sets (65 and 68 characters, each its own order) refuse each other."""
    shakespeare = load_meta(prepare("shakespeare_byte", source=SHAKESPEARE, data_dir=tmp_path))
    tinytalks = load_meta(prepare("tinytalks_byte", source=TINYTALKS, data_dir=tmp_path))
    for meta, text in ((shakespeare, SHAKESPEARE.read_text()),
                       (tinytalks, (TINYTALKS / "splits" / "train.txt").read_text())):
        assert (meta["tokenizer"], meta["vocab_size"]) == ("byte", 256)
        train = np.fromfile(tmp_path / meta["inputs"]["dataset"] / "train.bin", dtype="<u2")
        assert tokenizer_from_meta(meta).decode(train) == text[:len(train)]
    assert (tmp_path / "tinytalks_byte" / tinytalks["test_file"]).is_file()
    check_vocabulary(shakespeare, 256, tinytalks, "out-pretrain")  # no error: the same 256 bytes
    char_shakespeare = load_meta(prepare("shakespeare_char", source=SHAKESPEARE, data_dir=tmp_path))
    char_tinytalks = load_meta(prepare("tinytalks", source=TINYTALKS, data_dir=tmp_path))
    with pytest.raises(CheckpointError, match="another character vocabulary"):
        check_vocabulary(char_shakespeare, 65, char_tinytalks, "out-pretrain")
    with pytest.raises(CheckpointError, match="reads char tokens"):
        check_vocabulary(char_shakespeare, 65, tinytalks, "out-pretrain")


def test_text_dataset_round_trips_its_bins(tmp_path):
    text = "Ünïcode lines,\r\nwindows endings and tabs\t" * 40
    src = tmp_path / "my.txt"
    src.write_bytes(text.encode("utf-8"))
    out = prepare("mine", source=src, data_dir=tmp_path / "data")
    meta = load_meta(out)
    tok = tokenizer_from_meta(meta)
    n = int(len(text) * 0.9)
    train = np.fromfile(out / "train.bin", dtype="<u2")
    val = np.fromfile(out / "val.bin", dtype="<u2")
    assert (meta["vocab_size"], len(train), len(val)) == (len(set(text)), n, len(text) - n)
    assert tok.decode(train) + tok.decode(val) == text
    with pytest.raises(ValueError, match="'Ω'"):
        tok.encode("Ω")


def test_text_from_a_url_is_downloaded_to_its_data_folder(server, tmp_path):
    out = prepare("small", source=f"{server.url}/small.txt", data_dir=tmp_path)
    assert (out / "input.txt").read_bytes() == SMALL
    assert load_meta(out)["source_sha256"] == SMALL_SHA


@needs_shakespeare
def test_shakespeare_char_matches_nanogpt_and_round_trips(tmp_path):
    out = prepare("shakespeare_char", source=SHAKESPEARE, data_dir=tmp_path)
    meta, text = load_meta(out), SHAKESPEARE.read_text()
    assert files_under(out) == ["meta.json", "train.bin", "val.bin"]  # a local source is not copied
    assert (meta["vocab_size"], meta["dtype"]) == (65, "uint16")
    train = np.fromfile(out / "train.bin", dtype="<u2")
    val = np.fromfile(out / "val.bin", dtype="<u2")
    assert (len(train), len(val)) == (1_003_854, 111_540)
    tok = tokenizer_from_meta(meta)
    assert tok.decode(train) + tok.decode(val) == text


@needs_shakespeare
@needs_gpt2
def test_shakespeare_gpt2_bins_decode_to_the_90_10_split(tmp_path):
    out = prepare("shakespeare", source=SHAKESPEARE.parent, data_dir=tmp_path)
    meta, text = load_meta(out), SHAKESPEARE.read_text()
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    tok = tokenizer_from_meta(meta)
    n = int(len(text) * 0.9)
    assert tok.decode(np.fromfile(out / "train.bin", dtype="<u2")) == text[:n]
    assert tok.decode(np.fromfile(out / "val.bin", dtype="<u2")) == text[n:]
    assert tok.decode(tok.encode("O Romeo, Romeo! <|endoftext|>")) == "O Romeo, Romeo! <|endoftext|>"


@needs_tinytalks
def test_tinytalks_keeps_its_splits_and_holds_out_test(server, tmp_path):
    out = prepare("tinytalks", source=f"{server.url}/tinytalks", data_dir=tmp_path)
    meta, tok = load_meta(out), tokenizer_from_meta(load_meta(out))
    splits = TINYTALKS / "splits"
    assert meta["vocab_size"] == len(set((splits / "train.txt").read_text()
                                                                + (splits / "val.txt").read_text()))
    for split, bin_name in (("train", "train.bin"), ("val", "val.bin")):
        assert tok.decode(np.fromfile(out / bin_name, dtype="<u2")) == (splits / f"{split}.txt").read_text()
    assert (out / meta["test_file"]).read_bytes() == (splits / "test.txt").read_bytes()
    local = prepare("tinytalks", source=TINYTALKS, data_dir=tmp_path / "local")
    assert (local / "train.bin").read_bytes() == (out / "train.bin").read_bytes()


def test_rerun_is_a_no_op_until_an_input_changes(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 20)
    out = prepare("a", source=src, data_dir=tmp_path)
    stamps = [(p, p.stat().st_mtime_ns) for p in out.iterdir()]
    prepare("a", source=src, data_dir=tmp_path)
    assert "already prepared" in capsys.readouterr().out
    assert [(p, p.stat().st_mtime_ns) for p in out.iterdir()] == stamps
    src.write_text("abcdefghijk" * 20)
    prepare("a", source=src, data_dir=tmp_path)
    assert "already prepared" not in capsys.readouterr().out
    assert load_meta(out)["vocab_size"] == 11


def test_a_half_written_data_set_is_rebuilt(tmp_path, capsys):
    out = prepare("copy", data_dir=tmp_path)
    good = (out / "val.bin").read_bytes()
    (out / "val.bin").write_bytes(good[:10])
    prepare("copy", data_dir=tmp_path)
    assert "already prepared" not in capsys.readouterr().out
    assert (out / "val.bin").read_bytes() == good


# ------------------------------------------------------------------------------- attention tasks

def task_examples(out, split):
    meta = load_meta(out)
    text = tokenizer_from_meta(meta).decode(np.fromfile(out / f"{split}.bin", dtype="<u2"))
    n = meta["example_len"]
    return [text[i:i + n] for i in range(0, len(text), n)]


@pytest.mark.parametrize("task, n_train, n_test, prompt_len", [
    ("reverse", 600, 200, 7), ("copy", 600, 200, 7), ("mixed", 800, 300, 8)])
def test_task_answers_are_right_and_test_prompts_are_unseen(tmp_path, task, n_train, n_test, prompt_len):
    out = prepare(task, data_dir=tmp_path)
    meta = load_meta(out)
    assert (meta["train_examples"], meta["val_examples"]) == (n_train, n_test)
    assert (meta["prompt_len"], meta["example_len"]) == (prompt_len, prompt_len + 6)
    train, test = task_examples(out, "train"), task_examples(out, "val")
    assert (len(train), len(test)) == (n_train, n_test)
    for example in train + test:
        prompt, answer = example[:prompt_len], example[prompt_len:]
        op = {"reverse": "r", "copy": "c"}.get(task) or prompt[0]
        letters = prompt[-7:-1]
        assert prompt[-1] == "=" and letters.isalpha() and letters.isupper()
        assert answer == (letters[::-1] if op == "r" else letters)
    prompts = lambda examples: {e[:prompt_len] for e in examples}  # noqa: E731
    assert len(prompts(train)) == n_train and len(prompts(test)) == n_test
    assert not prompts(train) & prompts(test)
    if task == "mixed":
        for examples in (train, test):
            assert sum(e[0] == "r" for e in examples) == sum(e[0] == "c" for e in examples)


def test_same_seed_same_data_and_another_seed_other_data(tmp_path):
    a = prepare("mixed", data_dir=tmp_path / "a", seed=7)
    b = prepare("mixed", data_dir=tmp_path / "b", seed=7)
    c = prepare("mixed", data_dir=tmp_path / "c", seed=8)
    assert (a / "train.bin").read_bytes() == (b / "train.bin").read_bytes()
    assert (a / "train.bin").read_bytes() != (c / "train.bin").read_bytes()
    assert load_meta(a)["vocab"] == load_meta(c)["vocab"]  # fixed alphabet, not taken from the data
    assert load_meta(c)["seed"] == 8


# ------------------------------------------------------------------------------------------ CLI

def test_cli_prints_a_one_line_error_and_exits_1(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "prepare.py"), "shakespeare_char", f"--source={tmp_path / 'nope.txt'}",
         f"--data_dir={tmp_path}"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "nope.txt" in result.stderr and "Traceback" not in result.stderr


def test_cli_builds_a_task(tmp_path, capsys):
    assert cli.main(["reverse", "--seed=3", f"--data_dir={tmp_path}"]) == 0
    assert "600 train / 200 test" in capsys.readouterr().out
    assert json.loads((tmp_path / "reverse" / "meta.json").read_text())["seed"] == 3


def test_cli_builds_your_own_text_and_refuses_an_unknown_name_without_source(tmp_path, capsys):
    src = tmp_path / "book.txt"
    src.write_text("a small book of text\n" * 30)
    assert cli.main(["book", f"--source={src}", f"--data_dir={tmp_path}"]) == 0
    assert load_meta(tmp_path / "book")["inputs"]["dataset"] == "text"
    assert cli.main(["nobook", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python prepare.py nobook --source=" in err
