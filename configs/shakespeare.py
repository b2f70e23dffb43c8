"""TinyShakespeare in GPT-2 BPE tokens (vocab 50257), a small model trained from scratch, sized
for a CPU: the 50257-way head and embedding are most of the work (6.4M of 7.2M parameters), so
the model is narrow and the run short. ~300k training tokens overfit soon: ckpt.pt is the newest
state, best.pt the best-val one.
On a GPU, scale n_embd, batch_size and max_iters up.

    python train.py configs/shakespeare.py
    python sample.py --out_dir=out-shakespeare
"""
out_dir = 'out-shakespeare'
eval_interval = 100
eval_iters = 10
log_interval = 10

dataset = 'shakespeare'
gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.1

learning_rate = 2e-3
max_iters = 300
lr_decay_iters = 300
min_lr = 2e-4
beta2 = 0.99
warmup_iters = 30

# The 2,048 x 50,257 logits (412 MB) and their gradient are allocated every step: glibc's default
# hands such blocks back and faults in fresh pages each time (kernel time). keep_freed_memory
# reuses them (docs/results.md measures the difference).
keep_freed_memory = True
