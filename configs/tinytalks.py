"""TinyTalks Q&A by character ("Q: ...\nA: ...\n\n"). The train split is only 12,680
characters, so the model is small, dropout is high and the run is short: with the speedrun's
levers (Muon, rotary positions, ReLU^2, QK-norm) val loss passes the milestone's 1.5 in about
300 steps, and every longer or wider run we measured only overfit (docs/results.md, "TinyTalks").

    python train.py configs/tinytalks.py
    python sample.py --out_dir=out-tinytalks --start="Q: What do bees make?"
"""
out_dir = 'out-tinytalks'
eval_interval = 50
sample_interval = 50  # print what it writes at each evaluation
eval_iters = 20
log_interval = 25
val_loss_bar = 1.5  # the TinyTorch milestone's bar; judged on best.pt, the best val of the run

dataset = 'tinytalks'
gradient_accumulation_steps = 1
batch_size = 32
block_size = 128

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.4
pos = 'rope'
mlp = 'relu2'
qk_norm = True
zero_init_proj = True

max_iters = 300
learning_rate = 3e-3  # AdamW: embeddings, head, norm gains
muon_lr = 0.01        # Muon: the 2-D weights inside the blocks
muon_momentum = 0.9
weight_decay = 0.1
beta2 = 0.99
lr_schedule = 'linear'
warmup_iters = 30
lr_decay_iters = 300
min_lr = 0.0
