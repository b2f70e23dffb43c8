"""Where a run computes: the device, the precision, the torchrun process group, and how a process
ends.

Every script asks here: no other file parses a device string, picks a dtype, or looks at
torch.distributed or torchrun's environment variables (checkpoint.py saves the GPU's RNG state).
Code elsewhere is device-agnostic: tensors are created on `device`, checkpoints load to the CPU,
and host-only calls (`.item()`, `.tolist()`, `.numpy()`) happen only on values moved or reduced
first.
"""
import ctypes
import datetime
import importlib.util
import os
import re
import signal
import sys
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as tdist

from tinygpt.common import EVERY_PROCESS_ERRORS, ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # every script's --dtype choices


def device_type(device) -> str:
    """'cuda' for 'cuda:1': the kind of device, as torch.autocast and GradScaler name it."""
    return device.split(":")[0]


def resolve_device(name="auto", make_current=True) -> str:
    """'cuda', 'mps' or 'cpu' for 'auto'; a named device is checked, with a one-line error if it is
    absent. A named GPU (cuda:N) becomes the current one unless make_current=False (under torchrun
    the local rank decides)."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"device={name!r}: use auto, cpu, cuda, cuda:N or mps")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}, but this torch ({torch.__version__}) sees no CUDA "
                          "GPU; use --device=cpu, or install a CUDA build of torch")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={name!r}, but there are only {torch.cuda.device_count()} "
                          "CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r}, but MPS is not available here; use --device=cpu")
    if kind == "cuda" and index and make_current:
        torch.cuda.set_device(name)  # the current device: its bf16 check, RNG state and kernels
    return name


def cpu_has_fast_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512-BF16 or AMX). mkldnn's own check also
    says yes on plain AVX-512, where bf16 is emulated and slower than float32, so read the flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@dataclass(frozen=True)
class Capabilities:
    """What a device offers, as far as the decisions below need it. They all read it from
    capabilities(), the one place that asks the hardware, so a test can run the real code under
    the rules of a device absent here by substituting that one function (tests/test_devices.py)."""
    bf16: bool         # bf16 in hardware; emulated bf16 (T4, V100) is slow, with no flash kernels
    fp16: bool         # fp16 tensor cores: fp16 + GradScaler pays where bf16 is missing
    compile: bool      # torch.compile pays, and its kernels exist (Triton, compute capability 7.0)
    fused_adamw: bool  # torch has a fused AdamW kernel for this kind of device


def has_fused_adamw(kind) -> bool:
    """Whether this torch ships a fused AdamW kernel for the device kind (CUDA, CPU, and MPS since
    torch 2.4): it is much faster than AdamW's loop over the tensors."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    return kind in _get_fused_kernels_supported_devices()


def has_triton() -> bool:
    """Whether Triton is installed: inductor compiles GPU kernels with it, and without it (Windows
    wheels, some clusters) torch.compile fails at the first forward."""
    return importlib.util.find_spec("triton") is not None


def capabilities(device) -> Capabilities:
    """The capabilities of device ('cuda:1', 'mps', 'cpu'). An Apple GPU (MPS) also has no
    float64, which no code puts on a device; only CUDA's batches are pinned. On a CPU compile is
    off: its compile time outweighs its gain on a short run (docs/results.md)."""
    kind = device_type(device)
    fused = has_fused_adamw(kind)
    if kind == "cuda":
        tensor_cores = torch.cuda.get_device_capability(device) >= (7, 0)  # Volta and later
        return Capabilities(bf16=torch.cuda.is_bf16_supported(including_emulation=False),
                            fp16=tensor_cores, compile=tensor_cores and has_triton(),
                            fused_adamw=fused)
    if kind == "cpu":
        return Capabilities(bf16=cpu_has_fast_bf16(), fp16=False, compile=False, fused_adamw=fused)
    return Capabilities(bf16=False, fp16=False, compile=False, fused_adamw=fused)


