"""Corpora as a specification: local .parquet/.jsonl/.txt files and FineWeb-Edu from a Hub (a real
HTTP server on 127.0.0.1, never the network) become token shards that decode to the documents,
whatever the number of workers; a killed prepare resumes to the same bytes; bad input is one line
with nothing half-written counted; and training draws its windows from the shards."""
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_prepare import Handler, closed_port, files_under

import prepare as cli  # noqa: E402
from conftest import ENV, REPO, needs_gpt2_bpe, records, run_script, torchrun, train_here
from tinygpt.corpus import FINEWEB_EDU, prepare_corpus  # noqa: E402
from tinygpt.data import Batches, load_meta  # noqa: E402
from tinygpt.tokenizer import GPT2Tokenizer  # noqa: E402

WORDS = ("the king sees a cat and the moon, eats bread; my friend likes fish! O Romeo: whence? "
         "caf\u00e9 na\u00efve \u00dcn\u00efcode \U0001F642 \u2014 \u65e5\u672c\u8a9e 1999 "
         "tabs\tand\r\nlines").split(" ")
EOT = 50256


def paragraph(rng) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60)))


def documents(n, seed):
    """n documents of 1 to 6 paragraphs of random words, some of them not ASCII."""
    rng = random.Random(seed)
    return ["\n\n".join(paragraph(rng) for _ in range(rng.randint(1, 6))) for _ in range(n)]


def prepare(name, source, data_dir, **options) -> Path:
    """prepare.py's corpus builder, called in this process."""
    return prepare_corpus(name, source, Path(data_dir) / name, **options)


