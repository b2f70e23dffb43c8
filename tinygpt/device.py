"""Where a run computes: the device, the precision, the torchrun process group, and how a process ends.

Every script asks here: no other file parses a device string, picks a dtype, or looks at
torch.distributed or torchrun's environment variables (checkpoint.py saves the GPU's RNG state).
Code elsewhere is device-agnostic: tensors are created on `device`, checkpoints load to the CPU,
and host-only calls (`.item()`, `.tolist()`, `.numpy()`) happen only on values moved or reduced first.
"""
import ctypes
import datetime
import inspect
import os
import re
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel as DDP

from tinygpt.common import EVERY_PROCESS_ERRORS, ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # every script's --dtype choices


def device_type(device) -> str:
    """'cuda' for 'cuda:1': the kind of device, as torch.autocast and GradScaler name it."""
    return device.split(":")[0]


def resolve_device(name="auto", make_current=True) -> str:
    """'cuda', 'mps' or 'cpu' for 'auto'; a named device is checked, with a one-line error if absent. A named GPU
    (cuda:N) becomes the current one unless make_current=False (under torchrun the local rank decides)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but this torch ({torch.__version__}) sees no CUDA GPU; "
                          "use --device=cpu, or install a CUDA build of torch")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}, but there are only {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}, but MPS is not available here; use --device=cpu")
    if kind == "cuda" and index and make_current:
        torch.cuda.set_device(name)  # the current device: its bf16 check, its RNG state, its kernels
    return name


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). mkldnn's own check also says
    yes on plain AVX-512, where bf16 is emulated and slower than float32, so read the CPU flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Capabilities:
    """What a device offers, as far as the decisions below need it. They all read it from capabilities(), the one
    place that asks the hardware, so a test can run the real code under the rules of a device absent here by
    substituting that one function (tests/test_devices.py)."""
    bf16: bool     # bf16 in hardware; emulated bf16 (T4, V100) is slow and has no flash kernels
    fp16: bool     # fp16 tensor cores: fp16 + GradScaler pays where bf16 is missing
    compile: bool  # torch.compile pays, and its kernels exist (Triton: CUDA compute capability 7.0)
    fused_adamw: bool  # torch has a fused AdamW kernel there (CUDA, CPU: faster than its loop, docs/results.md)


def capabilities(device) -> Capabilities:
    """The capabilities of device ('cuda:1', 'mps', 'cpu'). An Apple GPU (MPS) also has no float64, which no code
    puts on a device; only CUDA's batches are pinned."""
    kind = device_type(device)
    if kind == "cuda":
        return Capabilities(bf16=torch.cuda.is_bf16_supported(including_emulation=False), fp16=True,
                            compile=torch.cuda.get_device_capability(device) >= (7, 0), fused_adamw=True)
    if kind == "cpu":
        return Capabilities(bf16=cpu_has_fast_bf16(), fp16=False, compile=False, fused_adamw=True)  # compile: docs/results.md
    return Capabilities(bf16=False, fp16=False, compile=False, fused_adamw=False)


LOGIT_BYTES = 12  # per logit an evaluation holds at once: logits, a float32 copy, the log-softmax
HOST_LOGITS_BUDGET = 1 << 30  # bytes of logits per forward pass on a CPU or a Mac


def logits_budget(device) -> int:
    """Bytes one evaluation pass's logits may take: a quarter of a GPU's free memory, or 1 GB."""
    if device_type(device) == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0] // 4
    return HOST_LOGITS_BUDGET


