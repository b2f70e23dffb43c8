"""What the scripts (train.py, sample.py, prepare.py) and the tools share, one module per job:

    common      error types, atomic file writes
    options     typed --key=value options and config files
    device      device, precision, torchrun, MFU peaks, leaving the process
    tokenizer   text <-> token ids (characters, bytes, GPT-2 BPE)
    chat        the chat template, JSONL conversations, chat history, a chat model's scores
    data        a prepared data set on disk, and the batches drawn from it
    datasets    downloads, verification and the builders of every data set (prepare.py's work)
    checkpoint  save, load, and when a run resumes
    evaluation  losses and scores, during training and for tools/evaluate.py
    optim       AdamW groups and Muon
    gpt2        OpenAI's GPT-2 weights in and out
    plot        pictures of training curves, from a run's log.jsonl
"""
