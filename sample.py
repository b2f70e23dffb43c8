"""Generate text from a trained checkpoint, streaming, or chat with a model trained on
conversations.

    python sample.py --out_dir=out-speedrun-cpu
    python sample.py --out_dir=out-speedrun-cpu --start="ROMEO:" --num_samples=3
    python sample.py --out_dir=out-tinybot --chat            # one user turn per line on stdin
    python sample.py --out_dir=out-mychat --chat --system="You are a patient tutor."
    python sample.py --init_from=gpt2-xl --start="What is the answer to life?"
"""
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tinygpt.chat import ShownTemplateTokens, answer_room, template_of
from tinygpt.checkpoint import checkpoint_to_sample, load_weights, ready_for_inference
from tinygpt.common import CheckpointError, DataError, must, run_cli
from tinygpt.device import DTYPES


@dataclass
class SampleConfig:
    out_dir: str = "out"         # the training run's folder
    ckpt: str = ""               # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    init_from: str = ""          # instead of out_dir: gpt2(-medium, -large, -xl), or an HF folder
    start: str = "\n"            # prompt text, or FILE:path to read it from a file
    num_samples: int = 1         # generated together as one batch; the first one streams
    max_new_tokens: int = 500    # tokens to generate per sample
    temperature: float = 0.8     # 0 = greedy; below 1 trades variety for fewer odd characters
    top_k: int | None = None     # keep only the k likeliest tokens; None = off
    top_p: float = 0.95          # the fewest likeliest tokens holding this probability; 1 = off
    seed: int = 1337
    device: str = "auto"         # 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'
    dtype: str = "auto"          # weights are cast to it for inference: bf16 halves memory traffic
    stop: str = ""               # stop a sample when this text appears (not printed)
    chat: bool = False           # user turns from stdin, answered in the checkpoint's chat template
    system: str = ""             # in --chat, a system message, kept first however long the chat
    history: bool = True         # in --chat, earlier whole turns stay (the oldest dropped first)
    sink_tokens: int = 0         # past the window keep the first N (sinks: rope, alibi); 0 = slide

    def __post_init__(self):
        must(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 is greedy)")
        must(0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]; 1 turns it off")
        must(self.top_k is None or self.top_k >= 1,
             f"top_k={self.top_k} must be at least 1, or None for off")
        must(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens} must be at least 1")
        must(self.num_samples >= 1, f"num_samples={self.num_samples} must be at least 1")
        must(self.sink_tokens >= 0,
             f"sink_tokens={self.sink_tokens} must be >= 0 (0 = the sliding window)")
        must(self.dtype in DTYPES, f"dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        must(self.chat or not self.system, "--system is the system message of a chat; add --chat")


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
    streams = [TextStream(tokenizer, stop) for _ in range(cfg.num_samples)]
    for tokens in sampled_steps(model, idx, cfg.max_new_tokens, device, cfg):
        for stream, token in zip(streams, tokens.tolist()):
            new = stream.add(token)
            if stream is streams[0] and on_text and new:
                on_text(new)
        if all(stream.done for stream in streams):
            break
    return [stream.text for stream in streams]


def sampled_steps(model, idx, max_new_tokens, device, cfg):
    """The next token of every row of idx, one step at a time, drawn as cfg says from a generator
    seeded anew."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    return model.generate_stream(idx, max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                 generator=generator, sink_tokens=cfg.sink_tokens)


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


def run_chat(model, tokenizer, template, device, cfg):
    """Answer each stdin line as a user turn in the chat template, with the system message and
    the earlier turns in front (cfg.history; whole turns, the oldest dropped first when the
    window is full), streaming the answer up to the end-of-turn token. An answer that never
    ends stops at answer_room tokens: the conversation gets the rest of the window."""
    room = answer_room(model.config.block_size)
    budget = model.config.block_size - room
    try:
        template.history_prompt(tokenizer, cfg.system, [], "", budget)
    except ValueError as e:
        raise SampleError(f"--system: {e}") from None
    turns = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Say something (Ctrl-D to quit).", file=sys.stderr)
    while True:
        if interactive:
            print_now("> ")
        line = sys.stdin.readline()
        if not line:
            return
        question = line.strip()
        if not question:
            continue
        try:
            earlier = turns if cfg.history else []
            prompt_ids = template.history_prompt(tokenizer, cfg.system, earlier, question, budget)
        except ValueError as e:  # one bad line must not end the conversation
            print(f"error: {e}", file=sys.stderr)
            continue
        print_now("A: ")
        answer = stream_reply(model, tokenizer, template, device, prompt_ids, cfg, room)
        turns.append((question, answer))
        print_now("\n")


def stream_reply(model, tokenizer, template, device, prompt_ids, cfg, room) -> str:
    """Sample one answer after prompt_ids, printing it as it comes, up to a template token (the
    end of the turn), the stop text, or room tokens; return its text."""
    stream = TextStream(tokenizer, cfg.stop)
    idx = torch.tensor([prompt_ids], device=device)
    for tokens in sampled_steps(model, idx, min(cfg.max_new_tokens, room), device, cfg):
        if template.is_special(tokens[0].item()):
            break
        print_now(stream.add(tokens[0].item()))
        if stream.done:
            break
    return stream.text


def sample(cfg):
    if cfg.init_from:  # OpenAI's GPT-2 (downloaded once), a Hugging Face folder, or any weights
        checkpoint = load_weights(cfg.init_from)
    else:
        checkpoint = checkpoint_to_sample(cfg.out_dir, cfg.ckpt)
    template = template_of(checkpoint.get("meta"))  # saved by a model trained on conversations
    if cfg.chat and template is None:
        raise SampleError(f"{cfg.init_from or cfg.out_dir} has no chat template: it was not "
                          "trained on conversations "
                          "(python prepare.py NAME --source=FILE.jsonl); sample it without --chat")
    model, tokenizer, device = ready_for_inference(checkpoint, cfg.device, cfg.dtype)
    try:
        with torch.inference_mode():
            # One token through the model first: it checks its own options (sink_tokens) before
            # anything is printed.
            probe = torch.zeros((1, 1), dtype=torch.long, device=device)
            model.next_logits(probe, sink_tokens=cfg.sink_tokens)
            if cfg.chat:
                run_chat(model, tokenizer, template, device, cfg)
            else:  # a chat model's template tokens show by name
                shown = ShownTemplateTokens(tokenizer, template) if template else tokenizer
                run_samples(model, shown, device, cfg)
    except ValueError as e:  # the model's own checks of its options (sink_tokens): one line
        raise SampleError(str(e)) from None


def main(argv) -> int:
    usage = "usage: python sample.py [--key=value ...]"
    return run_cli(SampleConfig, argv, usage, __doc__.split("\n\n")[0],
                   sample, (CheckpointError, DataError, SampleError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
