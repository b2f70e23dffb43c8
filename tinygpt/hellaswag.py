"""HellaSwag (Zellers et al. 2019): pick the ending of a sentence that makes sense, out of four.
Scored as build-nanogpt scores it, completion style: each ending follows the context, and the loss
over the ending's tokens decides. acc takes the ending of lowest summed loss, acc_norm the one of
lowest mean loss per token (published figures to compare with: docs/evaluation.md).

tools/evaluate.py scores a checkpoint or GPT-2's weights with it (`--task=hellaswag`); a training
run can call hellaswag_score at its evaluations.
"""

import hashlib
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from tinygpt.common import DataError
from tinygpt.device import Dist, logits_budget, print0, rows_within
from tinygpt.download import download, is_url
from tinygpt.parallel import whole_weights
from tinygpt.tokenizer import tokenizer_from_meta

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
# The file's git blob id in upstream's tree (git hash-object): its sha256 was not at hand when this
# was written, and the blob id pins the same bytes (docs/evaluation.md).
GIT_BLOB = "0f5ee25d72216f12317d5d8a7b92deafa423d81e"
PROGRESS_S = 10.0  # seconds between progress lines


def git_blob_id(path) -> str:
    """What `git hash-object` prints for the file: sha1 of 'blob <size>\\0' and the bytes."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hellaswag_file(source="", data_dir="data", url=URL, blob=GIT_BLOB) -> Path:
    """The validation file: a local --source file as it is (any file of HellaSwag's format),
    else the download of url (or a --source URL) into data_dir/hellaswag/, checked against the
    pinned blob id; a file that already matches is not fetched again."""
    if source and not is_url(source):
        if not Path(source).is_file():
            raise DataError(
                f"--source: {source} not found; give HellaSwag's hellaswag_val.jsonl or a URL"
            )
        return Path(source)
    dest = Path(data_dir) / "hellaswag" / "hellaswag_val.jsonl"
    if dest.is_file() and git_blob_id(dest) == blob:
        return dest
    fetched = download(source or url, dest.with_name(dest.name + ".download"))
    got = git_blob_id(fetched)
    if got != blob:
        fetched.unlink()
        raise DataError(
            f"{source or url} is not the pinned HellaSwag validation file (git blob {got}, "
            f"expected {blob}); nothing was saved. Pass --source=FILE with a copy of it"
        )
    fetched.replace(dest)
    return dest


def hellaswag_examples(path, limit=0) -> list:
    """The first `limit` examples (0 = all) of a HellaSwag jsonl file: (context, endings, label)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            try:
                item = json.loads(line)
                context, endings, label = item["ctx"], item["endings"], item["label"]
                ok = isinstance(context, str) and len(endings) == 4 and int(label) in range(4)
            except (ValueError, KeyError, TypeError):
                ok = False
            if not ok:
                raise DataError(
                    f"{path} line {number} is not a HellaSwag example (a JSON object with "
                    "'ctx', four 'endings' and a 'label' 0-3)"
                )
            examples.append((context, [str(e) for e in endings], int(label)))
    if not examples:
        raise DataError(f"{path} holds no HellaSwag examples")
    return examples


def example_rows(tokenizer, example, block_size) -> list:
    """[(token ids, index of the first ending token)] of the four context + ending sequences; a row
    longer than block_size loses the start of its context, so the ending stays whole."""
    context, endings, _ = example
    try:
        context_ids = tokenizer.encode(context)
        rows = [
            (context_ids + tokenizer.encode(" " + ending), len(context_ids)) for ending in endings
        ]
    except ValueError as e:  # a character vocabulary lacks a character of the text
        raise DataError(
            f"this model's tokenizer cannot read HellaSwag ({e}); score a model with a "
            "byte, gpt2 or bpe tokenizer"
        ) from None
    return [
        (ids[-block_size:], max(1, start - max(0, len(ids) - block_size))) for ids, start in rows
    ]


@torch.no_grad()
def ending_losses(model, rows, device, ctx=nullcontext()) -> torch.Tensor:
    """(len(rows), 2) summed and mean loss over each row's ending tokens, in one forward pass."""
    width = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(len(rows), width, dtype=torch.long)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ids, start) in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
        scored[i, start : len(ids)] = True
    tokens, scored = tokens.to(device), scored.to(device)
    with ctx:
        logits = model(tokens, tokens)[0]  # targets ask for every position's logits
    losses = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none"
    )
    losses = losses * scored[:, 1:]  # position t predicts token t + 1: the ending's tokens only
    summed = losses.sum(dim=1)
    return torch.stack([summed, summed / scored[:, 1:].sum(dim=1)], dim=1)


