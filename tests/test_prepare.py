"""prepare.py as a specification: verified downloads that leave nothing half-written, tokenizers
that round-trip, the data sets' documented sizes, no-op re-runs, and the attention tasks."""
import hashlib
import http.server
import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, needs_gpt2_bpe  # noqa: E402
from conftest import SHARED_DATA as SHARED

SHAKESPEARE = SHARED / "tinyshakespeare" / "input.txt"
TINYTALKS = SHARED / "tinytalks"

import prepare as cli  # noqa: E402
import tinygpt.datasets as P  # noqa: E402
import tinygpt.download as D  # noqa: E402
from tinygpt.checkpoint import check_vocabulary  # noqa: E402
from tinygpt.common import CheckpointError, DataError  # noqa: E402
from tinygpt.data import load_meta  # noqa: E402
from tinygpt.datasets import prepare  # noqa: E402
from tinygpt.tokenizer import ByteTokenizer, CharTokenizer, tokenizer_from_meta  # noqa: E402

needs_shakespeare = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"no local copy at {SHAKESPEARE}")
needs_tinytalks = pytest.mark.skipif(not TINYTALKS.is_dir(), reason=f"no local copy at {TINYTALKS}")

SMALL = b"To be, or not to be, that is the question.\n" * 50
SMALL_SHA = hashlib.sha256(SMALL).hexdigest()


# ------------------------------------------------------------------ a real HTTP server on 127.0.0.1

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
        original = TINYTALKS / "splits" / f"{split}.txt"
        files[f"/tampered/tinytalks/splits/{split}.txt"] = lambda path=original: tampered(path)
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


# ---------------------------------------------------------------------------------------- downloads

def test_download_writes_the_verified_file_and_does_not_fetch_it_again(server, tmp_path):
    dest = tmp_path / "d" / "small.txt"
    assert D.download(f"{server.url}/small.txt", dest, SMALL_SHA) == dest
    assert dest.read_bytes() == SMALL and files_under(tmp_path) == ["d/small.txt"]
    hits = len(server.hits)
    D.download(f"{server.url}/small.txt", dest, SMALL_SHA)
    assert len(server.hits) == hits


@needs_shakespeare
def test_shakespeare_char_downloads_into_its_data_folder(server, tmp_path):
    out = prepare("shakespeare_char", source=f"{server.url}/input.txt", data_dir=tmp_path)
    assert out == tmp_path / "shakespeare_char"
    assert files_under(out) == ["input.txt", "meta.json", "train.bin", "val.bin"]
    assert D.sha256_of(out / "input.txt") == P.TINYSHAKESPEARE[0].sha256
    meta = load_meta(out)
    sizes = (meta["vocab_size"], meta["train_tokens"], meta["val_tokens"])
    assert sizes == (65, 1_003_854, 111_540)
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
        D.download(f"{server.url}{path}", tmp_path / "input.txt", sha)
    assert files_under(tmp_path) == []


def test_server_errors_are_retried_but_a_bad_checksum_is_not(server, tmp_path):
    for path, attempts in (("/error", D.RETRIES), ("/small.txt", 1)):
        server.hits.clear()
        with pytest.raises(DataError):
            D.download(f"{server.url}{path}", tmp_path / "x.txt", "0" * 64)
        assert server.hits == [path] * attempts


@needs_shakespeare
@needs_tinytalks
@pytest.mark.parametrize("name, path", [("shakespeare_char", "/tampered/input.txt"),
                                        ("tinytalks", "/tampered/tinytalks")])
def test_a_tampered_copy_of_a_pinned_file_is_refused_in_one_line_with_nothing_saved(
        server, tmp_path, capsys, name, path):
    code = cli.main([name, f"--source={server.url}{path}", f"--data_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: sha256 mismatch"), err
    assert f"{server.url}{path}" in err and "nothing was saved" in err
    assert files_under(tmp_path) == []


def test_connection_refused_names_the_url_and_the_source_way_out(tmp_path):
    url = f"http://127.0.0.1:{closed_port()}/input.txt"
    with pytest.raises(DataError, match="refused") as err:
        D.download(url, tmp_path / "input.txt", SMALL_SHA)
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
    """The joint vocabulary: a model pretrained on shakespeare_byte can be fine-tuned on
    tinytalks_byte, while the character data sets (65 and 68 characters, each its own order) refuse
    each other."""
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
@needs_gpt2_bpe
def test_shakespeare_gpt2_bins_decode_to_the_90_10_split(tmp_path):
    out = prepare("shakespeare", source=SHAKESPEARE.parent, data_dir=tmp_path)
    meta, text = load_meta(out), SHAKESPEARE.read_text()
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50257, "uint16")
    assert (out / "train.bin").stat().st_size == 2 * meta["train_tokens"]
    tok = tokenizer_from_meta(meta)
    n = int(len(text) * 0.9)
    assert tok.decode(np.fromfile(out / "train.bin", dtype="<u2")) == text[:n]
    assert tok.decode(np.fromfile(out / "val.bin", dtype="<u2")) == text[n:]
    line = "O Romeo, Romeo! <|endoftext|>"
    assert tok.decode(tok.encode(line)) == line


