"""GPT-2 (124M) from scratch on FineWeb-Edu's 10B-token sample: nanoGPT's config/train_gpt2.py
recipe (12 layers, 12 heads, 768 wide, 1024 context, ~0.5M tokens per step, 300B tokens in all).

    python prepare.py fineweb_edu      # the sample's parquet files, as shards (docs/data.md)
    torchrun --standalone --nproc_per_node=8 train.py configs/gpt2_124m.py

nanoGPT's val loss for this run is on OpenWebText, another corpus than FineWeb-Edu, so it is not a
bar here, and no run of this config was measured (docs/gpt2.md has both). The global batch is 32
micro-steps x 16 sequences x 1024 tokens = 524,288 tokens (nanoGPT: 40 x 12 x 1024 = 491,520):
16 x 32 splits evenly over 1, 2, 4, 8, 16 or 32 processes, so one GPU, one node of 8 and two or
four nodes run this file as written (each of 8 processes: 4 micro-steps of 16 sequences).
"""
out_dir = 'out-gpt2-124m'
wandb_log = False
wandb_project = 'fineweb-edu'
wandb_run_name = 'gpt2-124m'

dataset = 'fineweb_edu'
batch_size = 16
block_size = 1024
gradient_accumulation_steps = 32

# the model: GPT-2 small, nanoGPT's defaults (no biases, no dropout, learned positions)
n_layer = 12
n_head = 12
n_embd = 768
dropout = 0.0
bias = False

# AdamW and the schedule: 600k steps x 0.5M tokens = 300B tokens
learning_rate = 6e-4
max_iters = 600000
lr_decay_iters = 600000
min_lr = 6e-5
warmup_iters = 2000
weight_decay = 1e-1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 1000
hellaswag_interval = 0  # > 0: HellaSwag every N steps, as build-nanogpt (docs/evaluation.md)
eval_iters = 200
log_interval = 10
