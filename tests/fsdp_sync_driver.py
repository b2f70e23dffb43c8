"""train.py's main() under torchrun, counting FSDP's gradient reduce-scatters and the optimizer
steps (tests/test_fsdp.py):

    torchrun --nproc_per_node=2 tests/fsdp_sync_driver.py RECORD_DIR [train.py's arguments]

FSDP2 reduce-scatters each sharded module's gradients through
torch.distributed.reduce_scatter_single, looked up when it is called: the count wraps the real
function, and every call still runs. Each process writes {"reduce_scatters": n, "steps": n} to
RECORD_DIR/rank<R>.json."""
import json
import os
import sys
from pathlib import Path

import torch.distributed
from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from tinygpt.device import exit_process  # noqa: E402

counts = {"reduce_scatters": 0, "steps": 0}
real_reduce_scatter = torch.distributed.reduce_scatter_single


def counted_reduce_scatter(*args, **kwargs):
    counts["reduce_scatters"] += 1
    return real_reduce_scatter(*args, **kwargs)


def before_step(optimizer, args, kwargs):
    counts["steps"] += 1


if __name__ == "__main__":
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    torch.distributed.reduce_scatter_single = counted_reduce_scatter
    register_optimizer_step_pre_hook(before_step)
    code = train.main(argv)
    (record_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(counts))
    exit_process(code)
