"""TinyTalks Q&A by character ("Q: ...\nA: ...\n\n"), a first CPU recipe: about 13 KB of
training text, so a small model with strong dropout, and ckpt.pt holds the best-val weights
(the end of the run is not saved over them) for `python sample.py --out_dir=out-tinytalks --chat`.

    python train.py configs/tinytalks.py
"""
out_dir = 'out-tinytalks'
eval_interval = 100
eval_iters = 20
log_interval = 25
always_save_checkpoint = False
save_latest = False

dataset = 'tinytalks'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.2

learning_rate = 1e-3
max_iters = 700  # val stops improving near 600-700 steps; longer runs only overfit
lr_decay_iters = 700
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
weight_decay = 0.1
val_loss_bar = 1.5  # the TinyTorch milestone's bar
