"""How a run spreads over processes and fits in memory: DDP or FSDP2, recomputed activations,
the whole-tensor state a checkpoint holds either way, and the memory plan printed before the
first step.

The plan is plain arithmetic over the shapes, written against what torch keeps (docs/gpu.md
checks it against measured CPU runs):
- weights and gradients are float32; the optimizer keeps two float32 moments per AdamW weight and
  one buffer per Muon matrix; FSDP splits all three over the processes, but while gradients
  accumulate over micro-steps (their reduce-scatter skipped) each process holds them whole, and a
  sharded model gathers the root's weights (embeddings, head) and two blocks' at a time;
- under bf16/fp16 autocast each matrix's half-precision copy is kept from the forward pass to the
  backward pass;
- activations are what autograd saves for the backward pass, per token of the micro-batch: per
  block the residual stream (float32) twice, the two norms' outputs, q, k and v, the attention's
  output (a fused kernel: no T x T matrix), its reshaped copy and the MLP's two 4x wide tensors;
  then the final norm and the logits: at the cross-entropy's backward its log-softmax, that
  output's gradient and the logits' gradient, 12 bytes per logit. With checkpoint_activations a
  block keeps only its input, and one block at a time is recomputed in the backward pass.
"""
import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

from tinygpt.common import ConfigError

# ----------------------------------------------------------------- spreading over processes

def spread(model, dist, fsdp=False, checkpoint_activations=False):
    """model (a GPT, with its weights in it) changed in place before its optimizer is made.
    checkpoint_activations keeps only each block's input for the backward pass and recomputes the
    rest of the block there. fsdp (under torchrun) shards every block, then the rest, over the
    processes (FSDP2): each holds 1/world_size of the weights, gradients and optimizer state, and a
    block's whole weights only while it computes. A single process has nothing to shard over."""
    if checkpoint_activations:
        for i, block in enumerate(model.blocks):  # the wrapper's state_dict hooks keep the keys
            model.blocks[i] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    if fsdp and dist.enabled:
        for block in model.blocks:
            fully_shard(block, reshard_after_forward=True)
        fully_shard(model, reshard_after_forward=False)  # the root (embeddings, head) stays whole
    return model


def is_sharded(model) -> bool:
    """True for a model (or a torch.compile wrapper of one) whose weights FSDP shards."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


def data_parallel(model, dist):
    """model wrapped in DDP when this is a torchrun job, else model itself (as when it is sharded:
    FSDP syncs its own gradients). Its buffers (the rope and ALiBi tables) are constants, the same
    on every process, so DDP must not broadcast them at every forward; newer torch renamed that
    switch."""
    if not dist.enabled or is_sharded(model):
        return model
    renamed = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    no_buffer_sync = {"forward_sync_buffers" if renamed else "broadcast_buffers": False}
    device_ids = [dist.local_rank] if dist.device.startswith("cuda") else None
    # gradient_as_bucket_view: the gradients live in DDP's buckets, with no second copy of them
    return DDP(model, device_ids=device_ids, gradient_as_bucket_view=True, **no_buffer_sync)


def sync_gradients(model, sync):
    """Whether the next backward pass syncs gradients over the processes (DDP's all-reduce, FSDP's
    reduce-scatter): only on a step's last micro-step; the others accumulate locally."""
    if is_sharded(model):
        getattr(model, "_orig_mod", model).set_requires_gradient_sync(sync)
    else:
        model.require_backward_grad_sync = sync


@contextmanager
def whole_weights(model):
    """Inside the block every process holds the whole weights of a sharded model (else nothing
    changes), so forward passes issue no collective: evaluation's processes score different
    numbers of batches, and generation may run on one of them. Sharded again after."""
    model = getattr(model, "_orig_mod", model)
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)  # as spread


def grad_scaler(device, dtype, sharded=False):
    """A GradScaler that is on only for float16, whose small range needs the loss scaled. Over
    sharded weights each process sees only its shards' gradients, so whether any was inf must be
    agreed by every process before they step or skip together: the sharded scaler does, in
    unscale_ (clip_and_step calls it before every step)."""
    kind = SharedInfScaler if sharded else torch.amp.GradScaler
    return kind(device.split(":")[0], enabled=dtype == "float16")


