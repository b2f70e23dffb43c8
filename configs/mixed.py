"""Attention proof: a task token decides, reverse ("rABCDEF=FEDCBA") or copy ("cABCDEF=ABCDEF").
Scored by exact match on the 300 test examples (bar 90%). Harder than either task alone: with
800 examples a small model memorizes them before it learns to route on the task token, so it
gets more width, dropout and strong weight decay, and more steps.

    python train.py configs/mixed.py
"""
out_dir = 'out-mixed'
dataset = 'mixed'
block_size = 13  # an example is 14 tokens

n_layer = 2
n_head = 4
n_embd = 128
pos = 'learned'
dropout = 0.1

batch_size = 64
learning_rate = 3e-3
max_iters = 1000
lr_decay_iters = 1000
warmup_iters = 20
min_lr = 3e-4
weight_decay = 1.0  # pushes the model off the memorized solution onto the general one

eval_interval = 250
eval_iters = 10
log_interval = 100
dtype = 'float32'
exact_match_bar = 0.90
