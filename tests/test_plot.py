"""Pictures of training: every run's out_dir gets curves.png, drawn from its log.jsonl by a
detached process without a display; tools.plot draws several runs on one picture. The tests read
the plotted data back from the matplotlib figure (its lines' data), not the pixels."""
import json
import subprocess
import time

import pytest

from conftest import assert_one_line_error, records, tiny_args, train_here
from tinygpt.plot import figure, read_curves
from tools.plot import main as plot_main

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    """A tiny run as a user starts it, with no display and no matplotlib backend chosen, its
    picture on."""
    out_dir = tmp_path_factory.mktemp("plot") / "out-tiny"
    with pytest.MonkeyPatch.context() as env:  # the drawing process inherits this environment
        for name in ("DISPLAY", "WAYLAND_DISPLAY", "MPLBACKEND"):
            env.delenv(name, raising=False)
        args = tiny_args(data_dir, out_dir, "--max_iters=12", "--eval_interval=4", "--plot=True")
        train_here(args, out_dir.parent)
    return out_dir


def lines_by_label(ax) -> dict:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_a_run_without_a_display_leaves_its_curves_png_in_out_dir(finished_run):
    picture = finished_run / "curves.png"
    deadline = time.time() + 120  # drawn by a low-priority process after the run has exited
    while not picture.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    height, width, _ = imread(picture).shape
    assert width > 2 * height > 200  # three panels side by side


def test_the_plotted_curves_are_the_logged_losses_learning_rates_and_tokens(finished_run):
    fig = figure([read_curves(finished_run, name="tiny")])
    by_step, by_tokens, lr = fig.axes
    train, evals = records(finished_run, "train"), records(finished_run, "eval")
    config = json.loads((finished_run / "config.json").read_text())
    tokens_per_step = (config["batch_size"] * config["block_size"]
                       * config["gradient_accumulation_steps"])
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    eval_steps, val = [r["step"] for r in evals], [r["val"] for r in evals]
    assert len(steps) == 12 and eval_steps == [0, 4, 8, 12]
    lines = lines_by_label(by_step)
    assert lines["tiny train"] == (steps, losses)
    assert lines["tiny val"] == (eval_steps, val)
    lines = lines_by_label(by_tokens)
    assert lines["tiny train"] == ([s * tokens_per_step for s in steps], losses)
    assert lines["tiny val"] == ([s * tokens_per_step for s in eval_steps], val)
    assert lines_by_label(lr)["tiny lr"] == (steps, [r["lr"] for r in train])
    assert by_step.get_xlabel() and by_step.get_ylabel()
    assert by_tokens.get_xlabel() and lr.get_ylabel()
    assert [t.get_text() for t in by_step.get_legend().get_texts()] == ["tiny train", "tiny val"]


def write_log(out_dir, losses, tokens_per_step=64):
    out_dir.mkdir()
    lines = [{"kind": "train", "step": i + 1, "loss": loss, "lr": 1e-3, "ms_per_step": 10.0,
              "tokens_per_s": tokens_per_step / 0.01} for i, loss in enumerate(losses)]
    (out_dir / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out_dir


def test_several_runs_share_one_picture_with_a_log_scale_where_the_loss_spans_decades(tmp_path):
    wide = read_curves(write_log(tmp_path / "wide", [40.0, 5.0, 1.0, 0.5]))
    narrow = read_curves(write_log(tmp_path / "narrow", [2.0, 1.8, 1.5]))
    both = figure([wide, narrow]).axes[0]
    assert both.get_yscale() == "log" and figure([narrow]).axes[0].get_yscale() == "linear"
    assert set(lines_by_label(both)) == {"wide train", "narrow train"}
    assert [t.get_text() for t in both.get_legend().get_texts()] == ["wide train", "narrow train"]


def plot_tool(args, folder, capsys):
    """`python -m tools.plot ARGS` run in folder, in this process (matplotlib is imported once for
    all the tests)."""
    with pytest.MonkeyPatch.context() as env:
        env.chdir(folder)
        code = plot_main(args)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_the_tool_draws_the_named_runs_into_one_png(tmp_path, capsys):
    for name, losses in (("run-a", [3.0, 2.0]), ("run-b", [3.0, 2.5])):
        write_log(tmp_path / name, losses)
    result = plot_tool(["run-a", "run-b/", "--out=both.png"], tmp_path, capsys)
    assert result.returncode == 0 and "run-a, run-b" in result.stdout
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--out" in plot_tool(["--help"], tmp_path, capsys).stdout


EVAL_ONLY = '{"kind": "eval", "step": 0, "train": 5.0, "val": 5.0}\n'


@pytest.mark.parametrize("log, message", [(None, "no such file"), ("", "no training step"),
                                          (EVAL_ONLY, "no training step"),
                                          ("not json\n", "line 1")])
def test_a_missing_or_empty_log_is_a_one_line_error(tmp_path, log, message, capsys):
    (tmp_path / "run").mkdir()
    if log is not None:
        (tmp_path / "run" / "log.jsonl").write_text(log)
    assert_one_line_error(plot_tool(["run", "--out=x.png"], tmp_path, capsys), "run", message)
    assert not (tmp_path / "x.png").exists()
