"""Build a data set into data/<name>/: train.bin and val.bin (token ids) and meta.json.

    python prepare.py shakespeare_char                    # TinyShakespeare by character (vocab 65)
    python prepare.py shakespeare                         # the same text in GPT-2 BPE (tiktoken)
    python prepare.py tinytalks                           # TinyTalks Q&A pairs by character
    python prepare.py shakespeare_byte                    # TinyShakespeare, TinyTalks as UTF-8 bytes: one
    python prepare.py tinytalks_byte                      #   shared vocabulary, to pretrain on one, tune on the other
    python prepare.py tinytalks_chat                      # TinyTalks' Q/A pairs as conversations
    python prepare.py mybook --source=my.txt              # any text file [--tokenizer=byte|gpt2]
    python prepare.py mychat --source=chats.jsonl         # conversations [--max_tokens=N]
    python prepare.py reverse                             # the attention tasks: reverse, copy, mixed [--seed=N]
    python prepare.py fineweb_edu --shards=1              # FineWeb-Edu's 10B sample from the Hub (14 files; 0 = all)
    python prepare.py myweb --source='web/*.parquet'      # your corpus: a folder or glob of .parquet/.jsonl/.txt

Downloads come from pinned URLs and must match their pinned sha256; --source=PATH_OR_URL reads a local
copy or another URL instead (for tinytalks: a folder holding splits/train.txt etc.). A data set already
built from the same inputs is left as it is. The builders are in tinygpt/datasets.py; corpora are tokenized
by --workers processes into token shards (train_000.bin, ..., val_000.bin), resumed if interrupted:
tinygpt/corpus.py, docs/data.md.

Conversations: a .jsonl file (or a folder of them), one {"messages": [{"role": "system"|"user"|
"assistant", "content": "..."}, ...]} a line: system optional and first, then user and assistant
alternating, ending with the assistant. A line that is not one is an error naming the file and the
line; a conversation longer than --max_tokens tokens (1024 by default) is left out and counted in
meta.json. --seed draws the val split (a tenth of the conversations). The chat template and the loss
on the assistant's turns: tinygpt/chat.py, docs/tinybot.md.
"""
import sys
from dataclasses import dataclass

from tinygpt.common import DataError
from tinygpt.datasets import DATASETS, prepare
from tinygpt.options import must, run_cli
from tinygpt.tokenizer import TOKENIZERS


@dataclass
class PrepareConfig:
    dataset: str = ""            # shakespeare_char, shakespeare, tinytalks, *_byte, the tasks, fineweb_edu, or yours
    source: str = ""             # local file/folder/glob or URL instead of the pinned download (required for your own)
    tokenizer: str = ""          # for your own text: 'char' (default), 'byte' or 'gpt2'
    seed: int | None = None      # reverse/copy/mixed, conversations' val split (default 1337)
    data_dir: str = "data"       # the data set goes to data_dir/dataset
    shards: int = 0              # fineweb_edu: how many of the Hub's parquet files (0 = all 14, ~10B tokens)
    workers: int = 0             # corpora: tokenizing processes (0 = one per CPU core)
    shard_tokens: int = 0        # corpora: tokens per shard file (0 = 100M)
    max_tokens: int = 0          # conversations: leave out (and count) longer ones (0 = 1024)

    def __post_init__(self):
        must(self.dataset, f"name a data set: python prepare.py NAME (one of {', '.join(DATASETS)}, or your own "
                           "with --source=FILE)")
        must(self.tokenizer in ("", *TOKENIZERS), f"tokenizer={self.tokenizer!r}: use char, byte or gpt2")
        for name in ("shards", "workers", "shard_tokens", "max_tokens"):
            must(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must not be negative")


def main(argv) -> int:
    args = [f"--dataset={a}" if not a.startswith("-") else a for a in argv]  # the bare NAME
    return run_cli(PrepareConfig, args, "usage: python prepare.py NAME [--key=value ...]", __doc__,
                   lambda cfg: prepare(cfg.dataset, cfg.source or None, cfg.data_dir, cfg.tokenizer or None, cfg.seed,
                                       cfg.shards, cfg.workers, cfg.shard_tokens, cfg.max_tokens),
                   (DataError, OSError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
