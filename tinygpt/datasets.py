"""Every small data set the project trains on, built into data/<name>/: train.bin, val.bin,
meta.json (prepare.py is its command line; train.py calls prepare() when a config's data set is
missing).

Real data comes from the URLs pinned here and must match their pinned sha256 (tinygpt/download.py).
A `source` (PATH_OR_URL) reads a local copy or another URL instead (for tinytalks: a folder holding
splits/train.txt etc.); a name this module does not know is a text data set built from the file or
URL `source`. Corpora (fineweb_edu, or a folder or glob of .parquet/.jsonl/.txt files) go to token
shards, built by prepare.py with tinygpt/corpus.py: is_corpus tells them apart, prepare() refuses
them.
"""
import hashlib
import json
import random
from pathlib import Path
from typing import NamedTuple

import numpy as np

from tinygpt.common import DataError, atomic_write
from tinygpt.download import download, is_url, sha256_of
from tinygpt.tokenizer import bpe_size, make_tokenizer, qa_pairs, qa_prompt, train_bpe


class Pin(NamedTuple):
    path: str     # where the file sits under a --source folder (and upstream)
    url: str      # canonical download URL
    sha256: str


TINYTALKS_BASE = ("https://raw.githubusercontent.com/MLSysBook/TinyTorch/"
                  "02364f800abce3507cedbe9b5053078abd92b6d3/datasets/tinytalks")
TINYSHAKESPEARE = (
    Pin("input.txt",
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
)
TINYTALKS = (
    Pin("splits/train.txt", f"{TINYTALKS_BASE}/splits/train.txt",
        "734520b4597276ba75949402962ecb94c5e463ed8af1460eac86fbba2a1922be"),
    Pin("splits/val.txt", f"{TINYTALKS_BASE}/splits/val.txt",
        "938da1b38d15c1f253bd3a6deb4f546df73d6a5e456d1f6220db280118819c1d"),
    Pin("splits/test.txt", f"{TINYTALKS_BASE}/splits/test.txt",
        "4a44d204594c7f0a31202758de75af7fc8a1d17565423004ce8dd9d28bea99cb"),
)
PINNED = {"shakespeare_char": TINYSHAKESPEARE, "shakespeare": TINYSHAKESPEARE,
          "tinytalks": TINYTALKS, "shakespeare_byte": TINYSHAKESPEARE,
          "shakespeare_bpe": TINYSHAKESPEARE, "tinytalks_byte": TINYTALKS,
          "tinytalks_chat": TINYTALKS}
OWN_TOKENIZER = {"shakespeare_char": "char", "shakespeare": "gpt2", "tinytalks": "char",
                 "shakespeare_byte": "byte", "shakespeare_bpe": "bpe:2048",
                 "tinytalks_byte": "byte", "tinytalks_chat": "byte"}
# Q&A data sets trained on their answers only: whole pairs, loss on the answer tokens (data.Batches)
ANSWER_LOSS = {"tinytalks_chat"}

# Attention-proof tasks: (train, test) example counts. Every example is 6 letters, '=', the answer;
# mixed puts a task token first: lowercase 'r' ([R], reverse) or 'c' ([C], copy).
TASKS = {"reverse": (600, 200), "copy": (600, 200), "mixed": (800, 300)}
TASK_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
TASK_WORD_LEN = 6
# One fixed vocabulary for all three tasks, never built from the data, so train and test (and a
# model trained on mixed scored on reverse) always agree on the ids.
TASK_VOCAB = sorted(TASK_LETTERS + "=cr")
DEFAULT_SEED = 1337

# Web corpora go to token shards, built by corpus.py through `python prepare.py NAME` (not from
# here, so that reading this module never imports the corpus builder).
CORPORA = ("fineweb_edu",)
CORPUS_SUFFIXES = (".parquet", ".jsonl")  # one such file (or a folder, or a glob) is a corpus too

DATASETS = [*PINNED, *TASKS, *CORPORA]
FORMAT_VERSION = 2            # bump when the output format changes, so old outputs get rebuilt
# ------------------------------------------------------------------------------------- sources

def pinned_location(pin, source) -> str:
    """Where to read pin from: its canonical URL, the --source URL/file, or a file under
    --source."""
    if source is None:
        return pin.url
    # A --source URL is the file itself for TinyShakespeare, a base URL for tinytalks or when it
    # ends in /.
    if is_url(source):
        single = pin.path == "input.txt" and not source.endswith("/")
        return source if single else f"{source.rstrip('/')}/{pin.path}"
    return str(Path(source) / pin.path) if Path(source).is_dir() else source


def verified_local(path, pin) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--source: {path} not found (expected a copy of {pin.path})")
    got = sha256_of(path)
    if got != pin.sha256:
        raise DataError(f"--source: {path} is not the pinned {pin.path} (sha256 {got}, expected "
                        f"{pin.sha256}); use an unmodified copy, or `python prepare.py mytext "
                        f"--source={path}` for other text")
    return path


def pinned_files(name, source, out_dir, fetch) -> dict:
    """{pin.path: local file} for the data set. Local --source files are always checked; with
    fetch=False nothing is downloaded (the caller only wants to know whether the work is done)."""
    if PINNED[name] == TINYTALKS and source and not is_url(source) and not Path(source).is_dir():
        raise DataError("--source for tinytalks must be a folder holding splits/train.txt, "
                        f"val.txt, test.txt; got {source}")
    files = {}
    for pin in PINNED[name]:
        where = pinned_location(pin, source)
        if not is_url(where):
            files[pin.path] = verified_local(where, pin)
        elif fetch:  # downloads land in data/<name>/ under the file's own name
            files[pin.path] = download(where, out_dir / Path(pin.path).name, pin.sha256)
    return files


def text_file(source, out_dir) -> Path:
    """The user's text file: the local path itself, or the URL downloaded to out_dir/input.txt.
    An unpinned URL is fetched every time: nothing says its content is unchanged."""
    if is_url(source):
        return download(source, out_dir / "input.txt")
    if not Path(source).is_file():
        raise DataError(f"--source: {source} not found; give the path of a text file or an "
                        "http(s) URL")
    return Path(source)


def read_text(path) -> str:
    try:
        text = Path(path).read_bytes().decode("utf-8")  # bytes, so '\r\n' is kept exactly
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. with "
                        "iconv -t utf-8") from None
    if not text:
        raise DataError(f"{path} is empty; give a file with some text in it")
    return text


