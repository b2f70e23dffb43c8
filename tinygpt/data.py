"""A prepared data set on disk and the batches drawn from it.

data/<name>/ holds train.bin and val.bin (token ids, one flat little-endian stream) and meta.json
(tokenizer, sizes, source), written by datasets.prepare (prepare.py); a corpus holds shards instead
(train_000.bin, ..., val_000.bin, listed in meta.json's "shards"). Batches are drawn from random
generators derived from (seed, stream, step), so a resumed run and any number of processes draw
exactly the batches of one uninterrupted process.
"""
import json
from pathlib import Path

import numpy as np
import torch

from tinygpt.common import DataError
from tinygpt.datasets import prepare

def load_meta(dataset_dir) -> dict:
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; build the data set first: python prepare.py {Path(dataset_dir).name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete {path.parent} and prepare it again") from None


def prepare_if_missing(dataset, data_dir, source) -> Path:
    """data_dir/dataset, built first (as `python prepare.py` would) if its meta.json is missing."""
    folder = Path(data_dir) / dataset
    if (folder / "meta.json").is_file():
        return folder
    print(f"{folder} is not prepared yet; preparing it", flush=True)
    try:
        return prepare(dataset, source or None, data_dir)
    except (DataError, OSError) as e:
        hint = " (train.py hands --data_source=PATH_OR_URL to it as --source)" if "--source" in str(e) else ""
        raise DataError(f"could not prepare {dataset}: {e}{hint}") from None


TRAIN_STREAM, EVAL_STREAM = 0, 1


def batch_rng(seed, stream, step, part=0):
    """The random generator of one step's batches, derived from (seed, stream, step) alone: a resumed
    run draws the same batches as an uninterrupted one, and evaluations (their own stream) never
    shift the training batches."""
    return np.random.default_rng((seed, stream, step, part))


def split_global_batch(accumulation_steps, batch_size, world_size) -> tuple:
    """(micro-steps, sequences per micro-step) of one process, so that world_size processes together
    take the config's global batch of accumulation_steps x batch_size sequences: by micro-steps when
    they divide evenly, else by the sequences of each micro-step."""
    if accumulation_steps % world_size == 0:
        return accumulation_steps // world_size, batch_size
    if batch_size % world_size == 0:
        return accumulation_steps, batch_size // world_size
    raise ValueError(f"the global batch of gradient_accumulation_steps={accumulation_steps} x batch_size={batch_size} "
                     f"cannot be split evenly over {world_size} processes; make either a multiple of {world_size}")


def picks_of_rank(global_picks, rank, world_size) -> np.ndarray:
    """This process's (micro-steps, sequences) share of the global (micro-steps, sequences) picks."""
    steps, rows = split_global_batch(*global_picks.shape[:2], world_size)
    if steps < global_picks.shape[0]:
        return global_picks[rank * steps:(rank + 1) * steps]
    return global_picks[:, rank * rows:(rank + 1) * rows]


class Batches:
    """Batches of token ids from data/<name>/{train,val}.bin, as (x, y) on the device.

    Text: windows of block_size tokens, targets shifted by one. A window lies within one file: a split in
    shards offers each shard's windows one after the other, numbered as one stream's (a pick p is window
    p - first[s] of the shard s whose numbers hold it), so one file is the case of one shard and the
    seeded picks mean the same for both. Task data sets (meta has "task"):
    whole examples of example_len tokens, x = ex[:-1], y = ex[1:], with the targets of the prompt
    set to -1 so the loss falls on the answer only. Conversation data sets ("answer_loss"):
    rows of whole conversations one after the other, the first one at the window's start, the
    targets outside the split's loss mask set to -1 (see starts_of); whole_text=True reads
    them as plain text instead.
    """

    def __init__(self, folder, meta, block_size, device, whole_text=False):
        self.folder, self.meta, self.device = Path(folder), meta, device
        self.task = meta.get("task")
        self.answer_loss = bool(meta.get("answer_loss")) and not whole_text
        self.example_len = meta.get("example_len", 0)
        self.prompt_len = meta.get("prompt_len", 0)
        self.seq_len = self.example_len - 1 if self.task else block_size
        self.starts, self.files, self.first = {}, {}, {}
        for split in ("train", "val"):
            self.files[split] = self.files_of(split)
            windows = [max(0, n - self.seq_len) for _, n in self.files[split]]
            self.first[split] = np.cumsum([0, *windows])  # the number of each shard's first window, then the total
            self.check_size(split)
            if self.answer_loss:
                self.starts[split] = self.starts_of(split)

    def whole_text(self):
        """The same data read as plain text windows: the loss on every token; None when the val
        split is shorter than one window (a small conversations set: its rows are whole
        conversations, not windows)."""
        if min(n for _, n in self.files["val"]) <= self.seq_len:
            return None
        return Batches(self.folder, self.meta, self.seq_len, self.device, whole_text=True)

    def answer_file(self, split, kind):
        path = self.folder / self.meta["answer_files"][split][kind]
        if not path.is_file():
            raise DataError(f"{path} not found; prepare the data set again: python prepare.py {self.folder.name}")
        return path

    def starts_of(self, split) -> np.ndarray:
        """The token offsets where the split's conversations start, and its end:
        {split}_starts.bin, beside {split}_mask.bin, one byte per token, 1 where the token is
        a target the loss is on."""
        path, n = self.answer_file(split, "starts"), len(self.tokens(split))
        starts = np.fromfile(path, dtype="<u8").astype(np.int64)
        if len(starts) < 2 or starts[0] != 0 or starts[-1] != n or (np.diff(starts) <= 0).any():
            raise DataError(f"{path} does not index {split}.bin's conversations; "
                            "prepare the data set again")
        if self.answer_file(split, "mask").stat().st_size != n:
            raise DataError(f"{self.answer_file(split, 'mask')} is not one byte per token of "
                            f"{split}.bin; "
                            "prepare the data set again")
        longest = int(np.diff(starts).max())
        if longest > self.seq_len + 1:  # a cut conversation would lose its last turns' loss unseen
            raise DataError(f"{self.folder.name}'s {split} split has a conversation of {longest} "
                            f"tokens, longer than block_size + 1 = {self.seq_len + 1}; raise "
                            f"block_size, or prepare it again with --max_tokens={self.seq_len + 1} "
                            "to leave longer ones out")
        return starts

    def files_of(self, split) -> list:
        """[(path, tokens)] of the split: its shards, or the one {split}.bin."""
        names = [name for name, _ in self.meta["shards"][split]] if "shards" in self.meta else [f"{split}.bin"]
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        files = [(self.folder / name, (self.folder / name).stat().st_size // itemsize)
                 for name in names if (self.folder / name).is_file()]
        if len(files) < len(names) or not files:
            raise DataError(f"{self.folder} lacks a file of its {split} split; prepare it again: "
                            f"python prepare.py {self.folder.name}")
        return files

    def tokens(self, split, shard=0):
        # a fresh memmap per batch: a long-lived one keeps every page it touched in memory
        return np.memmap(self.files[split][shard][0], dtype=np.dtype(self.meta["dtype"]).newbyteorder("<"), mode="r")

    def count(self, split) -> int:
        """How many different rows the split offers: windows, examples, or conversations."""
        if self.answer_loss:
            return len(self.starts[split]) - 1
        if self.task:
            return len(self.tokens(split)) // self.example_len
        return int(self.first[split][-1])

    def check_size(self, split):
        path, n = self.files[split][0][0], sum(n for _, n in self.files[split])
        if self.task and n % self.example_len:
            raise DataError(f"{path} holds {n} tokens, not whole {self.example_len}-token examples; prepare it again")
        if not self.answer_loss and self.count(split) < 1:
            raise DataError(f"{path} has {n} tokens, too few for block_size={self.seq_len}; lower block_size")

    def rows(self, split, picks) -> np.ndarray:
        """(len(picks), seq_len + 1) token ids: the windows starting at picks, or the examples picks."""
        if self.task:
            return self.tokens(split).reshape(-1, self.example_len)[picks].astype(np.int64)
        rows = np.empty((len(picks), self.seq_len + 1), dtype=np.int64)
        shard_of = np.searchsorted(self.first[split], picks, side="right") - 1
        for shard in np.unique(shard_of):  # one shard mapped at a time
            chosen = shard_of == shard
            starts = picks[chosen] - self.first[split][shard]
            rows[chosen] = self.tokens(split, shard)[starts[:, None] + np.arange(self.seq_len + 1)]
        return rows

    def conversations(self, split, picks) -> tuple:
        """(ids, scored), both (len(picks), seq_len + 1): row i holds the conversations picks[i]
        (-1 = none) one after the other from its start, the last one cut at the window's end,
        then zeros; scored is the mask."""
        data, starts = self.tokens(split), self.starts[split]
        mask = np.memmap(self.answer_file(split, "mask"), dtype=np.uint8, mode="r")
        ids = np.zeros((len(picks), self.seq_len + 1), dtype=np.int64)
        scored = np.zeros(ids.shape, dtype=bool)
        for row, chosen in enumerate(picks):
            at = 0
            for start, end in zip(starts[chosen[chosen >= 0]], starts[chosen[chosen >= 0] + 1]):
                n = min(end - start, ids.shape[1] - at)
                if n <= 0:
                    break
                ids[row, at:at + n] = data[start:start + n]
                scored[row, at:at + n] = mask[start:start + n]
                at += n
        return ids, scored

    def batch(self, split, picks):
        """(x, y) on the device for the given window offsets / example indices / conversations' pairs."""
        if self.answer_loss:
            ids, scored = self.conversations(split, np.asarray(picks))
            rows = torch.from_numpy(ids)
        else:
            rows = torch.from_numpy(self.rows(split, np.asarray(picks)))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()  # contiguous: else a pinned copy is not asynchronous
        if self.answer_loss:
            y[~torch.from_numpy(scored[:, 1:])] = -1  # the loss falls on the masked tokens only
        if self.task:
            y[:, :self.prompt_len - 1] = -1  # no loss on predicting the prompt
        if self.device.startswith("cuda"):  # pinned host memory lets the copy overlap with compute
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def conversations_per_window(self, split) -> int:
        """Enough conversations to fill a window even with the split's shortest ones."""
        return -(-(self.seq_len + 1) // int(np.diff(self.starts[split]).min()))

    def random_picks(self, split, rng, shape):
        """Random window offsets or examples; with answer_loss, random conversations (drawn with
        replacement) per row, so no conversation always follows the same one and the ones
        before are context, not a cue."""
        if self.answer_loss:
            per_row = self.conversations_per_window(split)
            return rng.integers(0, self.count(split), size=(*shape, per_row))
        return rng.integers(0, self.count(split), size=shape)

    def full_split_picks(self, split) -> np.ndarray:
        """Every example of a task split, or the starts of non-overlapping windows of text; with
        answer_loss the conversations in order, as many whole ones per row as fit (-1 pads),
        so each answer is scored once."""
        if self.answer_loss:
            return self.packed_conversations(split)
        if self.task:
            return np.arange(self.count(split))
        return np.concatenate([first + np.arange(0, n - self.seq_len, self.seq_len)
                               for first, (_, n) in zip(self.first[split], self.files[split])])

    def packed_conversations(self, split) -> np.ndarray:
        rows, row, used = [], [], 0
        for i, length in enumerate(np.diff(self.starts[split])):
            if row and used + length > self.seq_len + 1:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += length
        rows.append(row)
        picks = np.full((len(rows), max(map(len, rows))), -1, dtype=np.int64)
        for r, chosen in enumerate(rows):
            picks[r, :len(chosen)] = chosen
        return picks

    def examples(self, split) -> np.ndarray:
        """All examples of a task split, (n, example_len)."""
        return np.array(self.tokens(split)).reshape(-1, self.example_len).astype(np.int64)
