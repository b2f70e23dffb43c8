"""A web corpus built into data/<name>/ as fixed-size token shards (prepare.py hands corpora here):
FineWeb-Edu's 10B-token sample from the Hugging Face Hub (`python prepare.py fineweb_edu
[--shards=N]`), or local files (`--source=FOLDER_OR_GLOB`): .parquet (a `text` column of strings),
.jsonl (a `text` field per line), .txt (one document per file).

Documents stream from the files in sorted order, in batches of about BATCH_CHARS characters;
`workers` processes tokenize the batches (GPT-2 BPE, every document followed by <|endoftext|>) and
this process writes their tokens in document order into shards of shard_tokens little-endian uint16
ids: val_000.bin first (the held-out split is that one whole shard), then train_000.bin,
train_001.bin, ... (the last one may be shorter). Memory holds a few batches in flight, whatever
the corpus size.

A shard is written to a temporary file and renamed when whole; then progress.json records the shards
done and where the next one starts (file, document, tokens of that document already written). A
rerun with the same inputs resumes there and writes the same bytes an uninterrupted run writes.
meta.json comes last. A document that is not UTF-8 text (or a null `text`) is skipped and counted
in meta.json. The Hub's listing of FineWeb-Edu is kept in listing.json, so a rerun needs no network
once the files are downloaded. One prepare at a time works on a folder (.prepare.lock).
"""
import fcntl
import glob
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinygpt.common import DataError, atomic_write
from tinygpt.download import download

FORMATS = (".parquet", ".jsonl", ".txt")
FINEWEB_EDU = {"repo": "HuggingFaceFW/fineweb-edu", "folder": "sample/10BT",
               # the dataset's commit on the Hub (docs/data.md: where this hash comes from)
               "revision": "87f09149ef4734204d70ed1d046ddc9ca3f2b8f9"}
CORPUS_FORMAT = 1             # bump when the shards' layout changes, so old outputs get rebuilt
SHARD_TOKENS = 100_000_000    # 200 MB per shard
BATCH_CHARS = 1 << 20         # characters of documents per task handed to a worker
PARQUET_ROWS = 1024           # rows read from a parquet file at a time
PROGRESS_S = 10.0             # seconds between progress lines


class Doc(NamedTuple):
    file: int         # index in the sorted input files
    index: int        # document number within that file
    text: str | None  # None: not UTF-8 text, skipped
    done: float       # share of the input bytes read so far


# ------------------------------------------------------------------------------------- inputs

