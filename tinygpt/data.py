"""A prepared data set on disk, the batches drawn from it, and the model's losses over them.

data/<name>/ holds train.bin and val.bin (token ids, one flat little-endian stream) and meta.json
(tokenizer, sizes, source), written by prepare.py; a corpus holds shards instead (train_000.bin,
..., val_000.bin, listed in meta.json's "shards"). Batches are drawn from random generators
derived from (seed, stream, step), so a resumed run and any number of processes draw exactly the
batches of one uninterrupted process. Under torchrun every process scores its share of an
evaluation's batches, and the sums are added up over the processes.
"""
import json
import math
from pathlib import Path

import numpy as np
import torch

from tinygpt.common import ConfigError, DataError, verdict_text
from tinygpt.device import Dist, print0


def load_meta(dataset_dir) -> dict:
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; build the data set first: "
                        f"python prepare.py {Path(dataset_dir).name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete {path.parent} "
                        "and prepare it again") from None


def bits_per_byte(loss, meta, split):
    """A mean loss in nats per token over `split` as bits per UTF-8 byte of the text, or None when
    the data set does not record its bytes (corpora). Any mean over the split (all of it, windows
    short of its end, an estimate's random windows) is taken to cover the split's tokens and bytes
    in the same proportion, so the split's tokens per byte converts it:
    bpb = loss * tokens / (ln 2 * bytes)."""
    tokens, n_bytes = meta.get(f"{split}_tokens"), meta.get(f"{split}_bytes")
    if not tokens or not n_bytes:
        return None
    return loss * tokens / (math.log(2) * n_bytes)


def bpb_text(bpb) -> str:
    """' (1.2345 bits per byte)' beside a loss, or '' when the data set records no bytes."""
    return "" if bpb is None else f" ({bpb:.4f} bits per byte)"


TRAIN_STREAM, EVAL_STREAM = 0, 1


def batch_rng(seed, stream, step, part=0):
    """The random generator of one step's batches, derived from (seed, stream, step) alone: a
    resumed run draws the same batches as an uninterrupted one, and evaluations (their own stream)
    never shift the training batches."""
    return np.random.default_rng((seed, stream, step, part))


def split_global_batch(accumulation_steps, batch_size, world_size) -> tuple:
    """(micro-steps, sequences per micro-step) of one process, so that world_size processes
    together take the config's global batch of accumulation_steps x batch_size sequences: by
    micro-steps when they divide evenly, else by the sequences of each micro-step."""
    if accumulation_steps % world_size == 0:
        return accumulation_steps // world_size, batch_size
    if batch_size % world_size == 0:
        return accumulation_steps, batch_size // world_size
    raise ConfigError(f"the global batch of gradient_accumulation_steps={accumulation_steps} x "
                      f"batch_size={batch_size} cannot be split evenly over {world_size} "
                      f"processes; make either a multiple of {world_size}")


def picks_of_rank(global_picks, rank, world_size) -> np.ndarray:
    """This process's (micro-steps, sequences) share of the global (micro-steps, sequences)."""
    steps, rows = split_global_batch(*global_picks.shape[:2], world_size)
    if steps < global_picks.shape[0]:
        return global_picks[rank * steps:(rank + 1) * steps]
    return global_picks[:, rank * rows:(rank + 1) * rows]