def make_corpus(folder, seed=0, n=(120, 80)) -> list:
    """a.parquet (3 row groups, a text and an id column), b.jsonl, c.txt in folder; their documents
    in order."""
    folder.mkdir(parents=True, exist_ok=True)
    parquet_docs, jsonl_docs = documents(n[0], seed), documents(n[1], seed + 1)
    txt_doc = documents(1, seed + 2)[0]
    table = pa.table({"id": range(len(parquet_docs)), "text": parquet_docs})
    pq.write_table(table, folder / "a.parquet", row_group_size=len(parquet_docs) // 3 + 1)
    lines = [json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(jsonl_docs)]
    (folder / "b.jsonl").write_text("".join(lines))
    (folder / "c.txt").write_text(txt_doc)
    return [*parquet_docs, *jsonl_docs, txt_doc]


def shard_bytes(folder) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.bin"))}


def shard_tokens(folder, split) -> np.ndarray:
    meta = load_meta(folder)
    return np.concatenate([np.fromfile(Path(folder) / name, dtype="<u2")
                           for name, _ in meta["shards"][split]])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(source folder, its documents, the data folder built from it with one worker in shards of
    4,000 tokens)."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(root / "src")
    out = prepare("web", source=root / "src", data_dir=root / "data", workers=1, shard_tokens=4000)
    return root / "src", docs, out


# ------------------------------------------------------------------------------------ the shards

@needs_gpt2_bpe
def test_shards_decode_to_every_document_in_file_order_each_followed_by_end_of_text(corpus):
    _, docs, out = corpus
    meta = load_meta(out)
    tokens = np.concatenate([shard_tokens(out, "val"), shard_tokens(out, "train")])
    expected = [t for d in docs for t in [*GPT2Tokenizer().encoding.encode_ordinary(d), EOT]]
    assert tokens.tolist() == expected
    # The held-out split: the first whole shard.
    assert [n for n, _ in meta["shards"]["val"]] == ["val_000.bin"]
    sizes = [t for _, t in meta["shards"]["val"] + meta["shards"]["train"]]
    assert set(sizes[:-1]) == {4000} and 0 < sizes[-1] <= 4000
    counts = (meta["documents"], meta["skipped_documents"], meta["val_tokens"])
    assert counts == (len(docs), 0, 4000)
    assert meta["train_tokens"] == len(expected) - 4000 and not list(out.glob(".*tmp"))


@needs_gpt2_bpe
def test_two_workers_write_the_same_bytes_and_a_rerun_is_a_no_op(corpus, tmp_path, capsys):
    source, _, out = corpus
    two = prepare("web", source=source, data_dir=tmp_path, workers=2, shard_tokens=4000)
    assert shard_bytes(two) == shard_bytes(out)
    stamps = {p: p.stat().st_mtime_ns for p in two.iterdir()}
    assert cli.main(["web", f"--source={source}", f"--data_dir={tmp_path}", "--workers=2",
                     "--shard_tokens=4000"]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in two.iterdir()} == stamps


@needs_gpt2_bpe
def test_a_glob_reads_only_the_files_it_matches(corpus, tmp_path):
    source, docs, _ = corpus
    out = prepare("web", source=f"{source}/*.jsonl", data_dir=tmp_path, workers=1,
                  shard_tokens=1000)
    assert load_meta(out)["documents"] == 80


def start_prepare(args, **env) -> subprocess.Popen:
    """prepare.py as a real process in its own session, so a test can stop it and its workers."""
    return subprocess.Popen([sys.executable, str(REPO / "prepare.py"), *map(str, args)], cwd=REPO,
                            env={**ENV, "PYTHONPATH": str(REPO), **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(process, timeout=120) -> str:
    """The stderr of a prepare.py that ends by itself within timeout seconds (else it and its
    workers are killed and the test fails: a hang)."""
    try:
        return process.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"prepare.py still ran after {timeout} s") from None


def killed_after(args, out, shards) -> list:
    """SIGKILL a real prepare.py once progress.json lists `shards` whole shards (small ones: each is
    fsynced, so there are many milliseconds to catch it in); where it would have gone on."""
    process = start_prepare(args)
    while process.poll() is None and len(progress_of(out)["shards"]) < shards:
        time.sleep(0.002)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    return progress_of(out)["next"]


def corpus_args(source, data_dir, shard_tokens=500, workers=1) -> list:
    return ["web", f"--source={source}", f"--data_dir={data_dir}", f"--workers={workers}",
            f"--shard_tokens={shard_tokens}"]


@needs_gpt2_bpe
def test_a_killed_prepare_resumes_at_its_shard_and_writes_the_uninterrupted_bytes(tmp_path, capsys):
    make_corpus(tmp_path / "src", seed=5, n=(300, 200))
    reference = prepare("web", source=tmp_path / "src", data_dir=tmp_path / "ref", workers=1,
                        shard_tokens=500)
    args, out = corpus_args(tmp_path / "src", tmp_path / "data"), tmp_path / "data" / "web"
    killed_after(args, out, 3)
    done = len(progress_of(out)["shards"])
    all_shards = len(load_meta(reference)["shards"]["train"])
    assert not (out / "meta.json").exists() and 3 <= done < all_shards, done
    capsys.readouterr()
    assert cli.main(args) == 0
    assert f"resuming after {done} shard(s)" in capsys.readouterr().out
    assert shard_bytes(out) == shard_bytes(reference)
    assert {k: v for k, v in load_meta(out).items() if k != "source_url"} == \
        {k: v for k, v in load_meta(reference).items() if k != "source_url"}


@needs_gpt2_bpe
def test_two_kills_inside_one_long_document_resume_to_the_uninterrupted_bytes(tmp_path):
    """A .txt file is one document, here one of some 100 shards: killed once inside it and again
    further in, the third run still writes the bytes of an uninterrupted one (the second restart
    point counts the tokens the first run wrote too)."""
    (tmp_path / "src").mkdir()
    rng = random.Random(11)
    (tmp_path / "src" / "a.txt").write_text("\n\n".join(paragraph(rng) for _ in range(1200)))
    (tmp_path / "src" / "b.txt").write_text(documents(1, seed=12)[0])
    reference = prepare("web", tmp_path / "src", tmp_path / "ref", workers=1, shard_tokens=500)
    args, out = corpus_args(tmp_path / "src", tmp_path / "data"), tmp_path / "data" / "web"
    first = killed_after(args, out, 3)
    second = killed_after(args, out, len(progress_of(out)["shards"]) + 5)
    # both restart points lie inside a.txt, the second further in
    assert first[:2] == second[:2] == [0, 0] and 0 < first[2] < second[2], (first, second)
    assert cli.main(args) == 0
    assert shard_bytes(out) == shard_bytes(reference)


def progress_of(out) -> dict:
    try:
        return json.loads((out / "progress.json").read_text())
    except (OSError, ValueError):
        return {"shards": [], "next": None}


def progress_shards(out) -> list:
    return progress_of(out)["shards"]


# ------------------------------------------------------------------ workers and other prepares

def worker_pids(pid) -> list:
    """The pool processes (multiprocessing's spawn children) of process pid."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in command:
            found.append(int(stat.parent.name))
    return found


def test_a_worker_that_cannot_load_the_tokenizer_is_one_line_with_no_temporary_file_left(tmp_path):
    """No cached tiktoken files and no network (a proxy on a closed port): each worker fails its
    first task, and the command stops with the tokenizer's one-line error instead of waiting on
    the pool."""
    make_corpus(tmp_path / "src")
    source = tmp_path / "src"
    (tmp_path / "empty").mkdir()
    proxy = f"http://127.0.0.1:{closed_port()}"
    process = start_prepare(corpus_args(source, tmp_path / "data", 4000, workers=2),
                            TIKTOKEN_CACHE_DIR=str(tmp_path / "empty"), HTTPS_PROXY=proxy,
                            https_proxy=proxy)
    err = finished(process, timeout=90)
    assert process.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith("error: cannot load tiktoken's gpt2 encoding")
    assert "TIKTOKEN_CACHE_DIR" in err
    assert files_under(tmp_path / "data") == []


@needs_gpt2_bpe
def test_a_worker_that_dies_is_one_line_with_no_temporary_file_left(corpus, tmp_path):
    """A worker killed (as the kernel kills one for memory) breaks the pool: one line, no hang."""
    source, _, _ = corpus
    process = start_prepare(corpus_args(source, tmp_path / "data", 4000, workers=2))
    while process.poll() is None and not worker_pids(process.pid):
        time.sleep(0.01)
    os.kill(worker_pids(process.pid)[0], signal.SIGKILL)  # its first task takes it a second or more
    err = finished(process, timeout=90)
    assert process.returncode == 1 and err.count("\n") == 1, err
    assert "a tokenizing worker process died" in err and "fewer --workers" in err
    assert not [f for f in files_under(tmp_path / "data") if f.endswith((".tmp", "meta.json"))]


@needs_gpt2_bpe
def test_a_second_prepare_of_the_same_folder_is_one_line_and_the_first_finishes(tmp_path, capsys):
    """The first prepare is stopped (SIGSTOP) while it holds the folder, so the second surely
    meets it."""
    make_corpus(tmp_path / "src", seed=5, n=(120, 80))
    args, out = corpus_args(tmp_path / "src", tmp_path / "data"), tmp_path / "data" / "web"
    first = start_prepare(args)
    while first.poll() is None and not progress_shards(out):
        time.sleep(0.002)
    first.send_signal(signal.SIGSTOP)
    try:
        err = one_line_error(capsys, args)
    finally:
        first.send_signal(signal.SIGCONT)
    assert f"another prepare is running on {out}" in err
    assert finished(first) == "" and first.returncode == 0
    reference = prepare("web", tmp_path / "src", tmp_path / "ref", workers=1, shard_tokens=500)
    assert shard_bytes(out) == shard_bytes(reference) and not (out / ".prepare.lock").exists()


# ------------------------------------------------------------------------------------- bad input

def one_line_error(capsys, args) -> str:
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
    return err


def broken_corpus(folder, what):
    make_corpus(folder, n=(30, 20))
    if what == "corrupt":
        data = (folder / "a.parquet").read_bytes()
        (folder / "a.parquet").write_bytes(data[:len(data) // 2])
    elif what == "corrupt pages":  # the footer still lists the columns; the text's page is garbage
        text_chunk = pq.ParquetFile(folder / "a.parquet").metadata.row_group(0).column(1)
        data = bytearray((folder / "a.parquet").read_bytes())
        data[text_chunk.data_page_offset:text_chunk.data_page_offset + 32] = b"\xff" * 32
        (folder / "a.parquet").write_bytes(data)
    elif what in ("int64 text", "list text"):
        text = [[f"document {d}"] for d in range(3)] if what == "list text" else range(3)
        pq.write_table(pa.table({"text": text}), folder / "a.parquet")
    elif what == "no text column":
        pq.write_table(pa.table({"content": ["a document"]}), folder / "a.parquet")
    elif what == "empty parquet":
        pq.write_table(pa.table({"text": pa.array([], pa.string())}), folder / "a.parquet")
    elif what == "empty file":
        (folder / "b.jsonl").write_text("")
    elif what == "not json":
        (folder / "b.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    elif what == "empty folder":
        for p in folder.iterdir():
            p.unlink()


@pytest.mark.parametrize("what, message", [
    ("corrupt", "a.parquet is not a readable parquet file"),
    ("corrupt pages", "a.parquet cannot be read ("),
    ("int64 text", "a.parquet: its `text` column holds int64, not strings"),
    ("list text", "a.parquet: its `text` column holds list<element: string>, not strings"),
    ("no text column", "a.parquet has no `text` column (it has: content)"),
    ("empty parquet", "a.parquet holds no documents"),
    ("empty file", "b.jsonl is empty"),
    ("not json", "b.jsonl:2 is not a JSON object with a `text` field"),
    ("empty folder", "no .parquet, .jsonl, .txt files there"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, what, message):
    broken_corpus(tmp_path / "src", what)
    err = one_line_error(capsys, ["web", f"--source={tmp_path / 'src'}",
                                  f"--data_dir={tmp_path / 'data'}", "--workers=1",
                                  "--shard_tokens=500"])
    assert message in err
    out = tmp_path / "data" / "web"
    written = [f for f in files_under(tmp_path / "data")] if (tmp_path / "data").exists() else []
    assert "web/meta.json" not in written and not [f for f in written if f.endswith(".tmp")]
    shards = [f for f in written if f.endswith(".bin")]
    assert [f"web/{f}" for f in shards] == [] or \
        sorted(f"web/{name}" for name, _ in progress_shards(out)) == shards


@needs_gpt2_bpe
def test_a_document_that_is_not_utf8_is_skipped_and_counted(tmp_path):
    docs = make_corpus(tmp_path / "src", n=(30, 20))
    with open(tmp_path / "src" / "b.jsonl", "ab") as f:
        f.write(b'{"text": "caf\xe9"}\n')  # latin-1, not UTF-8
    (tmp_path / "src" / "d.txt").write_bytes("Ol\u00e9".encode("latin-1"))
    out = prepare("web", source=tmp_path / "src", data_dir=tmp_path / "data", workers=1,
                  shard_tokens=500)
    meta = load_meta(out)
    assert (meta["documents"], meta["skipped_documents"]) == (len(docs), 2)
    tokens = np.concatenate([shard_tokens(out, "val"), shard_tokens(out, "train")])
    assert GPT2Tokenizer().decode(tokens) == "".join(d + "<|endoftext|>" for d in docs)


@needs_gpt2_bpe
@pytest.mark.parametrize("shard_tokens, limit", [(20000, 30000), (1500, 2000)],
                         ids=["writing", "flushing"])
def test_a_disk_that_fills_up_is_one_line_leaves_no_half_shard_and_the_rerun_builds_it(
        tmp_path, shard_tokens, limit):
    """A real EFBIG from the kernel: prepare.py's process may not grow a file past `limit` bytes,
    less than a shard. A shard of 40,000 bytes meets it while writing; one of 3,000 sits in the
    file's buffer until the flush before its rename meets it (and closing the file then fails
    again)."""
    make_corpus(tmp_path / "src", seed=3, n=(300, 100))
    args = corpus_args(tmp_path / "src", tmp_path / "data", shard_tokens)
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); import prepare; "
               f"sys.exit(prepare.main({args!r}))")
    result = subprocess.run([sys.executable, "-c", limited], cwd=REPO,
                            env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "File too large" in result.stderr and "run the same command again" in result.stderr
    assert files_under(tmp_path / "data") == []  # no half shard, no temporary file, no meta.json
    out = tmp_path / "data" / "web"
    prepare("web", tmp_path / "src", tmp_path / "ref", workers=1, shard_tokens=shard_tokens)
    assert cli.main(args) == 0
    assert shard_bytes(out) == shard_bytes(tmp_path / "ref" / "web")


# ----------------------------------------------------------------------- FineWeb-Edu from a Hub

class HubHandler(Handler):
    """The Hub's two routes this project uses: the tree listing (JSON, with each file's LFS sha256)
    and the file downloads; /tree/ lists server.listing, /resolve/ serves server.files."""

    def do_GET(self):
        if "//" in self.requestline.split()[1]:  # http.server would quietly read "//x" as "/x"
            return self.send_error(404)
        self.path = self.path.split("?")[0]
        if "/tree/" in self.path and self.server.listing is not None:
            self.server.files[self.path] = json.dumps(self.server.listing).encode()
        Handler.do_GET(self)


@pytest.fixture
def hub(tmp_path):
    """A Hub on 127.0.0.1 serving FineWeb-Edu's layout at the pinned revision: two small parquet
    files."""
    import http.server
    import threading
    repo, rev, folder = FINEWEB_EDU["repo"], FINEWEB_EDU["revision"], FINEWEB_EDU["folder"]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    httpd.files, httpd.hits, httpd.listing = {}, [], []
    for i in range(2):
        table = pa.table({"text": documents(40, seed=10 + i), "score": [3.0] * 40})
        pq.write_table(table, tmp_path / "f.parquet")
        data, path = (tmp_path / "f.parquet").read_bytes(), f"{folder}/{i:03d}_00000.parquet"
        (tmp_path / "f.parquet").unlink()
        httpd.files[f"/datasets/{repo}/resolve/{rev}/{path}"] = data
        lfs = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        httpd.listing.append({"type": "file", "oid": "0" * 40, "size": len(data), "path": path,
                              "lfs": lfs})
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@needs_gpt2_bpe
@pytest.mark.parametrize("slash", ["", "/"], ids=["endpoint", "endpoint with a slash"])
def test_fineweb_edu_downloads_the_pinned_files_checks_them_and_builds_shards(hub, tmp_path,
                                                                              monkeypatch, slash):
    monkeypatch.setenv("HF_ENDPOINT", hub.url + slash)
    assert cli.main(["fineweb_edu", "--shards=1", f"--data_dir={tmp_path}", "--workers=1",
                     "--shard_tokens=2000"]) == 0
    out, first = tmp_path / "fineweb_edu", hub.listing[0]
    served = next(data for path, data in hub.files.items() if path.endswith(first["path"]))
    assert (out / "download" / "000_00000.parquet").read_bytes() == served
    assert not (out / "download" / "001_00000.parquet").exists()  # --shards=1: the first file only
    meta = load_meta(out)
    assert meta["inputs"]["files"] == {first["path"]: first["lfs"]["oid"]}
    assert meta["documents"] == 40
    assert FINEWEB_EDU["revision"] in meta["source_url"]


@needs_gpt2_bpe
def test_a_finished_or_interrupted_fineweb_edu_reruns_offline_from_its_kept_listing(hub, tmp_path):
    """Compute nodes often run with HF_HUB_OFFLINE=1 (here also an endpoint nobody answers on):
    the Hub's listing at the pinned revision is kept with the data, so neither rerun asks the
    Hub."""
    online = {"HF_ENDPOINT": hub.url}
    offline = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "1"}
    args = ["fineweb_edu", "--shards=1", f"--data_dir={tmp_path}", "--workers=1",
            "--shard_tokens=2000"]
    out = tmp_path / "fineweb_edu"
    run_script("prepare.py", args, env=online)
    built = shard_bytes(out)
    result = run_script("prepare.py", args, env=offline, check=False)
    assert result.returncode == 0 and "already prepared" in result.stdout, result.stderr
    (out / "meta.json").unlink()  # how a run interrupted after its last shard leaves the folder
    result = run_script("prepare.py", args, env=offline, check=False)
    assert result.returncode == 0 and "resuming after" in result.stdout, result.stderr
    assert shard_bytes(out) == built and load_meta(out)["documents"] == 40


def test_a_tampered_hub_file_is_refused_in_one_line_with_nothing_saved(hub, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    path = next(p for p in hub.files if p.endswith("001_00000.parquet"))
    hub.files[path] = hub.files[path][:-1] + b"!"
    err = one_line_error(capsys, ["fineweb_edu", "--shards=2", f"--data_dir={tmp_path}",
                                  "--shard_tokens=2000"])
    assert err.startswith("error: sha256 mismatch") and "nothing was saved" in err
    kept = [f for f in files_under(tmp_path) if "001" in f or f.endswith((".bin", "meta.json"))]
    assert kept == []


def test_a_hub_without_the_data_set_is_one_line_naming_the_local_way_out(hub, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    # The tree route then answers 404, as the Hub does for a repo or revision it lacks.
    hub.listing = None
    err = one_line_error(capsys, ["fineweb_edu", f"--data_dir={tmp_path}"])
    assert "could not list HuggingFaceFW/fineweb-edu" in err and "404" in err
    assert "--source=FOLDER" in err
    assert files_under(tmp_path) == []


@pytest.mark.slow  # huggingface_hub retries a refused connection for ~23 s before it gives up
def test_no_network_for_the_hub_is_one_line_naming_the_local_way_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    err = one_line_error(capsys, ["fineweb_edu", f"--data_dir={tmp_path}"])
    assert "could not list HuggingFaceFW/fineweb-edu" in err and "--source=FOLDER" in err
    assert files_under(tmp_path) == []


# ---------------------------------------------------------------------------- training on shards

@needs_gpt2_bpe
def test_windows_are_numbered_shard_after_shard_and_never_cross_a_shard(corpus):
    _, _, out = corpus
    meta, block = load_meta(out), 64
    batches = Batches(out, meta, block, "cpu")
    sizes = [t for _, t in meta["shards"]["train"]]
    firsts = np.cumsum([0, *[max(0, n - block) for n in sizes]])
    assert batches.count("train") == firsts[-1]
    picks = np.random.default_rng(0).integers(0, firsts[-1], 64)
    picks[:len(sizes)] = firsts[:-1]  # every shard's first window too
    rows = batches.rows("train", picks)
    for pick, row in zip(picks, rows):
        shard = int(np.searchsorted(firsts, pick, side="right") - 1)
        start = pick - firsts[shard]
        tokens = np.fromfile(out / meta["shards"]["train"][shard][0], dtype="<u2")
        assert row.tolist() == tokens[start:start + block + 1].tolist()


@needs_gpt2_bpe
def test_one_shard_draws_the_batches_a_flat_train_bin_draws(corpus, tmp_path):
    _, _, out = corpus
    meta = load_meta(out)
    flat = tmp_path / "flat"
    flat.mkdir()
    for split in ("train", "val"):
        (flat / f"{split}.bin").write_bytes((out / meta["shards"][split][0][0]).read_bytes())
    flat_meta = {k: v for k, v in meta.items() if k != "shards"}
    one_shard = {**meta, "shards": {s: meta["shards"][s][:1] for s in ("train", "val")}}
    a, b = Batches(flat, flat_meta, 32, "cpu"), Batches(out, one_shard, 32, "cpu")
    rng_picks = a.random_picks("train", np.random.default_rng(1), (3, 4))
    assert (b.random_picks("train", np.random.default_rng(1), (3, 4)) == rng_picks).all()
    for x, y in zip(a.batch("train", rng_picks[0]), b.batch("train", rng_picks[0])):
        assert x.equal(y)
    assert (a.full_split_picks("val") == b.full_split_picks("val")).all()


SHRUNK = ["configs/gpt2_124m.py", "--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=32",
          "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=3", "--eval_interval=3",
          "--eval_iters=2", "--warmup_iters=1", "--log_interval=1", "--device=cpu",
          "--dtype=float32", "--compile=False"]


@needs_gpt2_bpe
def test_a_shrunk_gpt2_124m_run_trains_on_the_shards_and_scores_the_whole_val_shard(corpus,
                                                                                    tmp_path):
    _, _, out = corpus
    train_here([*SHRUNK, f"--data_dir={out.parent}", "--dataset=web",
                f"--out_dir={tmp_path / 'run'}"], REPO)
    final = records(tmp_path / "run", "final")[0]
    val = [t for _, t in load_meta(out)["shards"]["val"]]
    assert final["val_tokens"] == sum((n - 1) // 32 * 32 for n in val)
    assert len(records(tmp_path / "run", "train")) == 3


@needs_gpt2_bpe
@pytest.mark.slow
def test_a_shrunk_gpt2_124m_run_under_torchrun_takes_the_same_first_step(corpus, tmp_path):
    _, _, out = corpus
    common = [f"--data_dir={out.parent}", "--dataset=web"]
    train_here([*SHRUNK, *common, f"--out_dir={tmp_path / 'one'}"], REPO)
    run_script("train.py", [*SHRUNK, *common, f"--out_dir={tmp_path / 'two'}"],
               launcher=torchrun(2))
    one, two = (records(tmp_path / d, "train") for d in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3]
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
