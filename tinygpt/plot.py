"""Pictures of training: the curves of one or more runs, drawn from their out_dir/log.jsonl with
matplotlib.

train.py calls draw_in_background(out_dir) as a run ends: a detached process at a low priority
draws out_dir/curves.png, so the run pays neither matplotlib's import nor the drawing
(docs/training.md). `python -m tools.plot out-a out-b` draws several runs on one picture.

matplotlib is imported only inside the functions that draw, and through its Figure class rather
than pyplot: no window, no display and no backend to choose, so the picture is drawn the same with
or without a screen.
"""
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tinygpt.common import DataError, atomic_write

PICTURE = "curves.png"  # beside log.jsonl in a run's out_dir
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Curves:
    """A run's logged curves: the training loss and learning rate at each log step, the train and
    val losses at each evaluation, and how many tokens one optimizer step trains on."""
    name: str
    steps: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    lrs: list = field(default_factory=list)
    eval_steps: list = field(default_factory=list)
    eval_train: list = field(default_factory=list)
    eval_val: list = field(default_factory=list)
    tokens_per_step: int = 0


def read_curves(out_dir, name=None) -> Curves:
    """The curves in out_dir/log.jsonl. A resumed run appends to the same log: the last record of a
    step wins. A one-line DataError when the log is missing or holds no training step."""
    path = Path(out_dir) / "log.jsonl"
    if not path.is_file():
        raise DataError(f"{path}: no such file; give the out_dir of a training run (train.py "
                        "writes log.jsonl there)")
    train, evals = {}, {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}, line {number}: not a JSON record; is this a training "
                            "run's log?") from None
        if record.get("kind") == "train":
            train[record["step"]] = record
        elif record.get("kind") == "eval" and "val" in record:
            evals[record["step"]] = record
    if not train:
        raise DataError(f"{path} holds no training step yet; plot it once the run has logged one")
    curves = Curves(name or Path(out_dir).name or str(out_dir))
    for step in sorted(train):
        curves.steps.append(step)
        curves.losses.append(train[step]["loss"])
        curves.lrs.append(train[step]["lr"])
    for step in sorted(evals):
        curves.eval_steps.append(step)
        curves.eval_train.append(evals[step]["train"])
        curves.eval_val.append(evals[step]["val"])
    # Tokens per second times seconds per step: the tokens of one step, as train.py counted them.
    first = train[curves.steps[0]]
    curves.tokens_per_step = round(first["tokens_per_s"] * first["ms_per_step"] / 1000)
    return curves


def figure(runs):
    """A matplotlib Figure of the runs (a list of Curves): the loss against steps and against tokens
    (the training loss as a line, the evaluations' val loss as dots on a dashed line, one colour per
    run), and the learning rate against steps. The loss axes are logarithmic when the losses span
    more than a decade."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    by_step, by_tokens, lr = fig.subplots(1, 3)
    for index, run in enumerate(runs):
        colour = f"C{index % 10}"
        for ax, scale in ((by_step, 1), (by_tokens, run.tokens_per_step)):
            ax.plot([s * scale for s in run.steps], run.losses, color=colour, lw=1,
                    label=f"{run.name} train")
            if run.eval_steps:
                ax.plot([s * scale for s in run.eval_steps], run.eval_val, color=colour, ls="--",
                        marker="o", ms=3, label=f"{run.name} val")
        lr.plot(run.steps, run.lrs, color=colour, label=f"{run.name} lr")
    losses = [x for run in runs for x in run.losses + run.eval_val]
    axes = ((by_step, "step", "steps"), (by_tokens, "tokens trained on", "tokens"))
    for ax, xlabel, what in axes:
        ax.set(xlabel=xlabel, ylabel="loss (nats per token)", title=f"loss against {what}")
        if max(losses) > 10 * min(losses) > 0:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    lr.set(xlabel="step", ylabel="learning rate (AdamW)", title="learning-rate schedule")
    lr.grid(alpha=0.3)
    by_step.legend(fontsize="small")
    return fig


def save(fig, path):
    """Write the figure as a PNG, whole or not at all."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=80))


def draw_in_background(out_dir):
    """Start a detached process that draws out_dir/curves.png at a low priority, and return at once.

    Its output goes nowhere, so a caller reading this process's pipes does not wait for it; it has a
    session (or process group) of its own, so it outlives this process and a torchrun's or a
    terminal's signals. subprocess starts it with spawn/exec, never a bare os.fork of a process
    where torch runs threads."""
    if sys.platform == "win32":
        flags = {"creationflags": subprocess.DETACHED_PROCESS | subprocess.CREATE_NEW_PROCESS_GROUP
                 | subprocess.BELOW_NORMAL_PRIORITY_CLASS}
    else:
        flags = {"start_new_session": True}
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL,
             "stderr": subprocess.DEVNULL}
    subprocess.Popen([sys.executable, "-m", "tinygpt.plot", str(Path(out_dir).resolve())],
                     cwd=REPO, **quiet, **flags)


# The background process that train.py starts: one run's picture, at a low priority.
if __name__ == "__main__":
    if hasattr(os, "nice"):
        # Nice 10, not 19: the drawing yields to busy processes but still gets a small share.
        os.nice(10)
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m tinygpt.plot OUT_DIR   (draws OUT_DIR/curves.png; "
              "python -m tools.plot draws several runs)")
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    run_dir = Path(sys.argv[1])
    save(figure([read_curves(run_dir)]), run_dir / PICTURE)
