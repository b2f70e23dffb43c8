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

from tinygpt.chat import (
    ChatTemplate,
    conversation_files,
    conversations_text,
    looks_like_conversations,
    qa_conversations,
    read_conversations,
)
from tinygpt.common import DataError, atomic_write
from tinygpt.download import download, is_url, sha256_of
from tinygpt.tokenizer import bpe_size, make_tokenizer, train_bpe


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
MAX_TOKENS = 1024             # longer conversations are left out (and counted)
VAL_SHARE = 0.1               # of a file's conversations, drawn with the seed, for validation

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
    extra = {"test_file": "test.txt", "chars": len(train) + len(val), "test_chars": len(test)}
    return tok, train, val, extra, {"test.txt": test}


def rendered_split(template, tok, conversations, max_tokens) -> tuple:
    """(ids, mask, starts, where of the conversations left out) of one split: the conversations
    rendered one after the other, the mask 1 on the tokens the loss is on, starts[i] where
    conversation i starts (then the end); a conversation longer than max_tokens is left out."""
    ids, mask, starts, skipped = [], [], [0], []
    for where, messages in conversations:
        conversation, scored = template.render(tok, messages)
        if len(conversation) > max_tokens:
            skipped.append(where)
            continue
        ids += conversation
        mask += scored
        starts.append(len(ids))
    return ids, mask, starts, skipped


def conversation_splits(splits, kind, max_tokens, test=None):
    """The builder every conversations data set goes through: {"train": [(where, messages)],
    "val": ...} rendered with the chat template; ids for the bins, each split's mask and
    starts as extra files, and the template, counts and left-out conversations in meta.json.
    test (conversations, never trained on) is written as test.jsonl for the final report."""
    text = conversations_text(splits["train"] + splits["val"] + (test or []))
    tok = make_tokenizer(kind, sorted(set(text)))
    template, vocab_size = ChatTemplate.for_tokenizer(tok)
    ids, files, skipped, counts = {}, {}, [], {}
    for split, conversations in splits.items():
        ids[split], mask, starts, left_out = rendered_split(template, tok, conversations,
                                                            max_tokens)
        if len(starts) < 2:
            raise DataError(f"no {split} conversation is {max_tokens} tokens or shorter; "
                            "raise --max_tokens")
        files[f"{split}_mask.bin"] = np.array(mask, dtype=np.uint8).tobytes()
        files[f"{split}_starts.bin"] = np.array(starts, dtype="<u8").tobytes()
        skipped += left_out
        counts[split] = len(starts) - 1
    extra = {"answer_loss": True, "chat_template": template.to_meta(), "vocab_size": vocab_size,
             "text_vocab_size": tok.vocab_size, "conversations": counts,
             "answer_files": {split: {"starts": f"{split}_starts.bin", "mask": f"{split}_mask.bin"}
                              for split in ids},
             "max_tokens": max_tokens, "left_out_too_long": len(skipped),
             "left_out_first": skipped[:5]}
    if test:
        extra["test_file"] = "test.jsonl"
        files["test.jsonl"] = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n"
                                      for _, m in test)
    return tok, ids["train"], ids["val"], extra, files


def conversations_texts(paths, kind, seed, max_tokens):
    """A conversations file (or folder of files), split by conversation: VAL_SHARE of them, drawn
    with the seed, for validation (at least one), the rest for training."""
    conversations = [c for path in paths for c in read_conversations(path)]
    if len(conversations) < 2:
        raise DataError(f"{paths[0]} holds {len(conversations)} conversation; give at least 2 "
                        "(one is held out)")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * VAL_SHARE))
    val = [conversations[i] for i in sorted(order[:n_val])]
    train = [conversations[i] for i in sorted(order[n_val:])]
    return conversation_splits({"train": train, "val": val}, kind, max_tokens)


