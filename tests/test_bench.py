"""bench.py as a specification of its command line (its figures are never asserted: they are
timings)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_bench(*args):
    return subprocess.run([sys.executable, "-m", "tools.bench", *args], capture_output=True,
                          text=True, cwd=REPO)


def test_help_lists_the_nanogpt_option():
    result = run_bench("--help")
    assert result.returncode == 0 and "--nanogpt" in result.stdout


def test_a_folder_without_nanogpt_is_refused_in_one_line(tmp_path):
    result = run_bench(f"--nanogpt={tmp_path}", "--only=matmul")
    assert result.returncode != 0
    assert result.stderr.strip() == (f"error: nanogpt={str(tmp_path)!r}: no model.py there; "
                                     "give the folder of a nanoGPT checkout")


def test_the_recipe_section_needs_a_nanogpt_checkout():
    result = run_bench("--only=recipe")
    assert result.returncode != 0 and "give --nanogpt=PATH" in result.stderr


def test_matmul_section_runs_and_prints_both_dtypes():
    result = run_bench("--only=matmul")
    assert result.returncode == 0, result.stderr
    assert "torch.float32" in result.stdout and "torch.bfloat16" in result.stdout
