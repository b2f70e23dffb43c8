"""Attention proof: reverse 6 letters ("ABCDEF=" -> "FEDCBA"). Loss on the answer only; at the end
the greedy answers on the 200 test examples are scored by exact match (bar 95%).
With --attention=False (tokens cannot see each other) it must fail. The copy task
("ABCDEF=" -> "ABCDEF") trains with the same recipe.

    python train.py configs/reverse.py
    python train.py configs/reverse.py --dataset=copy --out_dir=out-copy
"""
out_dir = 'out-reverse'
dataset = 'reverse'
block_size = 12  # an example is 13 tokens: the model reads 12 and predicts the next of each

n_layer = 2
n_head = 4
n_embd = 64
pos = 'learned'  # reversal is an absolute-position map; learned positions find it fastest

batch_size = 64
learning_rate = 3e-3
max_iters = 300
lr_decay_iters = 300
warmup_iters = 20
min_lr = 3e-4

eval_interval = 100
eval_iters = 10
log_interval = 50
dtype = 'float32'  # a model this small gains nothing from bf16
exact_match_bar = 0.95
