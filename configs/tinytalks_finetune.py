"""TinyBot, step 2 of 2: fine-tune the pretrained byte model (configs/tinytalks_pretrain.py) on
TinyTalks' train split as a chat model: its Q/A pairs as conversations in the chat template,
the loss on the answers only (the tinytalks_chat data set), with a fresh optimizer and
schedule; judged on the exact match of its answers to the questions it was taught (levels
1-2), not on a val loss (docs/tinybot.md).

    python train.py configs/tinytalks_finetune.py
    python sample.py --out_dir=out-tinybot --chat
"""
out_dir = 'out-tinybot'
# Its best.pt (else ckpt.pt); the model's shape comes from those weights.
init_from = 'out-tinytalks-pretrain'
dataset = 'tinytalks_chat'
# Evaluate at the start and the end only, so that best.pt is the last state: the answers' scores
# need every step of training.
eval_interval = 160
eval_iters = 2  # a glance at the losses: the final report scores the whole val split and answers
log_interval = 20
# The share of the train questions (levels 1-2) whose greedy answer must be right word for word.
exact_match_bar = 0.8

gradient_accumulation_steps = 1
batch_size = 8  # twice the updates of 16 sequences for the same work: the answers are learnt sooner
block_size = 256  # four or five one-question conversations: the earlier turns of a chat
dropout = 0.0  # the taught answers are to be learnt word for word

max_iters = 160
learning_rate = 7e-4
muon_lr = 0.0035
muon_momentum = 0.9
weight_decay = 0.1
beta2 = 0.99
lr_schedule = 'linear'
warmup_iters = 20
lr_decay_iters = 160
min_lr = 0.0
