"""CPU speedrun: val loss <= 1.88 on shakespeare_char (full val split) in as little wall time as
possible on a 2-core CPU, against nanoGPT's CPU recipe (its full-split loss and the times are in
docs/results.md).

Same 4-layer, 128-wide shape and block 64 as that recipe; what changes (each lever's effect is
measured in docs/results.md): Muon for the matrices inside the blocks, rotary positions, ReLU^2 MLP,
QK-norm, zero-initialised output projections, an untied head, bf16 autocast where the CPU has bf16
hardware, with the attention in fp32 (the CPU's bf16 attention backward is slower), a short linear
schedule to zero with no warmup at a high AdamW lr, batch 16, no evaluation until the one full-split
evaluation at the end, and no interpreter teardown after it.

    python train.py configs/speedrun_cpu.py
"""
out_dir = 'out-speedrun-cpu'
dataset = 'shakespeare_char'
eval_interval = 100000  # no evaluation during the run; the final full-split evaluation decides
eval_iters = 1
log_interval = 20
val_loss_bar = 1.88

batch_size = 16
block_size = 64
gradient_accumulation_steps = 1

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
pos = 'rope'
mlp = 'relu2'
qk_norm = True
zero_init_proj = True
tie_weights = False
attn_float32 = True

max_iters = 240
learning_rate = 1e-2  # AdamW: embeddings, head, norm gains
muon_lr = 0.02        # Muon: the 2-D weights inside the blocks
muon_momentum = 0.85
weight_decay = 0.1
beta2 = 0.99
grad_clip = 1.0
decay_lr = True
lr_schedule = 'linear'
warmup_iters = 0
lr_decay_iters = 240
min_lr = 0.0

device = 'cpu'
# Autocast to bf16 only where the CPU computes it in hardware: emulated bf16 is slower than fp32.
dtype = 'auto'
compile = False  # compiling takes longer than the whole run
fast_exit = True
