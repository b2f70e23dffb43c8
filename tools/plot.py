"""Draw the training curves of one or more runs on one picture, from their out_dir/log.jsonl.
Run from the repo's root:

    python -m tools.plot out-speedrun-cpu out-shakespeare-char-cpu --out=speedrun.png
    python -m tools.plot out-pos-*          # any runs; the legend names each by its folder

The picture has the loss against steps and against tokens trained on (training loss as a line, val
loss at each evaluation as dots), and the learning rate against steps. train.py draws
out_dir/curves.png of its own run when it ends; this redraws any runs together, finished or still
running.
"""
import sys

from tinygpt.common import DataError
from tinygpt.plot import figure, read_curves, save

USAGE = "usage: python -m tools.plot OUT_DIR [OUT_DIR ...] [--out=FILE.png]"


def main(argv) -> int:
    if not argv or "--help" in argv or "-h" in argv:
        options = "options:\n  --out='curves.png'   the picture to write (PNG)"
        print(f"{USAGE}\n\n{__doc__.strip()}\n\n{options}")
        return 0 if argv else 1
    out, run_dirs = "curves.png", []
    for arg in argv:
        if arg.startswith("--out="):
            out = arg.removeprefix("--out=")
        elif arg.startswith("--"):
            print(f"error: unknown option {arg}; {USAGE}", file=sys.stderr)
            return 1
        else:
            run_dirs.append(arg.rstrip("/\\") or arg)
    if not run_dirs or not out.lower().endswith(".png"):
        print(f"error: give at least one run's out_dir and a .png file to --out; {USAGE}",
              file=sys.stderr)
        return 1
    try:
        save(figure([read_curves(d, name=d) for d in run_dirs]), out)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: {', '.join(run_dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
