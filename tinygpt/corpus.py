"""A web corpus built into data/<name>/ as fixed-size token shards (prepare.py hands corpora here):
FineWeb-Edu's 10B-token sample from the Hugging Face Hub (`python prepare.py fineweb_edu [--shards=N]`), or
local files (`--source=FOLDER_OR_GLOB`): .parquet (a `text` column), .jsonl (a `text` field per line),
.txt (one document per file).

Documents stream from the files in sorted order, in batches of about BATCH_CHARS characters; `workers`
processes tokenize the batches (GPT-2 BPE, every document followed by <|endoftext|>) and this process
writes their tokens in document order into shards of shard_tokens little-endian uint16 ids: val_000.bin
first (the held-out split is that one whole shard), then train_000.bin, train_001.bin, ... (the last one
may be shorter). Memory holds a few batches in flight, whatever the corpus size.

A shard is written to a temporary file and renamed when whole; then progress.json records the shards done
and where the next one starts (file, document, tokens of that document already written). A rerun with the
same inputs resumes there and writes the same bytes an uninterrupted run writes. meta.json comes last.
A document that is not UTF-8 text (or a null `text`) is skipped and counted in meta.json.
"""
import glob
import json
import logging
import os
import sys
import time
from collections import deque
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
    """The corpus files of a folder (searched recursively) or a glob, sorted, each checked readable."""
    pattern = str(source)
    if Path(pattern).is_dir():
        found = [p for p in Path(pattern).rglob("*") if p.is_file()]
    else:
        found = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
    files = sorted(p for p in found if p.suffix in FORMATS)
    if not files:
        raise DataError(f"--source={source}: no {', '.join(FORMATS)} files there; give a folder or a glob of them")
    for path in files:
        check_readable(path)
    return files


def check_readable(path):
    """Refuse, before anything is written, a file that is empty, not parquet, or without a text column."""
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; remove it from the corpus folder")
    if path.suffix != ".parquet":
        return
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({first_line(e)}); download it again or remove it"
                        ) from None
    if "text" not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no `text` column (it has: {', '.join(parquet.schema_arrow.names)}); "
                        "the corpus reads documents from a column named text")
    if parquet.metadata.num_rows == 0:
        raise DataError(f"{path} holds no documents (0 rows); remove it from the corpus folder")


def first_line(err) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__


def hub_listing(shards) -> list:
    """[(path, url, sha256)] of the first `shards` parquet files (0 = all) of FineWeb-Edu's sample at the
    pinned revision, as the Hub lists them. HF_ENDPOINT points at a mirror (or a test server)."""
    from huggingface_hub import HfApi, hf_hub_url
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    repo, folder, revision = FINEWEB_EDU["repo"], FINEWEB_EDU["folder"], FINEWEB_EDU["revision"]
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its retries' warnings: the error below says it in one line
    try:
        entries = list(HfApi(endpoint=endpoint).list_repo_tree(repo, folder, revision=revision, repo_type="dataset"))
    except Exception as e:  # huggingface_hub raises its own, httpx's or requests' errors, by version
        raise DataError(f"could not list {repo}/{folder} on {endpoint} ({type(e).__name__}: {first_line(e)}); "
                        "check the network (or HF_ENDPOINT), or pass --source=FOLDER with local parquet files"
                        ) from None
    finally:
        hub_log.setLevel(level)
    files = sorted((e for e in entries if e.path.endswith(".parquet")), key=lambda e: e.path)
    if not files or shards > len(files):
        raise DataError(f"--shards={shards}, but {repo}/{folder} at {revision[:10]} lists {len(files)} parquet files")
    listing = []
    for entry in files[:shards or len(files)]:
        if getattr(entry, "lfs", None) is None:
            raise DataError(f"the Hub publishes no sha256 for {entry.path}; it cannot be verified, so it is not used")
        url = hf_hub_url(repo, entry.path, repo_type="dataset", revision=revision, endpoint=endpoint)
        listing.append((entry.path, url, entry.lfs.sha256))
    return listing


def hub_files(listing, out_dir) -> list:
    """The listed files, each downloaded to out_dir/download/ and checked against the Hub's sha256."""
    return [download(url, out_dir / "download" / Path(path).name, sha256) for path, url, sha256 in listing]


# ---------------------------------------------------------------------------------- documents

