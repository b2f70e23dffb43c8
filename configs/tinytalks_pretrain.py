"""TinyBot, step 1 of 2: pretrain on TinyShakespeare as UTF-8 bytes, so the model learns to spell
before it sees TinyTalks' 12,680 characters. Bytes are one vocabulary for every text (prepare.py's
*_byte data sets), so step 2 can fine-tune these weights on TinyTalks (docs/tinybot.md). 150 steps
on 128-byte windows: spelling needs no long context, and rope's positions let step 2 fine-tune on
256-byte chats.

    python train.py configs/tinytalks_pretrain.py
    python train.py configs/tinytalks_finetune.py
"""
out_dir = 'out-tinytalks-pretrain'
dataset = 'shakespeare_byte'
eval_interval = 100000  # no evaluation during the run; the final full-split evaluation reports
eval_iters = 1
log_interval = 50

gradient_accumulation_steps = 1
batch_size = 16
block_size = 128  # half the cost of a 256-byte step; the fine-tune widens it to 256

n_layer = 6
n_head = 8
n_embd = 256
dropout = 0.0
pos = 'rope'
mlp = 'relu2'
qk_norm = True
zero_init_proj = True

max_iters = 150
learning_rate = 3e-3  # AdamW: embeddings, head, norm gains
muon_lr = 0.01        # Muon: the 2-D weights inside the blocks
muon_momentum = 0.9
weight_decay = 0.1
beta2 = 0.99
lr_schedule = 'linear'
warmup_iters = 30
lr_decay_iters = 150
min_lr = 0.0
dtype = 'auto'