# ------------------------------------------------------------------------------------ builders
# Each returns (tokenizer, train text, val text, extra meta, extra files to write next to the bins).

def split_90_10(text, kind, origin):
    """First 90% of the characters for training, the last 10% for validation, as nanoGPT does,
    so losses compare with its published numbers. A BPE (kind 'bpe:N') learns from the train part
    only."""
    n = int(len(text) * 0.9)
    if n == 0 or n == len(text):
        raise DataError(f"{origin} has only {len(text)} character(s), too few to split 90/10 "
                        "into train and val")
    if kind.startswith("bpe:"):
        tok = train_bpe(text[:n], bpe_size(kind))
        return tok, text[:n], text[n:], {"chars": len(text)}, {"tokenizer.json": tok.json}
    tok = make_tokenizer(kind, sorted(set(text)))
    return tok, text[:n], text[n:], {"chars": len(text)}, {}


def tinytalks_texts(files, kind):
    """TinyTalks' own splits, byte for byte ("Q: ...\\nA: ...\\n\\n"); test.txt is copied next to
    the bins for evaluation and never trained on."""
    train, val, test = (read_text(files[f"splits/{s}.txt"]) for s in ("train", "val", "test"))
    tok = make_tokenizer(kind, sorted(set(train + val)))
    try:
        tok.encode(test)
    except ValueError as e:
        raise DataError(f"tinytalks test.txt: {e} (built from train+val)") from None
    extra = {"qa": True, "test_file": "test.txt", "chars": len(train) + len(val),
             "test_chars": len(test)}
    return tok, train, val, extra, {"test.txt": test}