def decoded(raw) -> str | None:
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def parquet_texts(path, start):
    """(text, share of the file read) of each row of a parquet file's `text` column from row `start` on, read
    in record batches; the whole row groups before `start` are skipped unread."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = pq.ParquetFile(path)
    rows, group, skipped = parquet.metadata.num_rows, 0, 0
    while group < parquet.num_row_groups and skipped + parquet.metadata.row_group(group).num_rows <= start:
        skipped += parquet.metadata.row_group(group).num_rows
        group += 1
    if group == parquet.num_row_groups:
        return
    row, drop = start, start - skipped
    for batch in parquet.iter_batches(PARQUET_ROWS, row_groups=range(group, parquet.num_row_groups), columns=["text"]):
        column = batch.column(0).slice(drop)
        drop = max(0, drop - len(batch))
        for raw in column.cast(pa.large_binary()).to_pylist():  # bytes: text that is not UTF-8 is skipped, not fatal
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
            if index <= start:
                continue
            text = decoded(line)
            if text is not None:
                try:
                    text = json.loads(text)["text"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{path}:{number} is not a JSON object with a `text` field; fix or remove "
                                    "that line") from None
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: `text` is {type(text).__name__}, not a string")
            yield text, f.tell() / size


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
        for index, (text, share) in enumerate(READERS[files[file].suffix](files[file], first), first):
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

ENCODING = None


def start_worker():
    global ENCODING
    from tinygpt.tokenizer import GPT2Tokenizer
    ENCODING = GPT2Tokenizer().encoding


def tokenize(texts) -> tuple:
    """(uint16 token ids of the texts, each followed by <|endoftext|>; tokens per text, 0 for a skipped one)."""
    if ENCODING is None:
        start_worker()
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


def tokenized(batch_iter, workers):
    """(batch, tokens, lengths) in order: in this process for one worker, else through a pool of processes
    with at most 2 batches per worker in flight (the pool's own imap would read the whole corpus ahead)."""
    if workers <= 1:
        for batch in batch_iter:
            yield (batch, *tokenize([d.text for d in batch]))
        return
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(workers, initializer=start_worker) as pool:
        pending = deque()
        for batch in batch_iter:
            pending.append((batch, pool.apply_async(tokenize, ([d.text for d in batch],))))
            if len(pending) >= 2 * workers:
                batch, result = pending.popleft()
                yield (batch, *result.get())
        while pending:
            batch, result = pending.popleft()
            yield (batch, *result.get())


# ------------------------------------------------------------------------------------- shards

def shard_name(number) -> str:
    return "val_000.bin" if number == 0 else f"train_{number - 1:03d}.bin"


class ShardWriter:
    """Tokens in, whole shards out: each written to a temporary file, fsynced and renamed, then recorded in
    progress.json with where the next shard starts."""

    def __init__(self, out_dir, shard_tokens, progress):
        self.out_dir, self.shard_tokens, self.progress = out_dir, shard_tokens, progress
        self.tmp = out_dir / f".{shard_name(len(progress['shards']))}.tmp"
        self.file = open(self.tmp, "wb")
        self.filled = 0

    def write(self, tokens, lengths, batch):
        """Append one batch's tokens; a shard boundary inside it is located to the document and token, and
        the documents before it are counted with that shard."""
        at, counted = 0, 0
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
        """Close the shard (whole, or the corpus's last, shorter one) and record it with the next start."""
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
            self.tmp = self.out_dir / f".{shard_name(len(self.progress['shards']))}.tmp"
            self.file, self.filled = open(self.tmp, "wb"), 0

    def fail(self, err):
        self.close()
        done = len(self.progress["shards"])
        raise DataError(f"could not write {self.out_dir} ({err.strerror or err}); free some space (a shard takes "
                        f"{2 * self.shard_tokens:,} bytes) and run the same command again: it resumes after the "
                        f"{done} shard(s) already written") from None

    def close(self):
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def next_start(lengths, batch, at) -> tuple:
    """([file, document, tokens of it already written] of the token at offset `at` of a batch's tokens,
    how many of the batch's documents lie wholly before it)."""
    ends = np.cumsum(lengths)
    i = int(np.searchsorted(ends, at, side="right"))
    if i == len(batch):  # the boundary falls at the batch's end: the next document starts the next shard
        return [batch[-1].file, batch[-1].index + 1, 0], i
    return [batch[i].file, batch[i].index, int(at - (ends[i] - lengths[i]))], i


def resumed_tokens(stream, skip):
    """The tokenized stream with the first `skip` tokens of its first document dropped."""
    for batch, tokens, lengths in stream:
        if skip:
            tokens, lengths = tokens[skip:], lengths.copy()
            lengths[0] -= skip
            skip = 0
        yield batch, tokens, lengths


# ----------------------------------------------------------------------------------- progress

def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def saved_progress(out_dir, inputs) -> dict:
    """What an earlier run of the same inputs finished (its shards still whole on disk), else a fresh start."""
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
        print(f"{self.name}: {progress['documents']:,} documents, {tokens:,} tokens, {rate:,.0f} tokens/s, "
              f"{100 * done:.0f}% of the input, ETA {eta / 60:.1f} min", flush=True)


# --------------------------------------------------------------------------------------- main

def build_shards(name, files, out_dir, inputs, shard_tokens, workers) -> dict:
    """Tokenize the files into out_dir's shards, resuming an earlier run of the same inputs; the progress
    record of the whole corpus."""
    progress = saved_progress(out_dir, inputs)
    if progress["shards"]:
        print(f"{out_dir}: resuming after {len(progress['shards'])} shard(s) written by an earlier run", flush=True)
    file, index, skip = progress["next"]
    docs = documents(files, (file, index))
    stream = resumed_tokens(tokenized(batches(docs), workers), skip)
    writer, shown = ShardWriter(out_dir, shard_tokens, progress), Progress(name, progress)
    try:
        for batch, tokens, lengths in stream:
            writer.write(tokens, lengths, batch)
            written = sum(n for _, n in progress["shards"]) + writer.filled
            shown.show(progress, written, batch[-1].done)
        if len(progress["shards"]) == 0:
            raise DataError(f"{name}: the corpus holds {writer.filled:,} tokens, fewer than the {shard_tokens:,} of "
                            "the val shard, and none left to train on; add documents or lower --shard_tokens")
        if writer.filled:
            writer.finish([len(files), 0, 0], last=True)
    finally:
        writer.close()
    if len(progress["shards"]) < 2:
        raise DataError(f"{name}: the corpus fills only the val shard ({shard_tokens:,} tokens), none is left to "
                        "train on; add documents or lower --shard_tokens")
    shown.show(progress, sum(n for _, n in progress["shards"]), 1.0, force=True)
    return progress


def corpus_meta(progress, source_url, inputs) -> dict:
    shards = {split: [[n, t] for n, t in progress["shards"] if n.startswith(split)] for split in ("train", "val")}
    return {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
            "train_tokens": sum(t for _, t in shards["train"]), "val_tokens": sum(t for _, t in shards["val"]),
            "shards": shards, "documents": progress["documents"], "skipped_documents": progress["skipped"],
            "source_url": source_url, "inputs": inputs}


def prepared(out_dir, inputs):
    """meta.json of a complete corpus built from exactly these inputs, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        whole = all((out_dir / n).stat().st_size == 2 * t for split in meta["shards"].values() for n, t in split)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return meta if whole and meta.get("inputs") == inputs else None


def summary(out_dir, meta) -> str:
    skipped = meta["skipped_documents"]
    return (f"{out_dir}: {meta['documents']:,} documents ({skipped:,} skipped: not UTF-8 text), vocab "
            f"{meta['vocab_size']:,}, train {meta['train_tokens']:,} tokens in {len(meta['shards']['train'])} "
            f"shard(s), val {meta['val_tokens']:,} tokens in {len(meta['shards']['val'])}")


def prepare_corpus(name, source, out_dir, shards=0, workers=0, shard_tokens=SHARD_TOKENS) -> Path:
    """Build out_dir from local files (source: a folder or a glob) or, without a source, from FineWeb-Edu's
    sample on the Hub (`shards` parquet files of it, 0 = all); a no-op when already built from the same inputs."""
    out_dir = Path(out_dir)
    if not workers:  # one per CPU core this process may use
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = {"format": CORPUS_FORMAT, "dataset": "corpus", "tokenizer": "gpt2", "shard_tokens": shard_tokens}
    if source:
        if shards:
            raise DataError("--shards picks files of FineWeb-Edu on the Hub; with --source the folder or glob "
                            "chooses the files")
        files = local_files(source)
        root = Path(source) if Path(source).is_dir() else Path(os.path.commonpath([p.parent for p in files]))
        inputs = {**settings, "files": {p.relative_to(root).as_posix(): [p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in files}}
        source_url = str(Path(source).resolve()) if Path(source).is_dir() else str(source)
    else:
        listing = hub_listing(shards)
        inputs = {**settings, "files": {path: sha256 for path, _, sha256 in listing}}
        source_url = f"https://huggingface.co/datasets/{FINEWEB_EDU['repo']}/tree/{FINEWEB_EDU['revision']}/" \
                     f"{FINEWEB_EDU['folder']}"
    meta = prepared(out_dir, inputs)
    if meta:
        print(f"{summary(out_dir, meta)} (already prepared from the same inputs; nothing to do)")
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").unlink(missing_ok=True)  # a meta.json of other inputs must not vouch for new shards
    if not source:
        files = hub_files(listing, out_dir)
    progress = build_shards(name, files, out_dir, inputs, shard_tokens, workers)
    meta = corpus_meta(progress, source_url, inputs)
    write_json(out_dir / "meta.json", meta)
    print(summary(out_dir, meta), file=sys.stdout, flush=True)
    return out_dir