def rows_within(budget, seq_len, vocab_size, most) -> int:
    """Sequences of seq_len tokens per forward pass whose logits (vocab_size each) fit in budget
    bytes: at least one, at most `most`."""
    return max(1, min(most, budget // (seq_len * vocab_size * LOGIT_BYTES)))


def model_dtype(name, device, model_args) -> str:
    """The one decision of a model's compute dtype on device, from the model's own config (model_args: GPTConfig's
    fields as a dict; a fine-tune's are its weights'): 'float32', 'bfloat16' or 'float16' for dtype=name.
    'auto' picks the fastest safe one: bf16 where the hardware has it, else fp16 + GradScaler where fp16 pays,
    except for ReLU^2 models, whose activations overflow float16 past 256 (an inf in the forward that
    GradScaler cannot skip): float32 for them."""
    if name != "auto":
        return name
    can = capabilities(device)
    if can.bf16:
        return "bfloat16"
    return "float16" if can.fp16 and model_args.get("mlp") != "relu2" else "float32"


def autocast_context(device, dtype):
    """Mixed precision for forward passes: autocast to dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=getattr(torch, dtype))


def grad_scaler(device, dtype):
    """A GradScaler that is on only for float16, whose small range needs the loss scaled."""
    return torch.amp.GradScaler(device_type(device), enabled=dtype == "float16")


def set_up_device(device, keep_freed_memory=False):
    """Process-wide settings: TF32 matmuls on CUDA (float32 range, 10-bit mantissa: fine for
    training, much faster), and glibc's allocator."""
    if keep_freed_memory:
        keep_freed_host_memory()
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve big blocks from its heap and keep freed memory, as
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=... would. By default each block
    over 32 MB is mmap-ed and returned when freed, so tensors allocated afresh every step (the logits
    of a 50,257-way head) fault in new pages every step: kernel time. False where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def compile_by_default(device) -> bool:
    """torch.compile pays on CUDA (inductor's Triton kernels need compute capability 7.0); on a CPU its compile time
    outweighs the gain of a short run (docs/results.md)."""
    return capabilities(device).compile


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, (bf16/fp16, tf32) FLOP/s, for the words of
# a device name. Most specific first: 'H100 PCIe' before 'H100'. A10G has its own, unpublished figure: unknown.
GPU_PEAK_FLOPS = [(("b200",), 2250e12, 1100e12), (("gh200",), 989e12, 494e12), (("h200", "nvl"), 836e12, 418e12),
                  (("h200",), 989e12, 494e12), (("h100", "nvl"), 835e12, 418e12), (("h100", "pcie"), 756e12, 378e12),
                  (("h100",), 989e12, 494e12), (("a100",), 312e12, 156e12), (("a10g",), 0.0, 0.0),
                  (("a10",), 125e12, 62.5e12), (("a30",), 165e12, 82e12), (("a40",), 149.7e12, 74.8e12),
                  (("l40s",), 362e12, 183e12), (("l40",), 181e12, 90.5e12), (("l4",), 121e12, 60e12),
                  (("v100",), 125e12, 15.7e12), (("t4",), 65e12, 8.1e12), (("rtx", "a6000"), 154.8e12, 77.4e12),
                  (("rtx", "4090"), 165.2e12, 82.6e12), (("rtx", "3090"), 71e12, 35.6e12)]


def gpu_peak_flops(name, dtype) -> float:
    """The peak of the GPU called name (as torch.cuda.get_device_name gives it) in dtype; 0.0 when unknown."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))  # whole words: 'L4' is not in 'L40S', nor 'A40' in 'A4000'
    for pattern, half, tf32 in GPU_PEAK_FLOPS:
        if words.issuperset(pattern):
            return tf32 if dtype == "float32" else half
    return 0.0


def measured_matmul_flops(dtype) -> float:
    """FLOP/s of this CPU's fastest square matmul in dtype: threads warmed up first, then the best of
    three runs at each of two sizes, so that it is a peak (one cold run reads low, and MFU over it
    then passes 100%)."""
    emulated = dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_fast_bf16())
    sizes = (256, 512) if emulated else (512, 1024)  # an emulated 1024^2 bf16 matmul takes seconds on an AVX2 CPU
    gen = torch.Generator().manual_seed(0)  # its own generator: the global one drives dropout
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
        warm_until = time.perf_counter() + 0.05
        while time.perf_counter() < warm_until:
            a @ b
        for _ in range(3):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - start))
    return best


def peak_flops(device, dtype) -> float:
    """Peak FLOP/s of one device for MFU: measured on CPU, looked up on known GPUs, else 0 (unknown)."""
    kind = device_type(device)
    if kind == "cpu":
        return measured_matmul_flops(getattr(torch, dtype))
    if kind == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    return 0.0


# ------------------------------------------------------------------------------ distributed

@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; a plain `python` run is rank 0 of 1."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    device: str = "cpu"
    attempt: int = 0  # how often torchrun has relaunched the job after a failure

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def start_distributed(device_name) -> Dist:
    """Join the torchrun job if RANK is set (NCCL on CUDA, gloo on CPU) and pick this process's
    device: cuda:LOCAL_RANK, made current before the process group starts."""
    device = resolve_device(device_name, make_current="RANK" not in os.environ)  # torchrun: the local rank's GPU
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    cuda = device.startswith("cuda")
    timeout = datetime.timedelta(minutes=30)
    # torchrun keeps one key-value store across restarts; a relaunched group that reused the old keys
    # could read the addresses its dead predecessor published (pytorch issue 135712), so every
    # attempt gets its own prefix. Its number is counted in the store, which every node shares:
    # each agent's TORCHELASTIC_RESTART_COUNT counts only its own node's failures.
    store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = (store.add("tinygpt/joined", 1) - 1) // world  # every process of an attempt joins before the next's
    store = tdist.PrefixStore(f"attempt{attempt}", store)
    tdist.init_process_group(backend="nccl" if cuda else "gloo", store=store, rank=rank, world_size=world,
                             timeout=timeout, device_id=torch.device(device) if cuda else None)
    return Dist(rank, local_rank, world, True, device, attempt)


def stop_distributed(dist, finished=False):
    """Leave the process group; after a finished run, first wait for every process to get here
    (one may still be evaluating, and gloo aborts a peer that leaves mid-conversation)."""
    if dist.enabled and tdist.is_initialized():
        if finished:
            tdist.barrier()
        tdist.destroy_process_group()


def data_parallel(model, dist):
    """model wrapped in DDP when this is a torchrun job (else model itself). Its buffers (the rope and
    ALiBi tables) are constants, the same on every process: DDP must not broadcast them at every
    forward. Newer torch renamed that switch (the new one still syncs once at start: harmless)."""
    if not dist.enabled:
        return model
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return DDP(model, device_ids=[dist.local_rank] if dist.device.startswith("cuda") else None,
               gradient_as_bucket_view=True,  # the gradients live in DDP's buckets: no second copy of them
               **{"forward_sync_buffers" if renamed else "broadcast_buffers": False})


def in_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK)."""
    return "RANK" in os.environ


def torchrun_rank() -> int:
    """This process's rank in its torchrun job, read before (or without) joining it; 0 outside torchrun."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def torchrun_group(device_name):
    """The with-block runs in torchrun's process group (a plain `python` run: rank 0 of 1, no group).
    After a finished block every process waits for the others, then leaves the group; after an
    error the block's frames are freed first (the DDP model in them holds the group's buffers)."""
    dist = start_distributed(device_name)
    try:
        yield dist
    except (KeyboardInterrupt, *EVERY_PROCESS_ERRORS) as e:  # torchrun relays a Ctrl-C to every process
        traceback.clear_frames(e.__traceback__)
        stop_distributed(dist)
        raise
    except BaseException:
        if dist.enabled:  # this process's own error: the others may wait in a collective, where NCCL's orderly
            traceback.print_exc()  # leaving would wait with them; exit now, and torchrun stops the others
            exit_process(1, at_once=True)
        raise
    stop_distributed(dist, finished=True)


def exit_process(code, at_once=False):
    """End the process with code. Under torchrun (or at_once) skip the interpreter's and C++'s teardown:
    after a clean destroy_process_group gloo can still abort a process there ("terminate called without
    an active exception", exit -6 after the run's last line), so the job would report a finished run as
    failed. Callers have closed every file."""
    if not (at_once or in_torchrun()):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*args, **kwargs):
    """print, on rank 0 only: one process speaks for a torchrun job (every one of them computes)."""
    if torchrun_rank() == 0:
        print(*args, **kwargs)


def any_rank(flag, dist) -> bool:
    """True when flag is true on any process (a collective: every process calls it at the same point)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([float(flag)], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(values, dist):
    """values (a tensor on dist.device) summed over all processes; gloo has no AVG, so callers divide."""
    if dist.enabled:
        values = values.clone()
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def sum_floats_over_ranks(values, dist) -> list:
    """Python floats summed over all processes, in float64 on the process group's device (CUDA or a CPU; MPS, which
    has no float64, runs no process group)."""
    if not dist.enabled:
        return list(values)
    return sum_over_ranks(torch.tensor(values, dtype=torch.float64, device=dist.device), dist).tolist()


def broadcast_from_master(value, dist):
    """Rank 0's value (any picklable object) on every process."""
    if not dist.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_tensors_from_master(tensors, dist):
    """Copy rank 0's values into every process's tensors (on dist.device), in place."""
    if dist.enabled:
        for tensor in tensors:
            tdist.broadcast(tensor, src=0)


def collectively(dist, runs_on, work, *args):
    """Every process calls this; work(*args) runs on all of them ('all'), or only on rank 0 ('master') or
    on local rank 0 of each node ('node'), the others waiting. Then every process raises the first
    exception any of them met, so an error on one rank (a full disk, a missing file) stops the whole
    job instead of leaving the others stuck in their next collective. Returns work's result (None
    where it did not run)."""
    chosen = {"all": True, "master": dist.rank == 0, "node": dist.local_rank == 0}[runs_on]
    result, error = None, None
    if chosen:
        try:
            result = work(*args)
        except Exception as e:  # passed to the other ranks, then raised everywhere
            error = e
    if dist.enabled:
        errors = [None] * dist.world_size
        tdist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
    if error is not None:
        raise error
    return result
