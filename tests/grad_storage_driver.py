"""train.py's main() under torchrun, recording where each parameter's gradient lives
(tests/test_devices.py):

    torchrun --nproc_per_node=2 tests/grad_storage_driver.py RECORD_DIR [train.py's arguments]

From the second optimizer step on (DDP rebuilds its buckets once, in the order the first step's
gradients came), the data_ptr of every gradient is recorded before each optimizer step and after
each backward (every micro-step); each process writes them to RECORD_DIR/rank<R>.json."""
import json
import os
import sys
from pathlib import Path

from torch.optim.optimizer import register_optimizer_step_pre_hook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import train  # noqa: E402
from tinygpt.device import exit_process  # noqa: E402

seen = {}  # parameter number -> every data_ptr its gradient had
numbers = {}  # id(parameter) -> its number
steps = {}  # id(optimizer) -> its steps so far


def record(parameter):
    seen.setdefault(numbers[id(parameter)], []).append(parameter.grad.data_ptr())


def before_step(optimizer, args, kwargs):
    steps[id(optimizer)] = steps.get(id(optimizer), 0) + 1
    if steps[id(optimizer)] == 1:
        return
    for parameter in (p for group in optimizer.param_groups for p in group["params"]):
        if id(parameter) not in numbers:  # from now on, after every backward too
            numbers[id(parameter)] = len(numbers)
            parameter.register_post_accumulate_grad_hook(record)
        record(parameter)


if __name__ == "__main__":
    record_dir, argv = Path(sys.argv[1]), sys.argv[2:]
    register_optimizer_step_pre_hook(before_step)
    code = train.main(argv)
    (record_dir / f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
    exit_process(code)