def chat_texts(files, kind, max_tokens):
    """tinytalks_chat: TinyTalks' own splits, each Q/A pair a conversation of one question and
    its answer, through the conversations builder; its test pairs become test.jsonl for the
    final report."""
    splits = {s: qa_conversations(read_text(files[f"splits/{s}.txt"]), f"{s}.txt")
              for s in ("train", "val", "test")}
    tok, train, val, extra, written = conversation_splits(
        {"train": splits["train"], "val": splits["val"]}, kind, max_tokens, test=splits["test"])
    return tok, train, val, {**extra, "levels": "tinytalks"}, written


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
    """Encode (unless they are token ids already) and write the bins and extra files, then
    meta.json last: a run cut short leaves no meta.json that claims the data set is complete."""
    dtype = "uint16" if meta.get("vocab_size", tok.vocab_size) <= 65535 else "uint32"
    train_ids = np.array(tok.encode(train) if isinstance(train, str) else train,
                         dtype=f"<u{np.dtype(dtype).itemsize}")
    val_ids = np.array(tok.encode(val) if isinstance(val, str) else val, dtype=train_ids.dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_bytes(out_dir / "train.bin", train_ids.tobytes())
    write_bytes(out_dir / "val.bin", val_ids.tobytes())
    for name, content in files.items():
        write_bytes(out_dir / name, content if isinstance(content, bytes) else content.encode())
    meta = {"tokenizer": tok.kind, **({"vocab": tok.vocab} if tok.kind == "char" else {}),
            "vocab_size": tok.vocab_size, "dtype": dtype,
            "train_tokens": len(train_ids), "val_tokens": len(val_ids),
            **text_bytes(train, val), **meta,
            # the BPE's whole definition: a checkpoint (it stores meta) decodes without this folder
            **({"bpe": tok.json, "tokenizer_file": "tokenizer.json"} if tok.kind == "bpe" else {})}
    text = json.dumps(meta, indent=1, ensure_ascii=False)
    write_bytes(out_dir / "meta.json", text.encode("utf-8"))
    return meta


def text_bytes(train, val) -> dict:
    """The UTF-8 bytes of each split's text, which turn a loss per token into bits per byte
    (data.py); none for conversations, whose template tokens are no text."""
    if not isinstance(train, str):
        return {}
    return {"train_bytes": len(train.encode("utf-8")), "val_bytes": len(val.encode("utf-8"))}


def prepared_meta(out_dir, inputs):
    """The meta.json of a complete data set built from exactly these inputs, else None."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        itemsize = np.dtype(meta["dtype"]).itemsize
        complete = all((out_dir / f).stat().st_size == meta[k] * itemsize
                       for f, k in (("train.bin", "train_tokens"), ("val.bin", "val_tokens")))
        extra_files = [meta.get("test_file"), meta.get("tokenizer_file"),
                       *(f for files in meta.get("answer_files", {}).values()
                         for f in files.values())]
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
        counts = meta["conversations"]
        first = "".join(f" ({where})" for where in meta["left_out_first"][:1])
        parts.append(f"{counts['train']:,} train / {counts['val']:,} val conversations, loss on "
                     f"the assistant's turns; {meta['left_out_too_long']} left out for being "
                     f"longer than --max_tokens={meta['max_tokens']}{first}")
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
    if name not in TASKS and seed is not None and not is_conversations(name, source):
        raise DataError(f"--seed only applies to the generated tasks ({', '.join(TASKS)}) and to "
                        f"conversations (it draws their val split), not to {name}")


def is_conversations(name, source) -> bool:
    """tinytalks_chat, or your own name with a conversations .jsonl file or folder as its
    source."""
    if name == "tinytalks_chat":
        return True
    return bool(name not in DATASETS and source and not is_url(source)
                and looks_like_conversations(source))


def is_corpus(name, source) -> bool:
    """fineweb_edu, or your own name with a folder, a glob, or a .parquet/.jsonl file as its
    source."""
    if (name in CORPORA or not source or name in DATASETS or is_url(source)
            or is_conversations(name, source)):
        return name in CORPORA
    folder_or_glob = Path(source).is_dir() or any(c in str(source) for c in "*?[")
    return folder_or_glob or Path(source).suffix in CORPUS_SUFFIXES


def input_hashes(name, source, out_dir, text_path, chat) -> dict:
    """{file: sha256} of the data set's inputs: none for a generated task, the pins for a pinned
    data set (a wrong local copy fails here, even when the data set is built already), else the
    user's text or conversations files."""
    if name in TASKS:
        return {}
    if name in PINNED:
        pinned_files(name, source, out_dir, fetch=False)
        return {pin.path: pin.sha256 for pin in PINNED[name]}
    if chat:
        folder = Path(source).is_dir()
        return {str(path.relative_to(source) if folder else path.name): sha256_of(path)
                for path in conversation_files(source)}
    return {text_path.name: sha256_of(text_path)}


def built_texts(name, source, out_dir, kind, seed, text_path, max_tokens) -> tuple:
    """(tokenizer, train text or ids, val, extra meta, extra files) of the data set, its pinned
    files downloaded first where needed; max_tokens is set for conversations."""
    if name in TASKS:
        return task_texts(name, seed)
    if max_tokens and name not in PINNED:
        return conversations_texts(conversation_files(source), kind, seed, max_tokens)
    if name not in PINNED:
        return split_90_10(read_text(text_path), kind, text_path)
    files = pinned_files(name, source, out_dir, fetch=True)
    if name == "tinytalks_chat":
        return chat_texts(files, kind, max_tokens)
    if PINNED[name] == TINYTALKS:
        return tinytalks_texts(files, kind)
    return split_90_10(read_text(files["input.txt"]), kind, files["input.txt"])


def prepare(name, source=None, data_dir="data", tokenizer=None, seed=None, max_tokens=0) -> Path:
    """Build data_dir/name/ and return that folder; a no-op when it is already built from the
    same inputs (data file hashes, tokenizer, seed). A name prepare.py does not know is a text
    data set built from the file or URL `source`, or a conversations set (is_conversations:
    JSONL, max_tokens the longest conversation kept, MAX_TOKENS by default). A corpus
    (is_corpus) is refused: it takes hours and many processes, so only `python prepare.py NAME`
    builds it (corpus.prepare_corpus)."""
    if is_corpus(name, source):
        again = f" --source={source}" if source else ""
        raise DataError(f"{name} is a web corpus of token shards; build it first with its own "
                        f"command: python prepare.py {name}{again}")
    check_arguments(name, source, tokenizer, seed)
    source = None if source is None else str(source)
    out_dir = Path(data_dir) / name
    kind = tokenizer or OWN_TOKENIZER.get(name, "char")
    chat = is_conversations(name, source)
    if max_tokens and not chat:
        raise DataError("--max_tokens is for conversations: tinytalks_chat, or "
                        "--source=FILE.jsonl of them")
    max_tokens = (max_tokens or MAX_TOKENS) if chat else None
    seeded = name in TASKS or (chat and name not in PINNED)
    seed = (DEFAULT_SEED if seed is None else seed) if seeded else None
    # the user's text: a URL is fetched once here (nothing pins its content)
    plain = not (name in PINNED or name in TASKS or chat)
    text_path = text_file(source, out_dir) if plain else None
    hashes = input_hashes(name, source, out_dir, text_path, chat)
    dataset = name if name in DATASETS else "conversations" if chat else "text"
    inputs = {"format": FORMAT_VERSION, "dataset": dataset, "tokenizer": kind, "seed": seed,
              "files": hashes, **({"max_tokens": max_tokens} if chat else {})}
    meta = prepared_meta(out_dir, inputs)
    if meta:
        print(f"{summary(out_dir, meta)} (already prepared from the same inputs; nothing to do)")
        return out_dir
    tok, train, val, extra, files = built_texts(name, source, out_dir, kind, seed, text_path,
                                                max_tokens)
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