class SharedInfScaler(ShardedGradScaler):
    """torch's ShardedGradScaler with its found-inf flags 0-dim, as GradScaler's are: fused AdamW
    subtracts them from its 0-dim step counts, and torch's 1-element flags fail there ("output
    with shape [] doesn't match the broadcast shape [1]"). Views: the all-reduce still reaches
    them."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16=True):
        flags = super()._unscale_grads_(optimizer, inv_scale, found_inf, allow_fp16)
        return {device: flag.view(()) for device, flag in flags.items()}


# ------------------------------------------------------------- whole tensors for checkpoints

FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on rank 0's host


def model_state(model) -> dict:
    """model's state_dict with whole tensors: a sharded model's gathered onto rank 0's host (the
    others get {}: they save nothing), so every checkpoint holds the same plain tensors."""
    if is_sharded(model):
        return get_model_state_dict(model, options=FULL_ON_RANK0)
    return model.state_dict()


def optimizer_state(model, optimizer) -> dict:
    """optimizer's state_dict with whole tensors, numbered as torch numbers a plain model's
    parameters: a sharded model's gathered onto rank 0's host (the others get {}). torch names
    the gathered entries by parameter name; numbered in the groups' order they get torch's
    numbers."""
    if not is_sharded(model):
        return optimizer.state_dict()
    full = get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)
    if not full:
        return {}
    names = [name for group in full["param_groups"] for name in group["params"]]
    number = {name: i for i, name in enumerate(names)}
    return {"state": {number[name]: state for name, state in full["state"].items()},
            "param_groups": [{**group, "params": [number[n] for n in group["params"]]}
                             for group in full["param_groups"]]}


def sharded_like(value, param):
    """value (a whole tensor: a saved moment or weight) as param holds it: this process's shard
    for a sharded param (cut from the whole tensor every process has, with no communication),
    else value."""
    if isinstance(param, DTensor) and not isinstance(value, DTensor) and value.shape == param.shape:
        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return value


def whole(tensor):
    """The whole of a sharded tensor on every process (a collective), else tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def load_model_state(model, state, dist):
    """Whole-tensor weights into model on every process, from state on rank 0 (the others may
    pass None): a sharded model takes its shards of them, a plain one a broadcast copy."""
    if is_sharded(model):
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, state if dist.is_master else {}, options=options)
        return
    if state is not None:
        model.load_state_dict(state)
    dist.copy_from_master([p.detach() for p in model.parameters()])


# ------------------------------------------------------------------------ the memory plan