@needs_tinytalks
def test_tinytalks_keeps_its_splits_and_holds_out_test(server, tmp_path):
    out = prepare("tinytalks", source=f"{server.url}/tinytalks", data_dir=tmp_path)
    meta, tok = load_meta(out), tokenizer_from_meta(load_meta(out))
    splits = TINYTALKS / "splits"
    assert meta["vocab_size"] == len(set((splits / "train.txt").read_text()
                                                                + (splits / "val.txt").read_text()))
    for split, bin_name in (("train", "train.bin"), ("val", "val.bin")):
        ids = np.fromfile(out / bin_name, dtype="<u2")
        assert tok.decode(ids) == (splits / f"{split}.txt").read_text()
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
def test_task_answers_are_right_and_test_prompts_are_unseen(tmp_path, task, n_train, n_test,
                                                            prompt_len):
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
        [sys.executable, str(REPO / "prepare.py"), "shakespeare_char",
         f"--source={tmp_path / 'nope.txt'}", f"--data_dir={tmp_path}"],
        capture_output=True, text=True, timeout=60)
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


# -------------------------------------------------------------- the builders and their imports

def package_imports(path) -> set:
    """The tinygpt modules a file imports, at the top or inside a function."""
    import ast
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return {n for n in names if n.startswith("tinygpt.")}


def test_both_builders_download_through_one_module_and_never_import_each_other():
    package = REPO / "tinygpt"
    assert package_imports(package / "download.py") == {"tinygpt.common"}
    datasets, corpus = (package_imports(package / name) for name in ("datasets.py", "corpus.py"))
    assert "tinygpt.download" in datasets & corpus
    assert "tinygpt.corpus" not in datasets and "tinygpt.datasets" not in corpus


def test_datasets_knows_a_corpus_by_name_and_source_and_refuses_to_build_it_in_one_line(tmp_path):
    """Only prepare.py builds a corpus (hours, many processes): datasets.prepare, which train.py
    calls for a missing data set, names that command instead."""
    web = tmp_path / "web"
    web.mkdir()
    corpora = [("fineweb_edu", None), ("web", web), ("web", "dumps/*.jsonl"), ("web", "a.parquet")]
    others = [("shakespeare", web), ("book", "book.txt"), ("book", "https://x.org/web.parquet"),
              ("reverse", None)]
    assert [P.is_corpus(*case) for case in corpora + others] == [True] * 4 + [False] * 4
    for name, source, command in (("fineweb_edu", None, "python prepare.py fineweb_edu"),
                                  ("web", web, f"python prepare.py web --source={web}")):
        with pytest.raises(DataError) as err:
            prepare(name, source=source, data_dir=tmp_path / "data")
        assert str(err.value).endswith(command) and "\n" not in str(err.value)
    assert not (tmp_path / "data").exists()