def local_files(source) -> list:
    """The corpus files of a folder (searched recursively) or a glob, sorted, each checked."""
    pattern = str(source)
    if Path(pattern).is_dir():
        found = [p for p in Path(pattern).rglob("*") if p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    files = sorted(p for p in found if p.suffix in FORMATS)
    if not files:
        raise DataError(f"--source={source}: no {', '.join(FORMATS)} files there; "
                        "give a folder or a glob of them")
    for path in files:
        check_readable(path)
    return files


def check_readable(path):
    """Refuse, before anything is written, a file that is empty, not parquet, or without a
    `text` column of strings."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it from the corpus folder")
    if path.suffix != ".parquet":
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({first_line(e)}); "
                        "download it again or remove it") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise DataError(f"{path} has no `text` column (it has: {', '.join(schema.names)}); "
                        "the corpus reads documents from a column named text")
    kind = schema.field("text").type
    if not any(is_type(kind) for is_type in (pa.types.is_string, pa.types.is_large_string,
                                             pa.types.is_binary, pa.types.is_large_binary)):
        raise DataError(f"{path}: its `text` column holds {kind}, not strings; the corpus reads "
                        "each document from a string in that column")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path} holds no documents (0 rows); remove it from the corpus folder")


def first_line(err) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def local_inputs(source, shards, settings) -> tuple:
    """(files, inputs, source_url) of a folder or a glob: files count by size and modification
    time, named from the folder the corpus lies in."""
    if shards:
        raise DataError("--shards picks files of FineWeb-Edu on the Hub; with --source the folder "
                        "or glob chooses the files")
    files = local_files(source)
    folder = Path(source).is_dir()
    root = Path(source) if folder else Path(os.path.commonpath([p.parent for p in files]))
    stamps = {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
              for p in files}
    source_url = str(Path(source).resolve()) if folder else str(source)
    return files, {**settings, "files": stamps}, source_url


def hub_inputs(out_dir, shards, settings) -> tuple:
    """(listing, inputs, source_url) of FineWeb-Edu's first `shards` files (0 = all)."""
    listing = hub_listing(out_dir)
    if shards > len(listing):
        raise DataError(f"--shards={shards}, but {FINEWEB_EDU['repo']}/{FINEWEB_EDU['folder']} "
                        f"lists {len(listing)} parquet files")
    listing = listing[:shards or len(listing)]
    repo, revision, folder = FINEWEB_EDU["repo"], FINEWEB_EDU["revision"], FINEWEB_EDU["folder"]
    source_url = f"https://huggingface.co/datasets/{repo}/tree/{revision}/{folder}"
    return listing, {**settings, "files": dict(listing)}, source_url


def hub_listing(out_dir) -> list:
    """[[path, sha256]] of every parquet file of FineWeb-Edu's sample at the pinned revision, in
    name order. The revision never changes, so the Hub's answer is kept in out_dir/listing.json and
    a rerun (offline too, e.g. HF_HUB_OFFLINE=1) reads it from there."""
    kept = out_dir / "listing.json"
    try:
        listing = json.loads(kept.read_text(encoding="utf-8"))
        if {k: listing[k] for k in FINEWEB_EDU} == FINEWEB_EDU:
            return listing["files"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    files = listed_on_hub()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(kept, {**FINEWEB_EDU, "files": files})
    return files


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def listed_on_hub() -> list:
    """[[path, sha256]] of the parquet files the Hub lists (HF_ENDPOINT points at a mirror)."""
    from huggingface_hub import HfApi
    repo, folder, revision = FINEWEB_EDU["repo"], FINEWEB_EDU["folder"], FINEWEB_EDU["revision"]
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retries' warnings: the error below says it in one line
    hub = HfApi(endpoint=hub_endpoint())
    try:
        entries = list(hub.list_repo_tree(repo, folder, revision=revision,
                                          repo_type="dataset"))
    except Exception as e:  # huggingface_hub raises its own, httpx's or requests' errors
        raise DataError(f"could not list {repo}/{folder} on {hub_endpoint()} ({type(e).__name__}: "
                        f"{first_line(e)}); check the network (or HF_ENDPOINT), or pass "
                        "--source=FOLDER with local parquet files") from None
    finally:
        hub_log.setLevel(level)
    files = sorted((e for e in entries if e.path.endswith(".parquet")), key=lambda e: e.path)
    if not files:
        raise DataError(f"{repo}/{folder} at {revision[:10]} lists no parquet files; pass "
                        "--source=FOLDER with local ones")
    unverified = next((e.path for e in files if getattr(e, "lfs", None) is None), None)
    if unverified:
        raise DataError(f"the Hub publishes no sha256 for {unverified}; it cannot be verified, "
                        "so it is not used")
    return [[e.path, e.lfs.sha256] for e in files]


def hub_files(listing, out_dir) -> list:
    """The listed files, each downloaded to out_dir/download/ and checked against its sha256."""
    from huggingface_hub import hf_hub_url
    repo, revision = FINEWEB_EDU["repo"], FINEWEB_EDU["revision"]
    urls = [hf_hub_url(repo, path, repo_type="dataset", revision=revision, endpoint=hub_endpoint())
            for path, _ in listing]
    return [download(url, out_dir / "download" / Path(path).name, sha256)
            for url, (path, sha256) in zip(urls, listing)]


# ---------------------------------------------------------------------------------- documents

def decoded(raw) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parquet_texts(path, start):
    """(text, share of the file read) of each row of a parquet file's `text` column from row
    `start` on; data pages that cannot be read are one error naming the file."""
    import pyarrow as pa
    try:
        yield from parquet_rows(path, start)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} cannot be read ({first_line(e)}); download it again or remove "
                        "it, then run the same command again: it resumes") from None


