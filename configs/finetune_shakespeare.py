"""nanoGPT's finetune_shakespeare recipe: OpenAI's GPT-2 XL (1.5B parameters) fine-tuned on
TinyShakespeare in GPT-2 BPE tokens, at a small constant learning rate, for 20 steps of 32,768
tokens (about two passes over the ~300k training tokens). It needs a GPU with room for GPT-2 XL and
its AdamW state, and the network once to download the weights (6.4 GB); for a smaller GPU use
--init_from=gpt2-medium or gpt2, or a lower block_size. nanoGPT reports no loss for it, only a
sample.

    python train.py configs/finetune_shakespeare.py
    python sample.py --out_dir=out-finetune-shakespeare --start="THEODORE:"

The model's shape comes from the weights; block_size is set so that none of GPT-2's 1024 positions
is cropped. A rerun into the same out_dir resumes its checkpoint, it does not start over.
"""
out_dir = 'out-finetune-shakespeare'
eval_interval = 5
eval_iters = 40
log_interval = 1

wandb_log = False
wandb_project = 'shakespeare'
wandb_run_name = 'ft-gpt2-xl'

dataset = 'shakespeare'
init_from = 'gpt2-xl'  # the largest GPT-2
block_size = 1024  # all of GPT-2's context (the default, 256, would crop it)

# 1 sequence x 32 micro-steps x 1024 tokens = 32,768 tokens per optimizer step
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

# fine-tune at a constant learning rate
learning_rate = 3e-5
decay_lr = False
beta2 = 0.95  # nanoGPT's default
