"""Build a data set into data/<name>/: train.bin and val.bin (token ids) and meta.json.

    python prepare.py shakespeare_char                # TinyShakespeare by character (vocab 65)
    python prepare.py shakespeare                     # the same text in GPT-2 BPE (tiktoken)
    python prepare.py shakespeare_bpe                 # the same text in a BPE of its own (bpe:2048)
    python prepare.py tinytalks                       # TinyTalks Q&A pairs by character
    python prepare.py shakespeare_byte                # both as UTF-8 bytes: one vocabulary, to
    python prepare.py tinytalks_byte                  #   pretrain on one and tune on the other
    python prepare.py tinytalks_chat                  # TinyTalks' Q/A pairs as conversations
    python prepare.py mybook --source=my.txt          # any text [--tokenizer=byte|gpt2|bpe:N]
    python prepare.py mychat --source=chats.jsonl     # conversations [--max_tokens=N]
    python prepare.py reverse                         # attention tasks: reverse, copy, mixed
    python prepare.py fineweb_edu --shards=1          # FineWeb-Edu's 10B sample: 1 of 14 files
    python prepare.py myweb --source='web/*.parquet'  # your corpus: .parquet/.jsonl/.txt files

Downloads come from pinned URLs and must match their pinned sha256; --source=PATH_OR_URL reads
a local copy or another URL instead (for tinytalks: a folder holding splits/train.txt etc.). A data
set already built from the same inputs is left as it is. The builders: tinygpt/datasets.py;
corpora are tokenized by --workers processes into token shards (train_000.bin, ..., val_000.bin),
resumed if interrupted, one prepare per folder at a time: tinygpt/corpus.py, docs/data.md. Only
this command builds a corpus (train.py builds a small data set that is missing, never a corpus).

Conversations: a .jsonl file (or a folder of them), one {"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}, ...]} a line: system optional and first, then user and assistant
alternating, ending with the assistant. A line that is not one is an error naming the file and
the line; a conversation longer than --max_tokens tokens (1024 by default) is left out and counted
in meta.json. --seed draws the val split (a tenth of the conversations). The chat template and the
loss on the assistant's turns: tinygpt/chat.py, docs/tinybot.md.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from tinygpt.common import DataError, must, run_cli
from tinygpt.corpus import SHARD_TOKENS, prepare_corpus
from tinygpt.datasets import DATASETS, is_corpus, prepare


@dataclass
class PrepareConfig:
    dataset: str = ""          # shakespeare_char, shakespeare, tinytalks, a task, fineweb_edu, ...
    source: str = ""           # local file/folder/glob or URL instead of the pinned download
    tokenizer: str = ""        # your text: 'char' (default), 'byte', 'gpt2', 'bpe:N' (learned)
    seed: int | None = None    # reverse/copy/mixed, conversations' val split (default 1337)
    data_dir: str = "data"     # the data set goes to data_dir/dataset
    shards: int = 0            # fineweb_edu: how many of the Hub's 14 parquet files (0 = all)
    workers: int = 0           # corpora: tokenizing processes (0 = one per CPU core)
    shard_tokens: int = 0      # corpora: tokens per shard file (0 = 100M)
    max_tokens: int = 0        # conversations: leave out (and count) longer ones (0 = 1024)

    def __post_init__(self):
        must(self.dataset, "name a data set: python prepare.py NAME (one of "
                           f"{', '.join(DATASETS)}, or your own with --source=FILE)")
        must(self.tokenizer in ("", "char", "byte", "gpt2") or self.tokenizer.startswith("bpe:"),
             f"tokenizer={self.tokenizer!r}: use char, byte, gpt2 or bpe:N (a BPE of N tokens "
             "learned from the text)")
        for name in ("shards", "workers", "shard_tokens", "max_tokens"):
            must(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must not be negative")


def build(cfg) -> Path:
    """A corpus through the shard builder (corpus.py), any other data set through datasets.py."""
    name, source = cfg.dataset, cfg.source or None
    if is_corpus(name, source):
        if cfg.tokenizer not in ("", "gpt2") or cfg.seed is not None:
            raise DataError(f"{name} is a corpus, always tokenized by gpt2; drop "
                            "--tokenizer/--seed")
        return prepare_corpus(name, source, Path(cfg.data_dir) / name, cfg.shards, cfg.workers,
                              cfg.shard_tokens or SHARD_TOKENS)
    if cfg.shards or cfg.workers or cfg.shard_tokens:
        raise DataError("--shards, --workers and --shard_tokens are for corpora: fineweb_edu, or "
                        "--source=FOLDER or a glob of .parquet/.jsonl/.txt files")
    return prepare(name, source, cfg.data_dir, cfg.tokenizer or None, cfg.seed, cfg.max_tokens)


def main(argv) -> int:
    args = [f"--dataset={a}" if not a.startswith("-") else a for a in argv]  # the bare NAME
    usage = "usage: python prepare.py NAME [--key=value ...]"
    return run_cli(PrepareConfig, args, usage, __doc__, build, (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