HEADROOM = 0.9  # the share of free memory a plan may fill: allocator blocks, kernels' workspaces
GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process, and what they were estimated for."""
    weights: int
    gradients: int
    optimizer: int
    activations: int
    rows: int                 # sequences per process per micro-step
    micro_steps: int          # micro-steps per process per optimizer step
    block_size: int
    world_size: int
    fsdp: bool
    checkpoint_activations: bool

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations


def parameter_counts(model_args) -> dict:
    """{'block': parameters of one block, 'matrices': of its 2-D weights (Muon's share), 'root': of
    the embeddings, positions, final norm and an untied head} of a GPT with model_args."""
    c, bias = model_args["n_embd"], model_args.get("bias", False)
    matrices = 12 * c * c  # c_attn 3c^2, attention c_proj c^2, MLP c_fc 4c^2 and c_proj 4c^2
    block = matrices + 2 * c + (11 * c if bias else 0)  # norm gains; biases 3c + c + 4c + c + 2c
    heads = 1 if model_args.get("tie_weights", True) else 2
    root = model_args["vocab_size"] * c * heads + c + (c if bias else 0)
    if model_args.get("pos", "learned") == "learned":
        root += model_args["block_size"] * c
    return {"block": block, "matrices": matrices, "root": root}


def parameter_total(model_args) -> int:
    """The number of parameters of a GPT with model_args (tied weights once)."""
    counts = parameter_counts(model_args)
    return counts["root"] + model_args["n_layer"] * counts["block"]


def size_text(n) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def activation_bytes_per_token(model_args, dtype) -> dict:
    """Bytes per token: 'block', what autograd keeps for one block; 'block_input', for a recomputed
    block; 'head', for the final norm and the head; 'logits', at the cross-entropy's backward;
    'backward', a block's backward pass at its widest (the gradients of the MLP's wide tensors)."""
    c = model_args["n_embd"]
    half = 2 if dtype in ("bfloat16", "float16") else 4  # what a matmul saves under autocast
    attention = 4 if model_args.get("attn_float32") else half
    rope, qk_norm = model_args.get("pos") == "rope", bool(model_args.get("qk_norm"))
    block = (2 * 4 * c                                  # the residual stream, at each norm
             + half * (c + c + c + 8 * c)               # norms' outputs, attention's reshaped, MLP
             + attention * (3 * c + c)                  # q, k, v and the attention's output
             + attention * 2 * c * (rope + qk_norm)     # rotated and normed queries and keys
             + 2 * c * (model_args.get("dropout", 0.0) > 0))  # dropout's one-byte masks
    return {"block": block, "block_input": 4 * c, "head": (4 + half) * c,
            "logits": 12 * model_args["vocab_size"], "backward": half * 8 * c}


def memory_plan(model_args, dtype, rows, micro_steps=1, muon=False, world_size=1, fsdp=False,
                checkpoint_activations=False) -> MemoryPlan:
    """The plan of one of world_size processes training a GPT with model_args (GPTConfig's fields)
    on rows sequences of block_size tokens per micro-step, micro_steps per optimizer step, in dtype
    (the compute dtype), with AdamW (and Muon for the blocks' matrices when muon)."""
    counts, layers = parameter_counts(model_args), model_args["n_layer"]
    params, sharded = parameter_total(model_args), fsdp and world_size > 1
    muon_params = layers * counts["matrices"] if muon else 0
    shards = world_size if sharded else 1
    weights = gradients = 4 * params // shards
    if sharded:  # gathered while they compute: the root, a block and the next one's prefetch
        weights += 4 * (counts["root"] + 2 * counts["block"])
        gradients += 4 * params if micro_steps > 1 else 4 * (counts["root"] + counts["block"])
    if dtype in ("bfloat16", "float16"):  # autocast's half copies of the matrices and the head
        lm_head = model_args["vocab_size"] * model_args["n_embd"]
        weights += 2 * (layers * counts["matrices"] + lm_head)
    optimizer = (8 * (params - muon_params) + 4 * muon_params) // shards
    per_token = activation_bytes_per_token(model_args, dtype)
    # The backward pass meets the logits first, then the blocks, last first: the peak is at either.
    head = per_token["head"] + per_token["logits"]
    if checkpoint_activations:  # blocks keep their inputs; one is recomputed at a time
        per_layer, widest = per_token["block_input"], per_token["block"] + per_token["backward"]
    else:
        per_layer, widest = per_token["block"], per_token["backward"]
    activations = rows * model_args["block_size"] * (layers * per_layer + max(head, widest))
    return MemoryPlan(weights, gradients, optimizer, activations, rows, micro_steps,
                      model_args["block_size"], world_size, sharded, checkpoint_activations)


def plan_text(plan, free=None) -> str:
    """The two lines train.py prints before the first step."""
    named = (("FSDP", plan.fsdp), ("activation checkpointing", plan.checkpoint_activations))
    options = [name for name, on in named if on]
    room = f"{size_text(free)} free on the device" if free is not None else "free memory unknown"
    return (f"memory per process: weights {size_text(plan.weights)}, gradients "
            f"{size_text(plan.gradients)}, optimizer {size_text(plan.optimizer)}, activations "
            f"{size_text(plan.activations)} ({plan.rows} x {plan.block_size} tokens a micro-step)\n"
            f"memory plan: {size_text(plan.total)} a process of {plan.world_size}"
            f"{' with ' + ' and '.join(options) if options else ''}; {room}")


def fits(plan, free) -> bool:
    """True when the plan fills at most HEADROOM of free bytes (always when free is unknown)."""
    return free is None or plan.total <= HEADROOM * free


def options_that_fit(settings, free) -> list:
    """The command-line options, each alone, that make the plan of settings (memory_plan's keyword
    arguments) fit free bytes. A smaller micro-batch keeps the global batch: rows' sequences a
    micro-step and rows x micro_steps / rows' micro-steps a process, given as the options that
    split so (gradient_accumulation_steps that the process count divides splits by micro-steps)."""
    plan, options = memory_plan(**settings), []
    for rows in (r for r in range(plan.rows - 1, 0, -1) if plan.rows % r == 0):
        micro_steps = plan.micro_steps * plan.rows // rows
        if fits(memory_plan(**{**settings, "rows": rows, "micro_steps": micro_steps}), free):
            options.append(f"--batch_size={rows} --gradient_accumulation_steps="
                           f"{micro_steps * plan.world_size} (the same global batch)")
            break
    recomputed = memory_plan(**{**settings, "checkpoint_activations": True})
    if not plan.checkpoint_activations and fits(recomputed, free):
        options.append("--checkpoint_activations=True")
    for n in [] if plan.fsdp else [plan.world_size] if plan.world_size > 1 else [2, 4, 8, 16]:
        if fits(memory_plan(**{**settings, "fsdp": True, "world_size": n}), free):
            launch = "" if plan.world_size > 1 else f" (torchrun --nproc_per_node={n}, a GPU each)"
            options.append(f"--fsdp=True over {n} processes{launch}")
            break
    return options


def checked_plan(cfg, model_args, dtype, rows, micro_steps, world_size, free) -> str:
    """The lines of a training run's memory plan, to print before its first step; a one-line
    ConfigError, naming the options that would fit, when the run will not fit free bytes."""
    settings = dict(model_args=model_args, dtype=dtype, rows=rows, micro_steps=micro_steps,
                    muon=cfg.muon_lr > 0, world_size=world_size, fsdp=cfg.fsdp,
                    checkpoint_activations=cfg.checkpoint_activations)
    check_fits(settings, free)
    return plan_text(memory_plan(**settings), free)


def check_fits(settings, free, where="the device"):
    """A one-line ConfigError when the plan of settings does not fit free bytes, naming the options
    that would."""
    plan = memory_plan(**settings)
    if fits(plan, free):
        return
    options = options_that_fit(settings, free)
    advice = ("options that would fit: " + "; ".join(options) if options else
              "no single option fits: combine --fsdp=True over more processes, "
              "--checkpoint_activations=True and a smaller --batch_size, or train a smaller model")
    parts = ", ".join(f"{name} {size_text(getattr(plan, name))}"
                      for name in ("weights", "gradients", "optimizer", "activations"))
    raise ConfigError(f"this run needs ~{size_text(plan.total)} per process ({parts}), but {where} "
                      f"has {size_text(free)} free; {advice}")