@torch.no_grad()
def hellaswag_score(model, tokenizer, examples, device, ctx=nullcontext(), dist=Dist(),
                    progress=True) -> dict:
    """{'acc', 'acc_norm', 'examples'} of the model on examples (hellaswag_examples); under torchrun
    every process scores every world_size-th example. Prints a progress line every PROGRESS_S."""
    was_training = model.training
    model.eval()
    mine = examples[dist.rank :: dist.world_size]
    counts = torch.zeros(3, dtype=torch.long, device=device)  # right by sum, right by mean, scored
    began = shown = time.perf_counter()
    at = 0
    while at < len(mine):
        group = next_group(model, tokenizer, mine, at, device)
        rows = [row for four in group for row in four]  # each example's four endings
        losses = ending_losses(model, rows, device, ctx).view(len(group), 4, 2)
        labels = torch.tensor([example[2] for example in mine[at:at + len(group)]], device=device)
        picks = losses.argmin(dim=1)  # (examples, 2): the ending of least summed, least mean loss
        right = (picks == labels[:, None]).sum(dim=0)
        counts += torch.stack([*right, torch.tensor(len(group), device=device)])
        at += len(group)
        if progress and time.perf_counter() - shown > PROGRESS_S and at < len(mine):
            shown = time.perf_counter()
            print0(f"hellaswag {at * dist.world_size:,}/{len(examples):,} examples, acc_norm so "
                   f"far {counts[1].item() / at:.4f} ({shown - began:.0f} s)", flush=True)
    right, right_norm, scored = dist.sum(counts).tolist()
    model.train(was_training)
    return {"acc": right / scored, "acc_norm": right_norm / scored, "examples": scored}


def next_group(model, tokenizer, examples, at, device) -> list:
    """The rows (example_rows) of examples[at], and of as many next examples as one forward pass
    holds within the logits budget."""
    block, vocab = model.config.block_size, model.config.vocab_size
    budget = logits_budget(device)
    group = [example_rows(tokenizer, examples[at], block)]
    width = max(len(ids) for ids, _ in group[0])
    while at + len(group) < len(examples):
        if 4 * (len(group) + 1) > rows_within(budget, width, vocab, 256):
            break
        group.append(example_rows(tokenizer, examples[at + len(group)], block))
        width = max(width, *(len(ids) for ids, _ in group[-1]))
    return group


EXAMPLES = {}  # path: examples, read once a process


def score_while_training(model, meta, data_dir, ctx, step, dist) -> tuple:
    """(line, record) of HellaSwag's validation set for the training log: the file is downloaded
    once per node, and every process scores its share with the whole weights (FSDP)."""
    path = dist.from_master(dist.on_each_node(hellaswag_file, "", data_dir))
    if path not in EXAMPLES:
        EXAMPLES[path] = hellaswag_examples(path)
    tokenizer = tokenizer_from_meta(meta)
    with whole_weights(model):
        score = hellaswag_score(model, tokenizer, EXAMPLES[path], dist.device, ctx, dist,
                                progress=False)
    line = f"hellaswag step {step} | acc {score['acc']:.4f} | acc_norm {score['acc_norm']:.4f}"
    return line, {"kind": "hellaswag", "step": step, **score}