def test_corpus_options_are_refused_for_a_small_data_set_and_a_tokenizer_for_a_corpus(tmp_path,
                                                                                       capsys):
    (tmp_path / "web").mkdir()
    for args, message in ((["reverse", "--workers=2"], "are for corpora"),
                          (["web", f"--source={tmp_path / 'web'}", "--tokenizer=char"],
                           "always tokenized by gpt2")):
        assert cli.main([*args, f"--data_dir={tmp_path / 'data'}"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
# ------------------------------------------------------------------------ a BPE of the data's own

MIXED = "Zoë's café: 3 × 4 = 12\r\n\ttabs,  two spaces, 😀 and 中文 too.\n\n"


def bpe_source(tmp_path, val_word="qxqxqx") -> Path:
    """Text whose last 10% (val) repeats a word that never occurs in the first 90% (train)."""
    from conftest import tiny_text

    train = tiny_text(900) + MIXED * 20
    val = f"{val_word} " * (len(train) // 9 // (len(val_word) + 1) + 1)
    path = tmp_path / "bpe.txt"
    path.write_text(train + val[: int(len(train) / 0.9) - len(train)], encoding="utf-8", newline="")
    return path


def test_a_bpe_learns_n_tokens_from_the_train_split_only_and_decodes_every_split_exactly(
    tmp_path, capsys
):
    from tinygpt.tokenizer import train_bpe

    source = bpe_source(tmp_path)
    assert (
        cli.main(["tinybpe", f"--source={source}", f"--data_dir={tmp_path}", "--tokenizer=bpe:300"])
        == 0
    )
    out, meta = tmp_path / "tinybpe", load_meta(tmp_path / "tinybpe")
    text = source.read_bytes().decode("utf-8")
    n = int(len(text) * 0.9)
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("bpe", 300, "uint16")
    assert (out / "tokenizer.json").read_text(encoding="utf-8") == meta[
        "bpe"
    ]  # the file and the checkpoint's copy
    tok = tokenizer_from_meta(meta)
    assert tok.decode(np.fromfile(out / "train.bin", dtype="<u2")) == text[:n]
    assert tok.decode(np.fromfile(out / "val.bin", dtype="<u2")) == text[n:]
    assert (
        tok.decode(tok.encode(MIXED + "ünseen wörds ✓")) == MIXED + "ünseen wörds ✓"
    )  # bytes: nothing is unknown
    learned = tok.tokenizer.get_vocab()
    assert not any("qx" in t for t in learned)  # val's word taught it nothing...
    assert any(
        "qx" in t for t in train_bpe(text, 300).tokenizer.get_vocab()
    )  # ...as the whole text would have
    printed = capsys.readouterr().out
    train_rate, val_rate = (meta[f"{s}_bytes"] / meta[f"{s}_tokens"] for s in ("train", "val"))
    assert (
        f"{train_rate:.2f} / {val_rate:.2f} bytes per token (train / val)" in printed
        and train_rate > 1.5
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bpe:256", "a BPE is bpe:N with N from 257"),
        ("bpe:65536", "to 65,535"),
        ("bpe:many", "a BPE is bpe:N"),
        ("bpe:5000", "enough different pairs for"),
    ],
)
def test_a_bpe_size_out_of_range_or_beyond_the_text_is_refused_in_one_line(tmp_path, spec, message):
    from conftest import assert_one_line_error, run_script

    source = tmp_path / "small.txt"
    source.write_bytes(SMALL)
    result = run_script(
        "prepare.py",
        ["mine", f"--source={source}", f"--data_dir={tmp_path}", f"--tokenizer={spec}"],
        check=False,
    )
    assert_one_line_error(result, message, spec if spec != "bpe:5000" else "use a smaller N")
    assert not (tmp_path / "mine" / "meta.json").exists()


@needs_shakespeare
def test_shakespeare_bpe_is_tinyshakespeare_in_a_bpe_of_its_own(tmp_path):
    out = prepare("shakespeare_bpe", source=SHAKESPEARE, data_dir=tmp_path, tokenizer="bpe:512")
    meta, text = load_meta(out), SHAKESPEARE.read_text()
    n = int(len(text) * 0.9)
    assert (meta["tokenizer"], meta["vocab_size"]) == ("bpe", 512)
    tok = tokenizer_from_meta(meta)
    assert tok.decode(np.fromfile(out / "val.bin", dtype="<u2")) == text[n:]
    with pytest.raises(DataError, match="always tokenized by bpe:2048"):
        prepare("shakespeare_bpe", source=SHAKESPEARE, data_dir=tmp_path, tokenizer="gpt2")


def test_a_checkpoint_meta_without_its_bpe_or_with_a_broken_one_is_refused():
    with pytest.raises(DataError, match='holds no "bpe" definition'):
        tokenizer_from_meta({"tokenizer": "bpe", "vocab_size": 300})
    with pytest.raises(DataError, match="cannot be read"):
        tokenizer_from_meta({"tokenizer": "bpe", "bpe": "{not json"})


# ------------------------------------------------------------------------------- bytes per split


@pytest.mark.parametrize("tokenizer", ["char", "byte", pytest.param("gpt2", marks=needs_gpt2_bpe),
                                       "bpe:300"])
def test_meta_counts_the_utf8_bytes_each_split_decodes_to(tmp_path, tokenizer):
    source = bpe_source(tmp_path)
    meta = load_meta(prepare("mine", source=source, data_dir=tmp_path, tokenizer=tokenizer))
    tok = tokenizer_from_meta(meta)
    for split in ("train", "val"):
        ids = np.fromfile(tmp_path / "mine" / f"{split}.bin", dtype="<u2")
        assert (
            meta[f"{split}_bytes"]
            == len(tok.decode(ids).encode("utf-8"))
            > meta[f"{split}_tokens"] * 0.99
        )
    assert (
        meta["train_bytes"] + meta["val_bytes"] == source.stat().st_size
    )  # multi-byte characters count as bytes


def test_a_task_and_a_qa_data_set_count_their_bytes_too(tmp_path):
    meta = load_meta(prepare("reverse", data_dir=tmp_path))
    assert (meta["train_bytes"], meta["val_bytes"]) == (
        600 * 13,
        200 * 13,
    )  # 6 letters, '=', 6 letters
