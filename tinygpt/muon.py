"""Muon for the matrices inside the blocks, which optim.py puts beside AdamW when muon_lr > 0.

BatchedMuon is Muon as torch.optim.Muon computes it, with the Newton-Schulz iterations of same-shape
matrices run together: Muon orthogonalizes each matrix's update with five Newton-Schulz steps, three
matmuls each, on matrices as small as 128 x 128, and a CPU runs such products much faster per FLOP
as one batched product than one at a time (docs/results.md). The arithmetic per matrix is torch's,
and so is the state (a momentum buffer per matrix): checkpoints load in either. One exception: a
device without bf16 hardware (an AVX2-only CPU, a T4, a Mac) emulates bf16 matmuls or lacks them, so
there the iterations run in fp32 (docs/results.md)."""
import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


class BatchedMuon(torch.optim.Muon):
    """torch.optim.Muon (torch >= 2.9): Nesterov momentum, bf16 Newton-Schulz on the wide
    orientation, the lr scaled by sqrt(max(1, rows / cols)) ("original"), decoupled weight decay;
    same-shape matrices orthogonalized as one."""

    def __init__(self, params, ns_dtype=torch.bfloat16, **options):
        super().__init__(params, **options)
        self.ns_dtype = ns_dtype  # bf16 as torch's, or fp32 where bf16 is emulated (optim.py)
        if any(group["adjust_lr_fn"] not in (None, "original") for group in self.param_groups):
            raise ValueError(
                "BatchedMuon scales the lr as adjust_lr_fn='original' does, and no other way"
            )

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
                    state["momentum_buffer"] = torch.zeros_like(
                        p.grad, memory_format=torch.preserve_format
                    )
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - momentum)
                by_shape.setdefault(p.shape, []).append(
                    (p, p.grad.lerp(buf, momentum) if group["nesterov"] else buf)
                )
            for (rows, cols), pairs in by_shape.items():
                # Over sharded weights (FSDP) every process gathers each whole update, since the
                # orthogonalization mixes all rows of a matrix, and keeps its own shard of it.
                stack = torch.stack([u.full_tensor() if isinstance(u, DTensor) else u
                                     for _, u in pairs])
                updates = newton_schulz(stack, group["ns_coefficients"], group["ns_steps"],
                                        group["eps"], self.ns_dtype)
                scale = -lr * math.sqrt(max(1, rows / cols))
                for (p, _), update in zip(pairs, updates):
                    if decay:
                        p.mul_(1 - lr * decay)
                    if isinstance(p, DTensor):
                        update = distribute_tensor(update, p.device_mesh, p.placements,
                                                   src_data_rank=None)
                    p.add_(update, alpha=scale)
        return loss


def newton_schulz(stack, coefficients, steps, eps, dtype=torch.bfloat16):
    """torch.optim.Muon's orthogonalization of each matrix in a stack (n, rows, cols): in bf16 (or
    dtype), on the wide orientation (rows <= cols, so the Gram matrices are the small ones), each
    scaled to Frobenius norm 1 first."""
    a, b, c = coefficients
    x = stack.to(dtype)
    tall = stack.size(-2) > stack.size(-1)
    x = x.mT if tall else x
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
