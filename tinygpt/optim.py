"""The optimizers train.py steps: AdamW, and Muon for the matrices inside the blocks when muon_lr > 0.

BatchedMuon is Muon as torch.optim.Muon computes it, with the Newton-Schulz iterations of same-shape
matrices run together: Muon orthogonalizes each matrix's update with five Newton-Schulz steps, three
matmuls each, on matrices as small as 128 x 128, and a CPU runs such products much faster per FLOP as
one batched product than one at a time (docs/results.md). The arithmetic per matrix is torch's, and so
is the state (a momentum buffer per matrix): checkpoints load in either. One exception: a device without
bf16 hardware (an AVX2-only CPU, a T4, a Mac) emulates bf16 matmuls or lacks them, so there the iterations
run in fp32 (docs/results.md).
"""
import math

import torch

import tinygpt.device


def make_optimizers(model, weight_decay, learning_rate, betas, device_type, muon_lr=0.0, muon_momentum=0.95,
                    fused=None) -> list:
    """[AdamW] with weight decay on matrices only, fused where the device has the kernel (unless fused is given);
    with muon_lr > 0 [AdamW, Muon]: Muon (torch >= 2.9's, batched by shape) takes the blocks' 2-D weights; AdamW the
    embeddings, the head and the gains."""
    named = dict(model.named_parameters())  # tied weights appear once
    hidden = [p for n, p in named.items() if muon_lr and n.startswith("blocks.") and p.dim() == 2]
    rest = [p for p in named.values() if all(p is not h for h in hidden)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if fused is None:
        fused = tinygpt.device.capabilities(device_type).fused_adamw
    optimizers = [torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)]
    if hidden:
        optimizers.append(BatchedMuon(hidden, lr=muon_lr, momentum=muon_momentum, weight_decay=0.0,
                                      adjust_lr_fn="original"))
    return optimizers


def clip_and_step(optimizers, scaler, parameters, grad_clip, keep_grads=False):
    """One optimizer step of every optimizer on the accumulated gradients: unscaled (fp16), clipped to grad_clip
    (0: not clipped), stepped, then zeroed: set to None, or with keep_grads zeroed in place (under DDP they are
    views of its buckets, gradient_as_bucket_view: fresh ones would be a second copy, copied into the buckets).
    GradScaler skips each optimizer whose own gradients overflowed; the clip then uses the norm of the others'
    gradients, the ones that step: an inf in the norm would zero them, a nan poison them, and leaving them
    unclipped would let a spike through on the very step where the loss scale was too high."""
    for optimizer in optimizers:  # before clipping: the true gradients, not the scaled ones
        scaler.unscale_(optimizer)  # (and FSDP's scaler agrees on infs over the processes here)
    if grad_clip:
        parameters = [p for p in parameters if p.grad is not None]
        if scaler.is_enabled():  # fp16: one optimizer's gradients may be inf or nan, the other's not
            norms = torch.stack([global_norm(grads_of(optimizer)) for optimizer in optimizers])
            norm = torch.linalg.vector_norm(torch.where(norms.isfinite(), norms, 0.0))
        else:  # a non-finite norm here means a nan loss, which stops the run at its next log step
            norm = global_norm([p.grad for p in parameters])
            norm = torch.where(norm.isfinite(), norm, 0.0)  # 0: the clip factor clamps to 1, nothing scaled
        torch.nn.utils.clip_grads_with_norm_(parameters, grad_clip, norm)
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=not keep_grads)


def global_norm(grads) -> torch.Tensor:
    """The 2-norm of all of grads together; over sharded weights (FSDP) every process's shards
    count, and every process gets the same plain tensor."""
    return tinygpt.device.whole(torch.nn.utils.get_total_norm(grads))


def grads_of(optimizer) -> list:
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def load_optimizer_state(optimizer, saved):
    """saved's moments and step counts, under this optimizer's own settings: its lr, betas and decay, and its
    kernel. The saved kernel flags decide where torch puts the step counts: an unfused run's (fused=False) would
    leave them on the host, and a fused CUDA kernel rejects them. A checkpoint holds whole tensors;
    over sharded weights (FSDP) each process keeps its shard of each moment."""
    settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    groups = [{**old, **new} for old, new in zip(saved["param_groups"], settings)]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: tinygpt.device.sharded_like(v, params[i]) for k, v in moments.items()}
             for i, moments in saved["state"].items()}
    optimizer.load_state_dict({**saved, "state": state, "param_groups": groups})


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon (torch >= 2.9): Nesterov momentum, bf16 Newton-Schulz on the wide orientation, the lr scaled
    by sqrt(max(1, rows / cols)) ("original"), decoupled weight decay; same-shape matrices orthogonalized as one."""

    def __init__(self, params, ns_dtype=None, **options):
        super().__init__(params, **options)
        self.ns_dtype = ns_dtype or newton_schulz_dtype(self.param_groups[0]["params"][0].device)
        if any(group["adjust_lr_fn"] not in (None, "original") for group in self.param_groups):
            raise ValueError("BatchedMuon scales the lr as adjust_lr_fn='original' does, and no other way")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum, lr, decay = group["momentum"], group["lr"], group["weight_decay"]
            by_shape = {}
            for p in (p for p in group["params"] if p.grad is not None):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, momentum) if group["nesterov"] else buf))
            for (rows, cols), pairs in by_shape.items():
                # Over sharded weights (FSDP) each process gathers every whole update, since the
                # orthogonalization mixes all rows of a matrix; all of them compute every update,
                # as under DDP, and each keeps its shard.
                whole = torch.stack([tinygpt.device.whole(update) for _, update in pairs])
                updates = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"],
                                        group["eps"], self.ns_dtype)
                scale = -lr * math.sqrt(max(1, rows / cols))
                for (p, _), update in zip(pairs, updates):
                    if decay:
                        p.mul_(1 - lr * decay)
                    p.add_(tinygpt.device.sharded_like(update, p), alpha=scale)
        return loss


def newton_schulz_dtype(device):
    """bf16, as torch's Muon, where the device has it in hardware; else fp32, which is faster there (a CPU
    without bf16 instructions, a T4 or V100 emulate bf16) and runs where bf16 may not (an older Mac)."""
    return torch.bfloat16 if tinygpt.device.capabilities(str(device)).bf16 else torch.float32


def newton_schulz(stack, coefficients, steps, eps, dtype=torch.bfloat16):
    """torch.optim.Muon's orthogonalization of each matrix in a stack (n, rows, cols): in bf16 (or dtype), on the
    wide orientation (rows <= cols, so the Gram matrices are the small ones), each scaled to Frobenius norm 1 first."""
    a, b, c = coefficients
    x = stack.to(dtype)
    tall = stack.size(-2) > stack.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