class Batches:
    """Batches of token ids from data/<name>/{train,val}.bin, as (x, y) on the device.

    Text: windows of block_size tokens, targets shifted by one. A window lies within one file: a
    split in shards offers each shard's windows one after the other, numbered as one stream's (a
    pick p is window p - first[s] of the shard s whose numbers hold it), so one file is the case of
    one shard and the seeded picks mean the same for both. Task data sets (meta has "task"):
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
            # the number of each shard's first window, then the total
            self.first[split] = np.cumsum([0, *windows])
            self.check_size(split, block_size)
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
            raise DataError(f"{path} not found; prepare the data set again: "
                            f"python prepare.py {self.folder.name}")
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
        names = [f"{split}.bin"]
        if "shards" in self.meta:
            names = [name for name, _ in self.meta["shards"][split]]
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        files = [(self.folder / name, (self.folder / name).stat().st_size // itemsize)
                 for name in names if (self.folder / name).is_file()]
        if len(files) < len(names) or not files:
            raise DataError(f"{self.folder} lacks a file of its {split} split; prepare it again: "
                            f"python prepare.py {self.folder.name}")
        return files

    def tokens(self, split, shard=0):
        # a fresh memmap per batch: a long-lived one keeps every page it touched in memory
        dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        return np.memmap(self.files[split][shard][0], dtype=dtype, mode="r")

    def count(self, split) -> int:
        """How many different rows the split offers: windows, examples, or conversations."""
        if self.answer_loss:
            return len(self.starts[split]) - 1
        if self.task:
            return len(self.tokens(split)) // self.example_len
        return int(self.first[split][-1])

    def check_size(self, split, block_size):
        if self.task and block_size < self.seq_len:
            raise ConfigError(f"block_size={block_size} is shorter than the {self.seq_len} tokens "
                              f"a {self.task} example feeds the model; "
                              f"set block_size={self.seq_len}")
        path, n = self.files[split][0][0], sum(n for _, n in self.files[split])
        if self.task and n % self.example_len:
            raise DataError(f"{path} holds {n} tokens, not whole {self.example_len}-token "
                            "examples; prepare it again")
        if not self.answer_loss and self.count(split) < 1:
            raise DataError(f"{path} has {n} tokens, too few for block_size={self.seq_len}; "
                            "lower block_size")

    def rows(self, split, picks) -> np.ndarray:
        """(len(picks), seq_len + 1) token ids: the windows starting at picks, or examples picks."""
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
        """(x, y) on the device for the window offsets, example indices or conversations picks."""
        if self.answer_loss:
            ids, scored = self.conversations(split, np.asarray(picks))
            rows = torch.from_numpy(ids)
        else:
            rows = torch.from_numpy(self.rows(split, np.asarray(picks)))
        # contiguous: else a pinned copy is not asynchronous
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].clone()
        if self.answer_loss:
            y[~torch.from_numpy(scored[:, 1:])] = -1  # the loss falls on the masked tokens only
        if self.task:
            y[:, :self.prompt_len - 1] = -1  # no loss on predicting the prompt
        if self.device.startswith("cuda"):  # pinned host memory lets the copy overlap with compute
            x, y = x.pin_memory(), y.pin_memory()
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
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


# ------------------------------------------------------------------------ losses and scores

@torch.no_grad()
def estimate_loss(model, batches, eval_iters, batch_size, seed, step, ctx, dist=Dist(),
                  rows=None) -> dict:
    """Mean loss over eval_iters random batches of batch_size sequences of each split, drawn from
    the eval stream of `step`. Every process scores every world_size-th batch, in pieces of `rows`
    sequences: the size it trains on, since a batch the size of the global one may not fit."""
    model.eval()
    losses = {}
    rows = rows or batch_size
    for part, split in enumerate(("train", "val")):
        rng = batch_rng(seed, EVAL_STREAM, step, part)
        picks = batches.random_picks(split, rng, (eval_iters, batch_size))
        mine = picks[dist.rank::dist.world_size]
        sums = score_table((len(mine), -(-batch_size // rows)), batches.device)
        for i, batch in enumerate(mine):
            for j, start in enumerate(range(0, batch_size, rows)):
                sums[i, j] = loss_and_tokens(model, batches, split, batch[start:start + rows], ctx)
        batch_means = []
        for pieces in sums.tolist():  # one host sync per split; each batch's mean on the host
            loss_sum = sum(loss * n for loss, n in pieces)
            batch_means.append(loss_sum / sum(n for _, n in pieces))
        loss_sum, count = dist.sum_floats([sum(batch_means), len(batch_means)])
        losses[split] = loss_sum / count
    model.train()
    return losses


def score_table(shape, device):
    """A (*shape, 2) table of (mean loss, tokens scored) that an evaluation fills in place, read
    back in one transfer and summed on the host in float64 (a float32 sum of many batches would
    round the losses the tests compare by hand). In place, because a tensor kept per batch would
    be carved out of the memory that batch's logits freed, and with keep_freed_memory glibc's heap
    then grows by a batch's logits every batch (docs/results.md)."""
    return torch.zeros((*shape, 2), device=device)  # counts below 2**24 a piece: exact in float32