def parquet_rows(path, start):
    """parquet_texts, read in record batches; the whole row groups before `start` are skipped
    unread."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    rows, group, skipped = parquet.metadata.num_rows, 0, 0
    groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    while group < len(groups) and skipped + groups[group] <= start:
        skipped += groups[group]
        group += 1
    if group == len(groups):
        return
    row, drop = start, start - skipped
    groups_left = range(group, len(groups))
    for batch in parquet.iter_batches(PARQUET_ROWS, row_groups=groups_left, columns=["text"]):
        column = batch.column(0).slice(drop)
        drop = max(0, drop - len(batch))
        # bytes: text that is not UTF-8 is skipped, not fatal
        for raw in column.cast(pa.large_binary()).to_pylist():
            row += 1
            yield decoded(raw), row / rows


def jsonl_texts(path, start):
    """(the `text` field, share of the file read) of each non-blank line from the start-th on."""
    size, index = path.stat().st_size, 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            index += 1
            if index > start:
                yield jsonl_text(line, path, number), f.tell() / size


def jsonl_text(line, path, number) -> str | None:
    text = decoded(line)
    if text is None:
        return None
    try:
        text = json.loads(text)["text"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}:{number} is not a JSON object with a `text` field; fix or remove "
                        "that line") from None
    if not isinstance(text, str):
        raise DataError(f"{path}:{number}: `text` is {type(text).__name__}, not a string")
    return text


def txt_texts(path, start):
    """The file as one document."""
    if start == 0:
        yield decoded(path.read_bytes()), 1.0


READERS = {".parquet": parquet_texts, ".jsonl": jsonl_texts, ".txt": txt_texts}


def documents(files, start=(0, 0)):
    """Doc after Doc of every file in order, from (file, document) `start` on."""
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    for file in range(start[0], len(files)):
        before, first = sum(sizes[:file]), start[1] if file == start[0] else 0
        read = READERS[files[file].suffix](files[file], first)
        for index, (text, share) in enumerate(read, first):
            yield Doc(file, index, text, (before + share * sizes[file]) / total)


def batches(docs):
    """Lists of Docs of about BATCH_CHARS characters."""
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text or "")
        if chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# ------------------------------------------------------------------------------- tokenization

# GPT-2 BPE, loaded by a process's first task rather than by a pool initializer: a worker that
# cannot load it then fails that task, which raises its one-line error here.
ENCODING = None


def tokenize(texts) -> tuple:
    """(uint16 token ids of the texts, each followed by <|endoftext|>; tokens per text, 0 for a
    skipped one)."""
    global ENCODING
    if ENCODING is None:
        from tinygpt.tokenizer import GPT2Tokenizer
        ENCODING = GPT2Tokenizer().encoding
    eot = ENCODING.eot_token
    pieces, lengths = [], []
    for text in texts:
        if text is None:
            lengths.append(0)
            continue
        ids = ENCODING.encode_ordinary(text)
        ids.append(eot)
        pieces.append(np.array(ids, dtype=np.uint16))
        lengths.append(len(ids))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint16)
    return tokens, np.array(lengths, dtype=np.int64)


@contextmanager
def worker_pool(workers):
    """Processes that tokenize (None: this process does). A worker that dies breaks the pool, and
    the next result says so, instead of the pool waiting for it forever."""
    if workers <= 1:
        yield None
        return
    import multiprocessing
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield pool
    finally:
        pool.shutdown(cancel_futures=True)


def tokenized(batch_iter, pool, workers):
    """(batch, tokens, lengths) in order: in this process without a pool, else through the pool
    with at most 2 batches per worker in flight (its own map would read the whole corpus ahead)."""
    if pool is None:
        for batch in batch_iter:
            yield (batch, *tokenize([d.text for d in batch]))
        return
    pending = deque()
    for batch in batch_iter:
        pending.append((batch, pool.submit(tokenize, [d.text for d in batch])))
        if len(pending) >= 2 * workers:
            yield result(*pending.popleft())
    while pending:
        yield result(*pending.popleft())


def result(batch, future) -> tuple:
    try:
        return (batch, *future.result())
    except BrokenProcessPool:
        raise DataError("a tokenizing worker process died (out of memory?); run the same command "
                        "again, with fewer --workers: it resumes after the shards already written"
                        ) from None


# ------------------------------------------------------------------------------------- shards

def shard_name(number) -> str:
    return "val_000.bin" if number == 0 else f"train_{number - 1:03d}.bin"


class ShardWriter:
    """Tokens in, whole shards out: each written to a temporary file, fsynced and renamed, then
    recorded in progress.json with where the next shard starts. `skip` tokens of the first
    document were written by an earlier run: its first batch's tokens start after them."""

    def __init__(self, out_dir, shard_tokens, progress, skip):
        self.out_dir, self.shard_tokens, self.progress = out_dir, shard_tokens, progress
        self.skip = skip
        self.open_shard()

    def open_shard(self):
        self.tmp = self.out_dir / f".{shard_name(len(self.progress['shards']))}.tmp"
        self.file, self.filled = open(self.tmp, "wb"), 0

    def write(self, tokens, lengths, batch):
        """Append one batch's tokens (every document whole); a shard boundary inside it is located
        to the document and token, and the documents before it are counted with that shard."""
        at, counted, self.skip = self.skip, 0, 0
        while len(tokens) - at >= self.shard_tokens - self.filled:
            take = self.shard_tokens - self.filled
            self.put(tokens[at:at + take])
            at += take
            start, before = next_start(lengths, batch, at)
            self.count(lengths[counted:before])
            counted = before
            self.finish(start)
        self.put(tokens[at:])
        self.count(lengths[counted:])

    def count(self, lengths):
        self.progress["documents"] += int(np.count_nonzero(lengths))
        self.progress["skipped"] += int(len(lengths) - np.count_nonzero(lengths))

    def put(self, tokens):
        try:
            self.file.write(tokens.astype("<u2", copy=False).tobytes())
        except OSError as e:
            self.fail(e)
        self.filled += len(tokens)

    def finish(self, start, last=False):
        """Close the shard (whole, or the corpus's last, shorter one) and record it with the next
        start."""
        name = shard_name(len(self.progress["shards"]))
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.out_dir / name)
        except OSError as e:
            self.fail(e)
        self.progress["shards"].append([name, self.filled])
        self.progress["next"] = start
        write_json(self.out_dir / "progress.json", self.progress)
        if not last:
            self.open_shard()

    def fail(self, err):
        self.close()
        done = len(self.progress["shards"])
        raise DataError(f"could not write {self.out_dir} ({err.strerror or err}); free some space "
                        f"(a shard takes {2 * self.shard_tokens:,} bytes) and run the same command "
                        f"again: it resumes after the {done} shard(s) already written") from None

    def close(self):
        """Drop the unfinished shard's file. Closing flushes what is still buffered, which fails
        again on a full disk: the file goes all the same."""
        try:
            self.file.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def next_start(lengths, batch, at) -> tuple:
    """([file, document, tokens of it already written] of the token at offset `at` of a batch's
    tokens, how many of the batch's documents lie wholly before it)."""
    ends = np.cumsum(lengths)
    i = int(np.searchsorted(ends, at, side="right"))
    if i == len(batch):  # the boundary is the batch's end: the next document starts the next shard
        return [batch[-1].file, batch[-1].index + 1, 0], i
    return [batch[i].file, batch[i].index, int(at - (ends[i] - lengths[i]))], i


