"""nanoGPT's CPU recipe for shakespeare_char, value for value (its README's CPU command on top of
its shakespeare_char config), so the two compare step for step: both land near 1.90 on the full val
split (docs/results.md). For a run that clearly beats it, see speedrun_cpu.py.

    python train.py configs/shakespeare_char_cpu.py
"""
out_dir = 'out-shakespeare-char-cpu'
eval_interval = 250
sample_interval = 250  # print what it writes at each evaluation
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
grad_clip = 1.0

device = 'cpu'
dtype = 'float32'  # what nanoGPT computes on a CPU; 'auto' would pick bf16 on CPUs that have it
compile = False