def pair_index(tok, text) -> tuple:
    """(text rebuilt from its pairs, (n, 3) uint32 token offsets of each pair: question start,
    answer start, answer end). The answer is " <answer>\n", what follows "A:" up to and with the
    newline that ends it, so a model trained on it learns where to stop; the pair's blank line
    after it is not scored."""
    rows, pieces, at = [], [], 0
    for question, answer in qa_pairs(text):
        prompt, reply = tok.encode(qa_prompt(question)), tok.encode(f" {answer}\n")
        rows.append((at, at + len(prompt), at + len(prompt) + len(reply)))
        pieces.append(f"{qa_prompt(question)} {answer}\n\n")
        at = rows[-1][2] + len(tok.encode("\n"))
    rebuilt = "".join(pieces)
    if not rows or len(tok.encode(rebuilt)) != at:  # a tokenizer that merges across pieces (BPE)
        raise DataError("no Q/A pairs found, or the tokenizer does not split them at their edges")
    return rebuilt, np.array(rows, dtype="<u4")


def chat_texts(files, kind):
    """tinytalks_chat: TinyTalks' splits rebuilt pair by pair, with pair_index's offsets in
    {train,val}_pairs.bin, so batches are whole pairs with the loss on their answers."""
    tok, train, val, extra, texts = tinytalks_texts(files, kind)
    (train, train_pairs), (val, val_pairs) = pair_index(tok, train), pair_index(tok, val)
    extra = {**extra, "answer_loss": True, "train_pairs": len(train_pairs),
             "val_pairs": len(val_pairs),
             "pairs_files": {"train": "train_pairs.bin", "val": "val_pairs.bin"}}
    pairs = {"train_pairs.bin": train_pairs.tobytes(), "val_pairs.bin": val_pairs.tobytes()}
    return tok, train, val, extra, {**texts, **pairs}


def distinct_words(count, rng) -> list:
    """count different random 6-letter words; drawing them all at once keeps test prompts out of
    train."""
    words, seen = [], set()
    while len(words) < count:
        word = "".join(rng.choice(TASK_LETTERS) for _ in range(TASK_WORD_LEN))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def task_example(op, word) -> str:
    return f"{word}={word[::-1] if op == 'r' else word}"