# ----------------------------------------------------------------------------------- progress

def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def saved_progress(out_dir, inputs) -> dict:
    """What an earlier run of the same inputs finished (its shards still whole on disk), else a
    fresh start."""
    fresh = {"inputs": inputs, "shards": [], "next": [0, 0, 0], "documents": 0, "skipped": 0}
    try:
        progress = json.loads((out_dir / "progress.json").read_text(encoding="utf-8"))
        whole = all((out_dir / name).stat().st_size == 2 * n for name, n in progress["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return fresh
    return progress if whole and progress.get("inputs") == inputs else fresh


class Progress:
    """A line every PROGRESS_S seconds: documents, tokens, tokens/s, share of the input, ETA."""

    def __init__(self, name, progress):
        self.name, self.start, self.last = name, time.perf_counter(), time.perf_counter()
        self.tokens0 = sum(n for _, n in progress["shards"])

    def show(self, progress, tokens, done, force=False):
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_S:
            return
        self.last, elapsed = now, now - self.start
        rate = (tokens - self.tokens0) / max(elapsed, 1e-9)
        eta = elapsed * (1 - done) / done if 0 < done < 1 else 0.0
        print(f"{self.name}: {progress['documents']:,} documents, {tokens:,} tokens, "
              f"{rate:,.0f} tokens/s, {100 * done:.0f}% of the input, ETA {eta / 60:.1f} min",
              flush=True)


@contextmanager
def locked(out_dir):
    """Hold out_dir/.prepare.lock: a second prepare of the same folder (another terminal, another
    node of a shared file system) stops in one line instead of writing the same temporary files.
    The kernel drops the lock when its process dies, so a killed prepare never leaves it stale."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".prepare.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if not isinstance(e, BlockingIOError):  # the file system's own trouble, not a holder
                raise
            raise DataError(f"another prepare is running on {out_dir} (it holds {path.name}); "
                            "let it finish, or stop it, then run this command again") from None
        if same_file(path, fd):
            break
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def same_file(path, fd) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------------------- main

def build_shards(name, files, out_dir, inputs, shard_tokens, workers) -> dict:
    """Tokenize the files into out_dir's shards, resuming an earlier run of the same inputs; the
    progress record of the whole corpus."""
    progress = saved_progress(out_dir, inputs)
    if progress["shards"]:
        print(f"{out_dir}: resuming after {len(progress['shards'])} shard(s) written by an earlier "
              "run", flush=True)
    file, index, skip = progress["next"]
    writer, shown = ShardWriter(out_dir, shard_tokens, progress, skip), Progress(name, progress)
    try:
        with worker_pool(workers) as pool:
            stream = tokenized(batches(documents(files, (file, index))), pool, workers)
            for batch, tokens, lengths in stream:
                writer.write(tokens, lengths, batch)
                shown.show(progress, written(progress) + writer.filled, batch[-1].done)
        if len(progress["shards"]) == 0:
            raise DataError(f"{name}: the corpus holds {writer.filled:,} tokens, fewer than the "
                            f"{shard_tokens:,} of the val shard, and none left to train on; add "
                            "documents or lower --shard_tokens")
        if writer.filled:
            writer.finish([len(files), 0, 0], last=True)
    finally:
        writer.close()
    if len(progress["shards"]) < 2:
        raise DataError(f"{name}: the corpus fills only the val shard ({shard_tokens:,} tokens), "
                        "none is left to train on; add documents or lower --shard_tokens")
    shown.show(progress, written(progress), 1.0, force=True)
    return progress


def written(progress) -> int:
    return sum(n for _, n in progress["shards"])


def corpus_meta(progress, source_url, inputs) -> dict:
    shards = {split: [[n, t] for n, t in progress["shards"] if n.startswith(split)]
              for split in ("train", "val")}
    return {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
            "train_tokens": sum(t for _, t in shards["train"]),
            "val_tokens": sum(t for _, t in shards["val"]), "shards": shards,
            "documents": progress["documents"], "skipped_documents": progress["skipped"],
            "source_url": source_url, "inputs": inputs}


def prepared(out_dir, inputs):
    """meta.json of a complete corpus built from exactly these inputs, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        whole = all((out_dir / n).stat().st_size == 2 * t
                    for split in meta["shards"].values() for n, t in split)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if whole and meta.get("inputs") == inputs else None


def summary(out_dir, meta) -> str:
    shards = meta["shards"]
    return (f"{out_dir}: {meta['documents']:,} documents ({meta['skipped_documents']:,} skipped: "
            f"not UTF-8 text), vocab {meta['vocab_size']:,}, train {meta['train_tokens']:,} tokens "
            f"in {len(shards['train'])} shard(s), val {meta['val_tokens']:,} tokens in "
            f"{len(shards['val'])}")


def default_workers() -> int:
    """One per CPU core this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_corpus(name, source, out_dir, shards=0, workers=0, shard_tokens=SHARD_TOKENS) -> Path:
    """Build out_dir from local files (source: a folder or a glob) or, without a source, from
    FineWeb-Edu's sample on the Hub (`shards` parquet files of it, 0 = all); a no-op when already
    built from the same inputs."""
    out_dir, workers = Path(out_dir), workers or default_workers()
    settings = {"format": CORPUS_FORMAT, "dataset": "corpus", "tokenizer": "gpt2",
                "shard_tokens": shard_tokens}
    if source:
        files, inputs, source_url = local_inputs(source, shards, settings)
    else:
        listing, inputs, source_url = hub_inputs(out_dir, shards, settings)
    meta = prepared(out_dir, inputs)
    if meta:
        print(f"{summary(out_dir, meta)} (already prepared from the same inputs; nothing to do)")
        return out_dir
    with locked(out_dir):
        # a meta.json of other inputs must not vouch for new shards
        (out_dir / "meta.json").unlink(missing_ok=True)
        if not source:
            files = hub_files(listing, out_dir)
        progress = build_shards(name, files, out_dir, inputs, shard_tokens, workers)
        meta = corpus_meta(progress, source_url, inputs)
        write_json(out_dir / "meta.json", meta)
    print(summary(out_dir, meta), flush=True)
    return out_dir
