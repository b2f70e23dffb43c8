"""The LM head's cross-entropy computed a few rows at a time, so the (rows, vocab) logits never exist whole.

With a 50,257-token vocabulary the logits of a 16 x 128 batch are 103M floats (412 MB), and their
gradient as many again; on a CPU, allocating those afresh each step is mostly page faults (kernel
time). Here each chunk's logits are made, turned into its loss and its gradient at once (the loss is
a scalar, so the gradient is known in the forward pass), and dropped: peak memory is one chunk, the
matmul work is the same three products as autograd's, and backward only scales the stored gradients.
"""
import torch


def chunked_cross_entropy(x, weight, targets, rows):
    """Mean cross-entropy of logits x @ weight.T against targets (-1 is ignored), `rows` rows at a time.

    x: (N, C) final hidden states, weight: (V, C) the head, targets: (N,). Equals
    F.cross_entropy(x @ weight.T, targets, ignore_index=-1) in value and in gradient.
    """
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(x, weight, targets, rows)
    with torch.no_grad():
        return _loss_and_grads(x, weight, targets, rows, with_grads=False)[0]


def _loss_and_grads(x, weight, targets, rows, with_grads):
    kind = x.device.type  # under autocast the products run in its dtype, as lm_head's would
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    with torch.autocast(kind, enabled=False):
        return _chunks(x, weight.to(dtype), targets, rows, with_grads, dtype)


def _chunks(x, w, targets, rows, with_grads, dtype):
    valid = targets != -1
    scale = valid / valid.sum()  # each row's weight in the mean; a tensor, so no host sync
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if with_grads else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=x.device) if with_grads else None
    for i in range(0, x.size(0), rows):
        xs, ts, ss = x[i:i + rows].to(dtype), targets[i:i + rows].clamp(min=0)[:, None], scale[i:i + rows, None]
        logp = (xs @ w.t()).float().log_softmax(dim=-1)
        loss -= (logp.gather(1, ts) * ss).sum()
        if with_grads:  # d loss / d logits = (softmax - one_hot) * scale: zero on ignored rows
            grad = logp.exp_().scatter_add_(1, ts, logp.new_full(ts.shape, -1.0))
            grad_x[i:i + rows] = (grad.to(dtype) @ w).float() * ss
            grad_w.addmm_(grad.t(), xs.float() * ss)  # in fp32, in place: no (V, C) temporary per chunk
    return loss, grad_x, grad_w


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, rows):
        loss, grad_x, grad_w = _loss_and_grads(x, weight, targets, rows, with_grads=True)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None
