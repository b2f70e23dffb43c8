"""nanoGPT's shakespeare_char recipe for one GPU: a 6-layer, 384-wide character model.
nanoGPT reports val 1.4697 after about 3 minutes on one A100 (with --compile=True).

    python train.py configs/shakespeare_char.py
"""
out_dir = 'out-shakespeare-char'
eval_interval = 250  # the set is small, so evaluate often
sample_interval = 250  # print what it writes at each evaluation
eval_iters = 200
log_interval = 10

wandb_log = False
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256  # context of up to 256 previous characters

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3  # small networks can take a higher learning rate
max_iters = 5000
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little higher than the usual 0.95: few tokens per step
warmup_iters = 100
val_loss_bar = 1.4697  # nanoGPT's published val loss for this recipe