def task_examples(task, words, rng) -> list:
    if task != "mixed":
        return [task_example(task[0], w) for w in words]
    ops = ["r", "c"] * (len(words) // 2)  # exactly half reverse, half copy, in random order
    rng.shuffle(ops)
    return [op + task_example(op, w) for op, w in zip(ops, words)]


def task_texts(task, seed):
    n_train, n_test = TASKS[task]
    rng = random.Random(seed)
    words = distinct_words(n_train + n_test, rng)
    train = task_examples(task, words[:n_train], rng)
    test = task_examples(task, words[n_train:], rng)
    extra = {"task": task, "example_len": len(train[0]), "prompt_len": train[0].index("=") + 1,
             "train_examples": n_train, "val_examples": n_test, "seed": seed}
    return make_tokenizer("char", TASK_VOCAB), "".join(train), "".join(test), extra, {}


# -------------------------------------------------------------------------------------- output

def write_bytes(path, data: bytes):
    atomic_write(path, lambda f: f.write(data))


def write_dataset(out_dir, tok, train, val, meta, files) -> dict:
    """Encode and write the bins and extra files, then meta.json last: a run cut short leaves no
    meta.json that claims the data set is complete."""
    dtype = "uint16" if tok.vocab_size <= 65535 else "uint32"
    train_ids = np.array(tok.encode(train), dtype=f"<u{np.dtype(dtype).itemsize}")
    val_ids = np.array(tok.encode(val), dtype=train_ids.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / "train.bin", train_ids.tobytes())
    write_bytes(out_dir / "val.bin", val_ids.tobytes())
    for name, content in files.items():
        write_bytes(out_dir / name, content if isinstance(content, bytes) else content.encode())
    meta = {"tokenizer": tok.kind, **({"vocab": tok.vocab} if tok.kind == "char" else {}),
            "vocab_size": tok.vocab_size, "dtype": dtype,
            "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            # the UTF-8 bytes the tokens decode to: a loss per token becomes bits per byte (data.py)
            "train_bytes": len(train.encode("utf-8")), "val_bytes": len(val.encode("utf-8")),
            **meta,
            # the BPE's whole definition: a checkpoint (it stores meta) decodes without this folder
            **({"bpe": tok.json, "tokenizer_file": "tokenizer.json"} if tok.kind == "bpe" else {})}
    write_bytes(out_dir / "meta.json", json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8"))
    return meta


def prepared_meta(out_dir, inputs):
    """The meta.json of a complete data set built from exactly these inputs, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = all((out_dir / f).stat().st_size == meta[k] * itemsize
                       for f, k in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")))
        extra_files = [meta.get("test_file"), meta.get("tokenizer_file"),
                       *meta.get("pairs_files", {}).values()]
        complete = complete and all((out_dir / f).is_file() for f in extra_files if f)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta if complete and meta.get("inputs") == inputs else None


def summary(out_dir, meta) -> str:
    parts = [f"vocab {meta['vocab_size']:,}", f"train {meta['train_tokens']:,} tokens",
             f"val {meta['val_tokens']:,} tokens"]
    if "chars" in meta:
        parts.insert(0, f"{meta['chars']:,} characters")
    if "train_bytes" in meta:
        train, val = (meta[f"{s}_bytes"] / max(1, meta[f"{s}_tokens"]) for s in ("train", "val"))
        parts.append(f"{train:.2f} / {val:.2f} bytes per token (train / val)")
    if meta.get("answer_loss"):
        parts.append(f"{meta['train_pairs']} train / {meta['val_pairs']} val Q/A pairs, loss on "
                     "the answers")
    if "task" in meta:
        parts.insert(0, f"{meta['train_examples']} train / {meta['val_examples']} test examples of "
                        f"{meta['example_len']} tokens (prompt {meta['prompt_len']})")
    return f"{out_dir}: {', '.join(parts)}"


def source_meta(name, source, hashes, text) -> dict:
    """meta.json's source_url and source_sha256: where the data came from (for tinytalks the
    folder, with the hash of the train.txt it trains on; every file's hash is in inputs.files)."""
    if name in TASKS:
        return {"source_url": "generated",
                "source_sha256": hashlib.sha256(text.encode()).hexdigest()}
    if source is None:
        url = TINYTALKS_BASE if PINNED[name] == TINYTALKS else PINNED[name][0].url
    else:
        url = source if is_url(source) else str(Path(source).resolve())
    return {"source_url": url, "source_sha256": next(iter(hashes.values()))}


# ----------------------------------------------------------------------------------------- main

def check_arguments(name, source, tokenizer, seed):
    if name not in DATASETS and not source:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or build "
                        f"your own from a text file: python prepare.py {name} --source=FILE_OR_URL")
    own = OWN_TOKENIZER.get(name, "")
    if tokenizer and tokenizer.startswith("bpe:"):
        bpe_size(tokenizer)  # a wrong N fails here, before anything is read or downloaded
    another_bpe = own.startswith("bpe:") and (tokenizer or "").startswith("bpe:")
    if own and tokenizer not in (None, own) and not another_bpe:
        raise DataError(f"{name} is always tokenized by {own}; --tokenizer is for your own text "
                        "(TinyShakespeare in GPT-2 BPE is the `shakespeare` data set, in a BPE of "
                        "your own `shakespeare_bpe --tokenizer=bpe:N`)")
    if name in TASKS and (source or tokenizer):
        raise DataError(f"{name} is generated with its own character vocabulary; drop "
                        "--source/--tokenizer")
    if name not in TASKS and seed is not None:
        raise DataError(f"--seed only applies to the generated tasks ({', '.join(TASKS)}), not to "
                        f"{name}")


def is_corpus(name, source) -> bool:
    """fineweb_edu, or your own name with a folder, a glob, or a .parquet/.jsonl file as its
    source."""
    if name in CORPORA or not source or name in DATASETS or is_url(source):
        return name in CORPORA
    folder_or_glob = Path(source).is_dir() or any(c in str(source) for c in "*?[")
    return folder_or_glob or Path(source).suffix in CORPUS_SUFFIXES


def input_hashes(name, source, out_dir, text_path) -> dict:
    """{file: sha256} of the data set's inputs: none for a generated task, the pins for a pinned
    data set (a wrong local copy fails here, even when the data set is built already), else the
    user's text file."""
    if name in TASKS:
        return {}
    if name in PINNED:
        pinned_files(name, source, out_dir, fetch=False)
        return {pin.path: pin.sha256 for pin in PINNED[name]}
    return {text_path.name: sha256_of(text_path)}


def built_texts(name, source, out_dir, kind, seed, text_path) -> tuple:
    """(tokenizer, train text, val text, extra meta, extra files) of the data set, its pinned files
    downloaded first where needed."""
    if name in TASKS:
        return task_texts(name, seed)
    if name not in PINNED:
        return split_90_10(read_text(text_path), kind, text_path)
    files = pinned_files(name, source, out_dir, fetch=True)
    if name in ANSWER_LOSS:
        return chat_texts(files, kind)
    if PINNED[name] == TINYTALKS:
        return tinytalks_texts(files, kind)
    return split_90_10(read_text(files["input.txt"]), kind, files["input.txt"])


def prepare(name, source=None, data_dir="data", tokenizer=None, seed=None) -> Path:
    """Build data_dir/name/ and return that folder; a no-op when it is already built from the same
    inputs (data file hashes, tokenizer, seed). A name prepare.py does not know is a text data set
    built from the file or URL `source`. A corpus (is_corpus) is refused: it takes hours and many
    processes, so only `python prepare.py NAME` builds it (corpus.prepare_corpus)."""
    if is_corpus(name, source):
        again = f" --source={source}" if source else ""
        raise DataError(f"{name} is a web corpus of token shards; build it first with its own "
                        f"command: python prepare.py {name}{again}")
    check_arguments(name, source, tokenizer, seed)
    source = None if source is None else str(source)
    out_dir = Path(data_dir) / name
    kind = tokenizer or OWN_TOKENIZER.get(name, "char")
    seed = (DEFAULT_SEED if seed is None else seed) if name in TASKS else None
    # the user's text: a URL is fetched once here (nothing pins its content)
    text_path = None if name in PINNED or name in TASKS else text_file(source, out_dir)
    hashes = input_hashes(name, source, out_dir, text_path)
    inputs = {"format": FORMAT_VERSION, "dataset": name if name in DATASETS else "text",
              "tokenizer": kind, "seed": seed, "files": hashes}
    meta = prepared_meta(out_dir, inputs)
    if meta:
        print(f"{summary(out_dir, meta)} (already prepared from the same inputs; nothing to do)")
        return out_dir
    tok, train, val, extra, files = built_texts(name, source, out_dir, kind, seed, text_path)
    meta = {**source_meta(name, source, hashes, train + val), **extra, "inputs": inputs}
    print(summary(out_dir, write_dataset(out_dir, tok, train, val, meta, files)))
    return out_dir


def prepare_for_training(name, data_dir, source) -> Path:
    """data_dir/name built for train.py, which found its meta.json missing. A web corpus is
    refused: its hours of work belong in a prepare.py run of its own, not in a training job whose
    other processes wait for it with a timeout."""
    folder = Path(data_dir) / name
    if is_corpus(name, source or None):
        raise DataError(f"{folder} is not prepared; a corpus is built by a run of its own first: "
                        f"python prepare.py {name}" + (f" --source={source}" if source else ""))
    print(f"{folder} is not prepared yet; preparing it", flush=True)
    try:
        return prepare(name, source or None, data_dir)
    except (DataError, OSError) as e:
        hint = " (train.py hands --data_source=PATH_OR_URL to it as --source)"
        hint = hint if "--source" in str(e) else ""
        raise DataError(f"could not prepare {name}: {e}{hint}") from None