def model_dtype(name, device, model_args, can=None) -> str:
    """The one decision of a model's compute dtype on device: 'float32', 'bfloat16' or 'float16'
    for dtype=name, from the model's own config (model_args: GPTConfig's fields as a dict).
    'auto' picks the fastest safe one: bf16 where the hardware has it, else fp16 + GradScaler where
    fp16 pays, except for ReLU^2 models, whose activations overflow float16 past 256 (an inf in
    the forward that GradScaler cannot skip): float32 for them. can: another device's
    Capabilities (a table of GPUs)."""
    if name != "auto":
        return name
    can = can or capabilities(device)
    if can.bf16:
        return "bfloat16"
    return "float16" if can.fp16 and model_args.get("mlp") != "relu2" else "float32"


def autocast_context(device, dtype):
    """Mixed precision for forward passes: autocast to dtype, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type=device_type(device), dtype=getattr(torch, dtype))


def set_up_device(device, keep_freed_memory=False):
    """Process-wide settings: TF32 matmuls on CUDA (float32 range, 10-bit mantissa: fine for
    training, much faster), and glibc's allocator."""
    if keep_freed_memory:
        keep_freed_host_memory()
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")


def keep_freed_host_memory() -> bool:
    """Tell glibc's malloc to serve big blocks from its heap and keep freed memory, as
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=... would. By default each
    block over 32 MB is mmap-ed and returned when freed, so tensors allocated afresh every step
    (the logits of a 50,257-way head) fault in new pages every step: kernel time. False where
    there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt's parameter numbers (malloc.h)
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, (bf16/fp16, tf32) FLOP/s,
# for the words of a device name. Most specific first: 'H100 PCIe' before 'H100'. The A10G has
# its own, unpublished figure: unknown.
GPU_PEAK_FLOPS = [
    (("b200",), 2250e12, 1100e12), (("gh200",), 989e12, 494e12),
    (("h200", "nvl"), 836e12, 418e12), (("h200",), 989e12, 494e12),
    (("h100", "nvl"), 835e12, 418e12), (("h100", "pcie"), 756e12, 378e12),
    (("h100",), 989e12, 494e12), (("a100",), 312e12, 156e12), (("a10g",), 0.0, 0.0),
    (("a10",), 125e12, 62.5e12), (("a30",), 165e12, 82e12), (("a40",), 149.7e12, 74.8e12),
    (("l40s",), 362e12, 183e12), (("l40",), 181e12, 90.5e12), (("l4",), 121e12, 60e12),
    (("v100",), 125e12, 15.7e12), (("t4",), 65e12, 8.1e12),
    (("rtx", "a6000"), 154.8e12, 77.4e12), (("rtx", "4090"), 165.2e12, 82.6e12),
    (("rtx", "3090"), 71e12, 35.6e12)]


def gpu_peak_flops(name, dtype) -> float:
    """The peak of the GPU called name (as torch.cuda.get_device_name gives it) in dtype; 0.0 when
    unknown."""
    # Whole words, so that 'L4' is not found in 'L40S', nor 'A40' in 'A4000'.
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    for pattern, half, tf32 in GPU_PEAK_FLOPS:
        if words.issuperset(pattern):
            return tf32 if dtype == "float32" else half
    return 0.0


def measured_matmul_flops(dtype) -> float:
    """FLOP/s of this CPU's fastest square matmul in dtype: threads warmed up first, then the best
    of three runs at each of two sizes, so that it is a peak (one cold run reads low, and MFU over
    it then passes 100%). Emulated half types get small sizes, which take seconds less."""
    emulated = dtype == torch.float16 or (dtype == torch.bfloat16 and not cpu_has_fast_bf16())
    sizes = (256, 512) if emulated else (512, 1024)
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
    """Peak FLOP/s of one device for MFU: measured on a CPU, looked up for known GPUs, else 0."""
    kind = device_type(device)
    if kind == "cpu":
        return measured_matmul_flops(getattr(torch, dtype))
    if kind == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    return 0.0


def free_memory_bytes(device) -> int | None:
    """Bytes this process may still use on device, or None where nothing says: a GPU's free
    memory; an Apple GPU's recommended working set less what torch holds there; on a CPU the
    host's available memory, shared by the processes of this node that torchrun started."""
    kind = device_type(device)
    if kind == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if kind == "mps":
        limit = getattr(torch.mps, "recommended_max_memory", None)
        return limit() - torch.mps.current_allocated_memory() if limit else None
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
        available = next(int(line.split()[1]) * 1024 for line in lines
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


LOGIT_BYTES = 12  # per logit an evaluation holds at once: logits, a float32 copy, the log-softmax
HOST_LOGITS_BUDGET = 1 << 30  # bytes of logits per forward pass on a CPU or a Mac


def logits_budget(device) -> int:
    """Bytes one evaluation pass's logits may take: a quarter of a GPU's free memory, or 1 GB."""
    if device_type(device) == "cuda":
        return free_memory_bytes(device) // 4
    return HOST_LOGITS_BUDGET


def rows_within(budget, seq_len, vocab_size, most) -> int:
    """Sequences of seq_len tokens per forward pass whose logits (vocab_size each) fit in budget
    bytes: at least one, at most `most`."""
    return max(1, min(most, budget // (seq_len * vocab_size * LOGIT_BYTES)))


# ------------------------------------------------------------------------------ distributed

@dataclass(frozen=True)
class Dist:
    """Where this process sits in a torchrun job; a plain `python` run is rank 0 of 1.

    Every method below is a collective: each process of the job calls it at the same point. An
    error in work run by one process is raised on all of them, so a full disk or a missing file on
    one rank stops the whole job instead of leaving the others waiting in their next collective."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False
    device: str = "cpu"
    attempt: int = 0  # how often torchrun has relaunched the job after a failure

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def on_master(self, work, *args):
        """work(*args) on rank 0 while the others wait; its result there, None elsewhere."""
        return self._run(self.rank == 0, work, args)

    def on_each_node(self, work, *args):
        """work(*args) on local rank 0 of every node while the others wait."""
        return self._run(self.local_rank == 0, work, args)

    def on_every_process(self, work, *args):
        """work(*args) on every process; then any process's error is raised on all of them."""
        return self._run(True, work, args)

    def _run(self, chosen, work, args):
        result, error = None, None
        if chosen:
            try:
                result = work(*args)
            except Exception as e:  # handed to the other ranks, then raised everywhere
                error = e
        if self.enabled:
            errors = [None] * self.world_size
            tdist.all_gather_object(errors, error)
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error
        return result

    def from_master(self, value):
        """Rank 0's value (any picklable object) on every process."""
        if not self.enabled:
            return value
        box = [value]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def copy_from_master(self, tensors):
        """Copy rank 0's values into every process's tensors (on this device), in place."""
        if self.enabled:
            for tensor in tensors:
                tdist.broadcast(tensor, src=0)

    def any(self, flag) -> bool:
        """True when flag is true on any process."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values):
        """values (a tensor on this device) summed over all processes. gloo has no average, so
        callers divide."""
        if self.enabled:
            values = values.clone()
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def sum_floats(self, values) -> list:
        """Python floats summed over all processes, in float64 (MPS has no float64, but it never
        runs a process group)."""
        if not self.enabled:
            return list(values)
        return self.sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()


def start_distributed(device_name) -> Dist:
    """Join the torchrun job if RANK is set (NCCL on CUDA, gloo on CPU) and pick this process's
    device: cuda:LOCAL_RANK, made current before the process group starts."""
    device = resolve_device(device_name, make_current="RANK" not in os.environ)
    if "RANK" not in os.environ:
        return Dist(device=device)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    cuda = device.startswith("cuda")
    timeout = datetime.timedelta(minutes=30)
    # torchrun keeps one key-value store across restarts. A relaunched group that reused the old
    # keys could read the addresses its dead predecessor published (pytorch issue 135712), so
    # every attempt gets its own prefix. The attempt is counted in the store, which every node
    # shares: each agent's TORCHELASTIC_RESTART_COUNT counts only its own node's failures.
    store, _, _ = next(tdist.rendezvous("env://", rank, world, timeout=timeout))
    attempt = (store.add("tinygpt/joined", 1) - 1) // world  # an attempt's processes all join first
    store = tdist.PrefixStore(f"attempt{attempt}", store)
    tdist.init_process_group(backend="nccl" if cuda else "gloo", store=store, rank=rank,
                             world_size=world, timeout=timeout,
                             device_id=torch.device(device) if cuda else None)
    return Dist(rank, local_rank, world, True, device, attempt)


def stop_distributed(dist, finished=False):
    """Leave the process group. After a finished run, first wait for every process to get here:
    one may still be evaluating, and gloo aborts a peer that leaves mid-conversation."""
    if dist.enabled and tdist.is_initialized():
        if finished:
            tdist.barrier()
        tdist.destroy_process_group()


def in_torchrun() -> bool:
    """True in a process that torchrun started (it sets RANK)."""
    return "RANK" in os.environ


def torchrun_rank() -> int:
    """This process's rank in its torchrun job, read before (or without) joining it; 0 outside."""
    return int(os.environ.get("RANK", "0"))


@contextmanager
def torchrun_group(device_name):
    """The with-block runs in torchrun's process group (a plain `python` run: rank 0 of 1).
    After a finished block every process waits for the others, then leaves the group; after an
    error the block's frames are freed first (the DDP model in them holds the group's buffers)."""
    dist = start_distributed(device_name)
    try:
        yield dist
    except (KeyboardInterrupt, *EVERY_PROCESS_ERRORS) as e:  # torchrun relays Ctrl-C to every rank
        traceback.clear_frames(e.__traceback__)
        stop_distributed(dist)
        raise
    except BaseException:
        # This process's own error: the others may wait in a collective, where NCCL's orderly
        # leaving would wait with them. Exit now, and torchrun stops the others.
        if dist.enabled:
            traceback.print_exc()
            exit_process(1, at_once=True)
        raise
    stop_distributed(dist, finished=True)


def exit_process(code, at_once=False):
    """End the process with code. Under torchrun (or at_once) skip the interpreter's and C++'s
    teardown: after a clean destroy_process_group gloo can still abort a process there ("terminate
    called without an active exception"), and the job would report a finished run as failed.
    Callers have closed every file."""
    if not (at_once or in_torchrun()):
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def print0(*args, **kwargs):
    """print, on rank 0 only: one process speaks for a torchrun job (every one of them computes)."""
    if torchrun_rank() == 0:
        print(*args, **kwargs)


class StopSignal:
    """Inside the with-block, Ctrl-C (SIGINT), SIGTERM and SIGHUP (a closed terminal or SSH
    session; torchrun forwards it) set a flag instead of ending the process, so the loop can
    finish its step and save. torchrun relays one Ctrl-C to every process more than once, so only a
    second signal a second or more after the first raises KeyboardInterrupt: stop at once."""
    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                    if hasattr(signal, name))  # Windows has no SIGHUP

    def __init__(self, announce=True):
        self.requested, self.previous, self.announce = False, {}, announce
        self.first_at = 0.0

    def __enter__(self):
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested and time.monotonic() - self.first_at >= 1.0:
            raise KeyboardInterrupt
        if not self.requested:
            self.first_at = time.monotonic()
            if self.announce:
                print(f"{signal.Signals(signum).name} received: finishing this step, then saving "
                      "(again to stop at once)", flush=True)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