def loss_and_tokens(model, batches, split, picks, ctx) -> torch.Tensor:
    """(mean loss, tokens scored) of the sequences picks, on the device."""
    x, y = batches.batch(split, picks)
    with ctx:
        loss = model(x, y)[1]
    return torch.stack([loss.float(), (y != -1).sum().float()])


@torch.inference_mode()  # no_grad, and no version counters to bump either: faster on a CPU
def full_split_loss(model, batches, split, batch_size, ctx, dist=Dist()):
    """(mean loss per scored token, tokens scored) over the whole split: every example of a task,
    or non-overlapping windows of text (the last partial window is left out)."""
    model.eval()
    picks = batches.full_split_picks(split)
    starts = range(dist.rank * batch_size, len(picks), batch_size * dist.world_size)
    sums = score_table((len(starts),), batches.device)
    for i, start in enumerate(starts):
        sums[i] = loss_and_tokens(model, batches, split, picks[start:start + batch_size], ctx)
    pieces = sums.tolist()
    loss_sum = sum(loss * n for loss, n in pieces)
    scored = sum(int(n) for _, n in pieces)
    loss_sum, scored = dist.sum_floats([loss_sum, scored])
    return loss_sum / scored, int(scored)


@torch.no_grad()
def exact_match_accuracy(model, examples, prompt_len, batch_size=512, device="cpu",
                         dist=Dist()) -> float:
    """Fraction of examples (n, example_len) whose greedy continuation of the first prompt_len
    tokens equals the rest of the example exactly; every process scores every world_size-th."""
    model.eval()
    examples = torch.as_tensor(np.asarray(examples), dtype=torch.long)
    correct = torch.zeros((), dtype=torch.long, device=device)
    for chunk in examples[dist.rank::dist.world_size].split(batch_size):
        chunk = chunk.to(device)
        out = model.generate(chunk[:, :prompt_len], chunk.size(1) - prompt_len, temperature=0)
        correct += (out[:, prompt_len:] == chunk[:, prompt_len:]).all(dim=1).sum()
    return int(dist.sum(correct)) / len(examples)


def final_report(model, batches, ctx, batch_size, val_loss_bar=0.0, exact_match_bar=0.0,
                 dist=Dist()) -> list:
    """Print the final scores of a run: the full val split's loss, a task's exact match, and a
    chat model's own scores (rank 0 prints; every process computes its share). Returns the
    records for the log."""
    records, trained = [], batches
    if batches.answer_loss:  # what it trains on first; the bar judges the whole text
        loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
        print0(f"final val loss on the answers (full split, {tokens:,} answer tokens): "
               f"{loss:.4f}", flush=True)
        records.append({"kind": "final", "val_loss_answers": loss, "val_answer_tokens": tokens})
        batches = batches.whole_text() or batches  # None: a val split shorter than a window
    if not batches.answer_loss:
        loss, tokens = full_split_loss(model, batches, "val", batch_size, ctx, dist)
        bpb = bits_per_byte(loss, batches.meta, "val")
        print0(f"final val loss (full split, {tokens:,} tokens): {loss:.4f}{bpb_text(bpb)}"
               f"{verdict_text(loss, val_loss_bar)}", flush=True)
        records.append({"kind": "final", "val_loss_full": loss, "val_tokens": tokens,
                        "val_bpb": bpb})
    if not math.isfinite(loss):
        return records
    if batches.task:
        examples = batches.examples("val")
        accuracy = exact_match_accuracy(model, examples, batches.prompt_len,
                                        device=batches.device, dist=dist)
        verdict = verdict_text(100 * accuracy, 100 * exact_match_bar, True, "%")
        print0(f"test exact match: {100 * accuracy:.1f}%{verdict}")
        records.append({"kind": "test", "exact_match": accuracy})
    if trained.answer_loss and trained.meta.get("test_file") and dist.is_master:
        from tinygpt.chat import chat_report  # only a chat model is asked questions
        from tinygpt.tokenizer import tokenizer_from_meta
        tokenizer = tokenizer_from_meta(trained.meta)
        records += chat_report(model, trained, tokenizer, ctx, exact_match_bar)
    return records
