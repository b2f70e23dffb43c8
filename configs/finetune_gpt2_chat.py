"""OpenAI's GPT-2 (124M) fine-tuned as a chat model on your conversations: a JSONL file, one
{"messages": [...]} a line, prepared in GPT-2 BPE. The chat template's four tokens are ids
50257-50260 of a vocabulary padded to 50,304, so fine-tuning adds their embedding rows; the loss is
on the assistant's turns only (tinygpt/chat.py).

    python prepare.py mychat_gpt2 --source=docs/conversations.jsonl --tokenizer=gpt2
    python train.py configs/finetune_gpt2_chat.py
    python sample.py --out_dir=out-gpt2-chat --chat --temperature=0

The model's shape comes from the weights. block_size is GPT-2's whole window, so every conversation
prepare.py keeps (1024 tokens at most, its --max_tokens) fits in one row.
"""
out_dir = 'out-gpt2-chat'
dataset = 'mychat_gpt2'
init_from = 'gpt2'  # or gpt2-medium, gpt2-large, gpt2-xl, a Hugging Face GPT-2 folder
block_size = 1024

eval_interval = 50
eval_iters = 4
log_interval = 5

batch_size = 4  # each row holds whole conversations, drawn at random
gradient_accumulation_steps = 1
max_iters = 100
dropout = 0.0

learning_rate = 3e-5  # small and constant: the pretrained weights move little
decay_lr = False
beta2 = 0.95
