"""TinyShakespeare in GPT-2 BPE tokens (vocab 50257) with a small model trained from scratch.
Only ~300k training tokens, so it overfits soon: dropout is high and ckpt.pt keeps the best val.

    python train.py configs/shakespeare.py
"""
out_dir = 'out-shakespeare'
eval_interval = 250
eval_iters = 100
log_interval = 10
always_save_checkpoint = False

dataset = 'shakespeare'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.2

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
