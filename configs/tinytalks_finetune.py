"""TinyBot, step 2 of 2: fine-tune the pretrained byte model (configs/tinytalks_pretrain.py) on
TinyTalks' train split, with a fresh optimizer and schedule; judged on the full val split.

    python train.py configs/tinytalks_finetune.py
    python sample.py --out_dir=out-tinybot --chat
"""
out_dir = 'out-tinybot'
init_from = 'out-tinytalks-pretrain'  # its best.pt/ckpt.pt: the model's shape comes from those weights
dataset = 'tinytalks_byte'
eval_interval = 10  # it overfits within ~50 steps: best.pt keeps the best val
eval_iters = 10
log_interval = 10
val_loss_bar = 1.2

gradient_accumulation_steps = 1
batch_size = 16
block_size = 256
dropout = 0.1

max_iters = 80
learning_rate = 7e-4
muon_lr = 0.0035
muon_momentum = 0.9
weight_decay = 0.1
beta2 = 0.99
lr_schedule = 'linear'
warmup_iters = 10
lr_decay_iters = 80
min_lr = 0.0
