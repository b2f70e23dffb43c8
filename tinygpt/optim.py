"""The optimizers train.py steps: AdamW, with Muon for the blocks' matrices when muon_lr > 0; the
step itself (gradients unscaled, clipped, stepped and zeroed); and the learning-rate schedule."""
import math

import torch

from tinygpt.device import capabilities
from tinygpt.parallel import whole


def make_optimizers(model, weight_decay, learning_rate, betas, device_type, muon_lr=0.0,
                    muon_momentum=0.95, fused=None) -> list:
    """[AdamW], with weight decay on matrices only and fused where the device has the kernel
    (unless fused is given); with muon_lr > 0, [AdamW, Muon]: Muon takes the blocks' matrices,
    AdamW the embeddings, the head and the gains. Each group keeps its peak lr for the schedule."""
    named = dict(model.named_parameters())  # tied weights appear once
    hidden = [p for n, p in named.items() if muon_lr and n.startswith("blocks.") and p.dim() == 2]
    rest = [p for p in named.values() if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = capabilities(device_type).fused_adamw
    optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
    if hidden:
        from tinygpt.muon import BatchedMuon  # only Muon runs need it (and torch >= 2.9)
        # bf16 as torch's Muon computes it, where the device has bf16 in hardware; elsewhere
        # (an AVX2-only CPU, a T4, a Mac) bf16 matmuls are emulated or missing, and fp32 is faster.
        bf16 = capabilities(str(hidden[0].device)).bf16  # where the weights are
        ns_dtype = torch.bfloat16 if bf16 else torch.float32
        optimizers.append(BatchedMuon(hidden, ns_dtype, lr=muon_lr, momentum=muon_momentum,
                                      weight_decay=0.0, adjust_lr_fn="original"))
    for group in (g for optimizer in optimizers for g in optimizer.param_groups):
        group["peak_lr"] = group["lr"]
    return optimizers


def clip_and_step(optimizers, scaler, parameters, grad_clip, keep_grads=False):
    """One step of every optimizer on the accumulated gradients: unscaled (fp16), clipped to
    grad_clip (0: not clipped), stepped, then zeroed. Under DDP (keep_grads) they are zeroed in
    place: they are views of DDP's buckets, and fresh ones would be a second copy. GradScaler skips
    an optimizer whose own gradients overflowed, so the clip uses the norm of the gradients that
    do step: an inf in the norm would zero them, and a nan would poison them."""
    for optimizer in optimizers:  # the true gradients, not the scaled ones; and under FSDP the
        scaler.unscale_(optimizer)  # processes agree here whether any gradient was inf
    if grad_clip:
        parameters = [p for p in parameters if p.grad is not None]
        norm = finite_norm(optimizers, scaler, parameters)
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=not keep_grads)


def finite_norm(optimizers, scaler, parameters):
    """The gradient norm to clip with: of every parameter's gradient, or under fp16 of the
    optimizers whose gradients are finite. A non-finite norm counts as 0, so the clip factor
    clamps to 1 (a nan loss stops the run at its next log step)."""
    if scaler.is_enabled():  # fp16: one optimizer's gradients may be inf or nan, the other's not
        norms = torch.stack([global_norm(grads_of(o)) for o in optimizers])
        return torch.linalg.vector_norm(torch.where(norms.isfinite(), norms, 0.0))
    norm = global_norm([p.grad for p in parameters])
    return torch.where(norm.isfinite(), norm, 0.0)


def global_norm(grads) -> torch.Tensor:
    """The 2-norm of all of grads together; over sharded weights (FSDP) every process's shards
    count, and every process gets the same plain tensor."""
    return whole(torch.nn.utils.get_total_norm(grads))


def grads_of(optimizer) -> list:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def learning_rate_at(step, cfg) -> float:
    """Linear warmup over warmup_iters, then cosine (or linear) decay to min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    if cfg.lr_schedule == "linear":
        return cfg.learning_rate - progress * (cfg.learning_rate - cfg.min_lr)
    span = cfg.learning_rate - cfg.min_lr
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * span
