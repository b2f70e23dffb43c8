"""Generate text from a trained checkpoint, streaming, or answer questions in a Q&A chat.

    python sample.py --out_dir=out-speedrun-cpu
    python sample.py --out_dir=out-speedrun-cpu --start="ROMEO:" --num_samples=3 --max_new_tokens=300
    python sample.py --out_dir=out-tinytalks --chat          # one question per line on stdin
    python sample.py --init_from=gpt2-xl --start="What is the answer to life, the universe, and everything?"
"""
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model import SINK_POSITIONS
from tinygpt.checkpoint import load_for_inference, load_weights, ready_for_inference
from tinygpt.common import CheckpointError, DataError
from tinygpt.device import DTYPES
from tinygpt.common import must, run_cli
from tinygpt.tokenizer import answer_room, chat_prompt_ids, qa_prompt


@dataclass
class SampleConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    init_from: str = ""          # instead of out_dir: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a Hugging Face GPT-2 folder
    start: str = "\n"            # prompt text, or FILE:path to read it from a file
    num_samples: int = 1         # generated together as one batch; the first one streams
    max_new_tokens: int = 500    # tokens to generate per sample
    temperature: float = 0.8     # 0 = greedy; below 1 trades variety for fewer odd characters
    top_k: int | None = None     # keep only the k likeliest tokens; None = off
    top_p: float = 0.95          # keep the smallest set of likeliest tokens that holds this much probability; 1 = off
    seed: int = 1337
    device: str = "auto"         # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "auto"          # weights are cast to it for inference: bf16 halves memory traffic
    stop: str = ""               # stop a sample when this text appears (not printed)
    chat: bool = False           # read questions from stdin, answer each as "Q: ...\nA:" prompts
    history: bool = True         # in --chat, earlier turns stay in the context (whole turns, oldest dropped first)
    sink_tokens: int = 0         # past the window keep the first N tokens + the latest (attention sinks; rope/alibi); 0 = slide

    def __post_init__(self):
        must(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        must(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]; 1 turns it off")
        must(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be at least 1, or None for off")
        must(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")
        must(self.num_samples >= 1, f"num_samples={self.num_samples} must be at least 1")
        must(self.sink_tokens >= 0, f"sink_tokens={self.sink_tokens} must be >= 0 (0 = the sliding window)")
        must(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")


class SampleError(Exception):
    """A one-line, user-facing problem with the sampling request."""


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = Path(start[len("FILE:"):])
    if not path.is_file():
        raise SampleError(f"--start={start}: no such file {path}")
    return path.read_text(encoding="utf-8")


def encode_prompt(tokenizer, text, block_size):
    """Token ids of the prompt; tells the user when the model will only see its tail."""
    if not text:
        raise SampleError("the prompt is empty; give some text with --start=...")
    try:
        ids = tokenizer.encode(text)
    except ValueError as e:
        raise SampleError(f"the prompt cannot be encoded: {e}") from None
    if len(ids) > block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees only the last {block_size}",
              file=sys.stderr)
    return ids


class TextStream:
    """Turns one sample's token ids into text as they arrive, up to an optional stop string."""

    def __init__(self, tokenizer, stop):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids, self.text, self.done = [], "", False

    def add(self, token_id):
        """Append a token; return the newly finished text (may be empty)."""
        if self.done:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a BPE token split a multi-byte character: wait for the rest
            return ""
        if self.stop and self.stop in text:
            text, self.done = text[:text.index(self.stop)], True
        elif self.stop:  # hold back a tail that could be the start of the stop string
            text = text[:len(text) - self.partial_stop_length(text)]
        new, self.text = text[len(self.text):], text
        return new

    def partial_stop_length(self, text):
        for n in range(min(len(self.stop) - 1, len(text)), 0, -1):
            if self.stop.startswith(text[-n:]):
                return n
        return 0


def generate_texts(model, tokenizer, device, prompt_ids, cfg, stop, on_text=None):
    """Sample cfg.num_samples continuations as one batch; stream sample 0 through on_text."""
    idx = torch.tensor([prompt_ids] * cfg.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    streams = [TextStream(tokenizer, stop) for _ in range(cfg.num_samples)]
    steps = model.generate_stream(idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                  cfg.top_p if cfg.top_p < 1.0 else None, generator=generator,
                                  sink_tokens=cfg.sink_tokens)
    for tokens in steps:
        for stream, token in zip(streams, tokens.tolist()):
            new = stream.add(token)
            if stream is streams[0] and on_text and new:
                on_text(new)
        if all(stream.done for stream in streams):
            break
    return [stream.text for stream in streams]


def print_now(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def run_samples(model, tokenizer, device, cfg):
    prompt = read_prompt(cfg.start)
    prompt_ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    print_now(prompt)
    texts = generate_texts(model, tokenizer, device, prompt_ids, cfg, cfg.stop, on_text=print_now)
    for text in texts[1:]:
        print_now("\n---------------\n" + prompt + text)
    print_now("\n")


def run_chat(model, tokenizer, device, cfg):
    """Answer each stdin line as the training data frames it: 'Q: <line>\\nA:' up to the newline,
    with the earlier turns in front (cfg.history). A model that never ends its answer stops at
    answer_room tokens; the conversation gets the rest of the window."""
    room = answer_room(model.config.block_size)
    budget = model.config.block_size - room
    cfg = replace(cfg, num_samples=1, max_new_tokens=min(cfg.max_new_tokens, room))
    turns = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Ask a question (Ctrl-D to quit).", file=sys.stderr)
    while True:
        if interactive:
            print_now("Q: ")
        line = sys.stdin.readline()
        if not line:
            return
        question = line.strip()
        if not question:
            continue
        try:
            encode_prompt(tokenizer, qa_prompt(question), model.config.block_size)  # checks it, notes a long one
        except SampleError as e:  # one bad question must not end the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        prompt_ids = chat_prompt_ids(tokenizer, turns if cfg.history else [], question, budget)
        print_now("A:")  # the model writes the space after "A:", as in the training data
        [answer] = generate_texts(model, tokenizer, device, prompt_ids, cfg, cfg.stop or "\n", print_now)
        print_now("\n")
        turns.append((question, answer))


def sample(cfg):
    if cfg.init_from:  # OpenAI's GPT-2 (downloaded once), a Hugging Face folder, or any weights train.py can start from
        model, tokenizer, device = ready_for_inference(load_weights(cfg.init_from), cfg.device, cfg.dtype)
    else:
        model, tokenizer, device = load_for_inference(cfg.out_dir, cfg.ckpt, cfg.device, cfg.dtype)
    if cfg.sink_tokens and (model.config.pos not in SINK_POSITIONS or cfg.sink_tokens >= model.config.block_size):
        raise SampleError(f"--sink_tokens={cfg.sink_tokens} needs a model with pos='rope' or 'alibi' (this one has "
                          f"{model.config.pos!r}) and fewer sinks than its block_size {model.config.block_size}")
    with torch.inference_mode():
        (run_chat if cfg.chat else run_samples)(model, tokenizer, device, cfg)


def main(argv) -> int:
    return run_cli(SampleConfig, argv, "usage: python sample.py [--key=value ...]", __doc__.split("\n\n")[0],
                   sample, (CheckpointError, DataError, SampleError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
