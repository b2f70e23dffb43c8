"""TinyBot, step 2 of 2: fine-tune the pretrained byte model (configs/tinytalks_pretrain.py) on
TinyTalks' train split as a chat model: whole Q/A pairs, the loss on the answers only (the
tinytalks_chat data set), with a fresh optimizer and schedule; judged on the full val split.

    python train.py configs/tinytalks_finetune.py
    python sample.py --out_dir=out-tinybot --chat
"""
out_dir = 'out-tinybot'
init_from = 'out-tinytalks-pretrain'  # its best.pt/ckpt.pt: the model's shape comes from those weights
dataset = 'tinytalks_chat'
eval_interval = 100  # evaluate at the start and the end only: best.pt is the last state (docs/tinybot.md: the scores need all 100 steps)
eval_iters = 10
log_interval = 10
val_loss_bar = 1.2

gradient_accumulation_steps = 1
batch_size = 16
block_size = 256
dropout = 0.1
attn_dropout = False  # dropout on the residual branches only: the attention weights' mask is most of its CPU cost

max_iters = 100
learning_rate = 7e-4
muon_lr = 0.0035
muon_momentum = 0.9
weight_decay = 0.1
beta2 = 0.99
lr_schedule = 'linear'
warmup_iters = 10
lr_decay_iters = 100
min_lr = 0.0
