"""Conversations: the one chat template, reading conversations from JSONL, rendering one to token
ids with the loss mask, the history that fits the window in chat, and the scores of a chat model.

A conversation is a list of messages {"role": "system"|"user"|"assistant", "content": "..."}: a
system message optional and first, then user and assistant turns alternating, from a user turn to
an assistant turn. Each message is rendered as its role's token, its content's text ids, and the
end-of-turn token:

    <|system|> You are kind. <|end|> <|user|> Hi! <|end|> <|assistant|> Hello! <|end|> ...

The four template tokens are ids past the text's own (a byte vocabulary's 256-259, a character
vocabulary's len(vocab)+; GPT-2 BPE's 50257-50260 in a vocabulary padded to 50,304), so no text a
user types can be read as one. The loss falls on every assistant turn's content and its
end-of-turn token; the role token is given in the prompt. The template is saved in the data set's
meta.json, hence in every checkpoint.

This module imports no other part of the package but common.py: the data builders (datasets.py),
the final report (evaluation.py) and sample.py all call it, and it never reads a tokenizer's
files itself."""

import json
import re
from pathlib import Path

import torch

from tinygpt.common import DataError

ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
TEMPLATE_FORMAT = 1
PAD_MULTIPLE = 64  # a GPT-2 BPE chat vocabulary is padded to a multiple of 64, as nanoGPT does


class ChatTemplate:
    """The special token ids of the template and the rendering of conversations with them."""

    def __init__(self, tokens: dict):
        self.tokens = {name: int(tokens[name]) for name in SPECIAL_TOKENS}
        self.role = {role: self.tokens[f"<|{role}|>"] for role in ROLES}
        self.end = self.tokens["<|end|>"]
        self.first = min(self.tokens.values())  # ids from here on are the template's, never text

    @classmethod
    def for_tokenizer(cls, tokenizer):
        """(template, vocabulary size) for tokenizer's text: four tokens right after its ids."""
        first = tokenizer.vocab_size
        template = cls({name: first + i for i, name in enumerate(SPECIAL_TOKENS)})
        size = first + len(SPECIAL_TOKENS)
        if tokenizer.kind == "gpt2":
            size = -(-size // PAD_MULTIPLE) * PAD_MULTIPLE
        return template, size

    def to_meta(self) -> dict:
        return {"format": TEMPLATE_FORMAT, "special_tokens": self.tokens}

    def is_special(self, token) -> bool:
        return int(token) >= self.first

    def render(self, tokenizer, messages) -> tuple:
        """(ids, mask) of the messages: mask[i] is True where ids[i] is a token the loss is on,
        every assistant turn's content and its end-of-turn token."""
        ids, mask = [], []
        for message in messages:
            body = tokenizer.encode(message["content"])
            ids += [self.role[message["role"]], *body, self.end]
            mask += [False] + [message["role"] == "assistant"] * (len(body) + 1)
        return ids, mask

    def prompt(self, tokenizer, messages) -> list:
        """The ids the assistant's next turn follows: the messages, then its role token."""
        return self.render(tokenizer, messages)[0] + [self.role["assistant"]]

    def messages_of(self, tokenizer, ids) -> list:
        """The messages of one rendered conversation's ids (the inverse of render)."""
        messages, role, body = [], None, []
        for token in map(int, ids):
            if token == self.end and role:
                messages.append({"role": role, "content": tokenizer.decode(body)})
                role, body = None, []
            elif self.is_special(token):
                role, body = next((r for r, t in self.role.items() if t == token), None), []
            else:
                body.append(token)
        return messages

    def decode(self, tokenizer, ids) -> str:
        """Text of ids with the template's tokens shown by name, to sample a chat model as text."""
        names = {token: name for name, token in self.tokens.items()}
        pieces, text = [], []
        for token in map(int, ids):
            if token in names or token >= self.first:
                pieces += [tokenizer.decode(text), names.get(token, f"<|{token}|>")]
                text = []
            else:
                text.append(token)
        return "".join(pieces) + tokenizer.decode(text)

    def history_prompt(self, tokenizer, system, turns, question, budget) -> list:
        """The ids of a chat's next prompt in at most budget tokens: the system message (kept), the
        most recent whole (question, answer) turns that fit (the oldest dropped first), and the new
        question. ValueError when the system message and the question alone do not fit."""
        head = self.render(tokenizer, [{"role": "system", "content": system}])[0] if system else []
        tail = self.prompt(tokenizer, [{"role": "user", "content": question}])
        if len(head) + len(tail) > budget:
            raise ValueError(
                f"the question{' and the system message' if head else ''} take "
                f"{len(head) + len(tail)} tokens, more than the {budget} the window leaves them"
            )
        for asked, answer in reversed(turns):
            turn = self.render(tokenizer, exchange(asked, answer))[0]
            if len(head) + len(turn) + len(tail) > budget:
                break
            tail = turn + tail
        return head + tail


class ShownTemplateTokens:
    """A tokenizer whose decode shows a chat model's template tokens by name (plain sampling)."""

    def __init__(self, tokenizer, template):
        self.tokenizer, self.template = tokenizer, template
        self.kind, self.vocab_size = tokenizer.kind, tokenizer.vocab_size

    def encode(self, text):
        return self.tokenizer.encode(text)

    def decode(self, ids):
        return self.template.decode(self.tokenizer, ids)


def template_of(meta):
    """The ChatTemplate a data set's (or a checkpoint's) meta names, else None."""
    saved = (meta or {}).get("chat_template")
    if not saved:
        return None
    if saved.get("format") != TEMPLATE_FORMAT or set(saved.get("special_tokens", {})) != set(
        SPECIAL_TOKENS
    ):
        raise DataError(
            f"meta.json's chat_template {saved} is not this version's (format {TEMPLATE_FORMAT}); "
            "prepare the data set again"
        )
    return ChatTemplate(saved["special_tokens"])


def exchange(question, answer) -> list:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def answer_room(block_size) -> int:
    """Tokens an answer may take in chat: a quarter of the window; the chat so far gets the rest."""
    return max(1, block_size // 4)


# ----------------------------------------------------------------------- conversations from JSONL


def conversation_files(source) -> list:
    """The .jsonl files of a source: the file itself, or a folder's (recursively), sorted."""
    path = Path(source)
    files = sorted(p for p in path.rglob("*.jsonl") if p.is_file()) if path.is_dir() else [path]
    if not files or not all(p.is_file() for p in files):
        raise DataError(
            f"--source={source}: no .jsonl file there; "
            "give a conversations file or a folder of them"
        )
    return files


def looks_like_conversations(source) -> bool:
    """Whether source is a .jsonl file (or a folder of them) whose first line holds "messages": a
    conversations set, not a corpus of documents (a "text" field per line)."""
    path = Path(source)
    try:
        first = conversation_files(path)[0] if path.is_dir() or path.suffix == ".jsonl" else None
        with open(first, encoding="utf-8", errors="replace") as f:
            line = next((line for line in f if line.strip()), "")
    except (DataError, TypeError, OSError):
        return False
    return '"messages"' in line


def read_conversations(path) -> list:
    """[(where, messages)] of a JSONL file, one conversation a line (blank lines are left out); a
    line that is not a conversation is a one-line DataError naming the file and the line."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv -t utf-8"
        ) from None
    conversations = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            messages = checked_messages(json.loads(line))
        except (ValueError, TypeError) as e:
            raise DataError(
                f"{where}: {e}; fix or remove that line "
                '(one {"messages": [{"role": ..., "content": ...}, ...]} a line)'
            ) from None
        conversations.append((where, messages))
    if not conversations:
        raise DataError(f"{path} holds no conversation; give one JSON object a line")
    return conversations


def checked_messages(record) -> list:
    """The messages of a parsed line as {"role", "content"} dicts; ValueError says what is wrong."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ValueError('not an object with a "messages" list')
    messages = record["messages"]
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise ValueError(f"message {i + 1} has role {role!r}; use system, user or assistant")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise ValueError(f"message {i + 1} ({message['role']}) has empty or no text content")
    roles = [message["role"] for message in messages]
    turns = roles[1:] if roles[:1] == ["system"] else roles
    expected = ["user", "assistant"] * (len(turns) // 2)
    if not turns or turns != expected:
        raise ValueError(
            f"roles {', '.join(roles) or 'none'}: after an optional system message, user and "
            "assistant turns alternate, from a user turn to an assistant turn"
        )
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def conversations_text(conversations) -> str:
    """All the text of conversations: what a character vocabulary is built from."""
    return "".join(m["content"] for _, messages in conversations for m in messages)


# ------------------------------------------------------------------------ TinyTalks' Q&A files


def qa_pairs(text) -> list:
    """(question, answer) pairs of a "Q: ...\\nA: ...\\n\\n" file such as TinyTalks' splits."""
    pairs = []
    for block in text.strip("\n").split("\n\n"):
        q_line, _, a_line = block.partition("\n")
        if q_line.startswith("Q: ") and a_line.startswith("A: "):
            pairs.append((q_line[3:], a_line[3:]))
    return pairs


def qa_conversations(text, name) -> list:
    """[(where, messages)] of a Q&A file: each pair a conversation of a question and its answer."""
    pairs = qa_pairs(text)
    if not pairs:
        raise DataError(f"{name} holds no 'Q: ...\\nA: ...' pairs")
    return [(f"{name} pair {i}", exchange(q, a)) for i, (q, a) in enumerate(pairs, 1)]


# ---------------------------------------------------------------------------- a chat model's scores


@torch.no_grad()
def answer_loss(model, examples, ctx, device) -> float:
    """Mean cross-entropy on the reply tokens of (prompt ids, reply ids) examples, given prompts."""
    model.eval()
    total, scored = 0.0, 0
    for prompt, reply in examples:
        ids = torch.tensor(prompt + reply, device=device)
        x, y = ids[:-1], ids[1:].clone()
        y[: len(prompt) - 1] = -1  # no loss on the prompt
        x, y = x[-model.config.block_size :], y[-model.config.block_size :]
        with ctx:
            loss = model(x[None], y[None])[1]
        n = int((y != -1).sum())
        total, scored = total + loss.item() * n, scored + n
    return total / scored


@torch.no_grad()
def greedy_answer(model, template, tokenizer, question, device, turns=(), system="") -> str:
    """The model's greedy answer to a question after the earlier (question, answer) turns, as
    sample.py --chat asks it: up to its end-of-turn token (or any template token), at most
    answer_room tokens long."""
    room = answer_room(model.config.block_size)
    ids = template.history_prompt(
        tokenizer, system, turns, question, model.config.block_size - room
    )
    answer = []
    for token in model.generate_stream(torch.tensor([ids], device=device), room, temperature=0):
        if template.is_special(token.item()):
            break
        answer.append(token.item())
    return tokenizer.decode(answer).strip()


@torch.no_grad()
def greedy_matches(model, examples, device, batch_size=64) -> list:
    """For each (prompt ids, reply ids) example, whether the greedy reply is exactly the reference
    (its end-of-turn token included), from one forward pass per batch instead of generation:
    greedy decoding writes the reply exactly when each of its tokens is the top choice after the
    ones before it."""
    model.eval()
    matches = []
    room = answer_room(model.config.block_size)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        # a reply longer than the chat's room, or an example beyond the window, is one greedy
        # decoding cannot write
        fits = [len(p) + len(r) <= model.config.block_size and len(r) <= room for p, r in chunk]
        width = max([len(p) + len(r) for (p, r), fit in zip(chunk, fits) if fit], default=1)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, ((p, r), fit) in enumerate(zip(chunk, fits)):
            if fit:
                ids[row, : len(p) + len(r)] = torch.tensor(p + r)
        ids = ids.to(device)
        top = model(ids, ids)[0].argmax(dim=-1)  # any targets: they ask for every position's logits
        for row, ((p, r), fit) in enumerate(zip(chunk, fits)):
            matches.append(fit and top[row, len(p) - 1 : len(p) + len(r) - 1].tolist() == r)
    return matches


def reply_examples(template, tokenizer, conversations) -> list:
    """(prompt ids, reply ids) of every assistant turn of the conversations, after earlier turns."""
    examples = []
    for messages in conversations:
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                reply = tokenizer.encode(message["content"]) + [template.end]
                examples.append((template.prompt(tokenizer, messages[:i]), reply))
    return examples


STOP_WORDS = frozenset(
    "the and you your are was were what how does can this that with for have has not "
    "but its it's".split()
)
# TinyTalks records no level; these rules tell three of its five from the question (its DATASHEET:
# L1 greetings and identity, L2 facts, L3 math, L4 reasoning, L5 multi-turn context) and leave
# L2 and L4 together.
TINYTALKS_LEVELS = [
    ("L3 math", r"\d"),
    (
        "L1 greetings, identity",
        r"\b(hello|hi|hey|greetings|good (morning|afternoon|evening)|bye|"
        r"thanks?|tinybot|yourself|your name|who are you|how are you|"
        r"were you)\b",
    ),
    ("L5 statements (context)", r"[^?]$"),
    ("L2/L4 facts, reasoning", r""),
]
ALL_LEVELS = [("all", r"")]


def level_of(question, rules=TINYTALKS_LEVELS) -> str:
    return next(name for name, rule in rules if re.search(rule, question.lower().strip()))


def words(text) -> list:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def content_words(text) -> set:
    """Words of 3+ letters outside STOP_WORDS: what an answer must share with a text to be about
    it."""
    return {w for w in words(text) if len(w) >= 3 and w not in STOP_WORDS}


def answer_scores(answers, references, known_words, questions=None) -> dict:
    """Shares of hand-comparable facts about answers: real_words, of the answers' words that occur
    in known_words; overlap, of answers sharing a content word with their reference; topic, of
    answers sharing one with their question (when questions are given)."""
    said = [w for answer in answers for w in words(answer)]
    n = max(1, len(answers))
    scores = {
        "real_words": sum(w in known_words for w in said) / max(1, len(said)),
        "overlap": sum(
            bool(content_words(a) & content_words(r)) for a, r in zip(answers, references)
        )
        / n,
    }
    if questions is not None:
        scores["topic"] = (
            sum(bool(content_words(a) & content_words(q)) for a, q in zip(answers, questions)) / n
        )
    return scores


def repeated_share(chats) -> float:
    """Share of the answers, after a chat's first, that equal the answer just before them."""
    follow_ups = [
        (before, after) for answers in chats for before, after in zip(answers, answers[1:])
    ]
    return sum(before == after for before, after in follow_ups) / max(1, len(follow_ups))


CHAT_TURNS = 5


def chat_answers(model, template, tokenizer, questions, device) -> list:
    """The greedy answers of one conversation: each question asked after the earlier turns."""
    turns = []
    for question in questions:
        turns.append((question, greedy_answer(model, template, tokenizer, question, device, turns)))
    return [answer for _, answer in turns]


def percent(share) -> str:
    return f"{100 * share:5.1f}%"


def split_conversations(batches, template, tokenizer, split) -> list:
    """The messages of every conversation of a prepared split, read back from its ids."""
    ids, starts = batches.tokens(split), batches.starts[split]
    return [template.messages_of(tokenizer, ids[a:b]) for a, b in zip(starts[:-1], starts[1:])]


def chat_report(model, batches, tokenizer, ctx, exact_match_bar=0.0) -> list:
    """Score a chat model whose data set holds a test file of held-out conversations, print the
    scores and every test answer beside its reference, and return the records: exact match of the
    greedy replies to the train conversations (what it was taught; judged PASS/FAIL against
    exact_match_bar when given, on TinyTalks' levels 1-2); for the held-out test conversations'
    last question real words, overlap with the reference and naming the question's topic; and in
    5-turn chats of test questions, the share of answers repeating the last."""
    meta, device = batches.meta, batches.device
    template = template_of(meta)
    taught = split_conversations(batches, template, tokenizer, "train")
    tests = [messages for _, messages in read_conversations(batches.folder / meta["test_file"])]
    loss = answer_loss(model, reply_examples(template, tokenizer, tests), ctx, device)
    taught_examples = reply_examples(template, tokenizer, taught)
    matches = greedy_matches(model, taught_examples, device)
    questions = [messages[-2]["content"] for messages in tests]
    references = [messages[-1]["content"] for messages in tests]
    answers = [
        greedy_answer(
            model,
            template,
            tokenizer,
            messages[-2]["content"],
            device,
            earlier_turns(messages),
            system_of(messages),
        )
        for messages in tests
    ]
    chats = [
        chat_answers(model, template, tokenizer, questions[i : i + CHAT_TURNS], device)
        for i in range(0, len(questions) - CHAT_TURNS + 1, CHAT_TURNS)
    ]
    known = set(words(" ".join(m["content"] for messages in taught for m in messages)))
    scores = {
        "exact_match_train": sum(matches) / max(1, len(matches)),
        **answer_scores(answers, references, known, questions),
        "repeated_in_chat": repeated_share(chats),
    }
    rules = TINYTALKS_LEVELS if meta.get("levels") == "tinytalks" else ALL_LEVELS
    taught_questions = [
        messages[i - 1]["content"]
        for messages in taught
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    print(f"held-out test answers: loss {loss:.4f} over {len(tests)} conversations")
    print(
        f"{'level (rule)':24} {'train':>5} {'exact':>6} | {'test':>4} {'real w.':>7} "
        f"{'overlap':>7} {'topic':>6}"
    )
    taught_levels = [level_of(q, rules) for q in taught_questions]
    levels = [level_of(q, rules) for q in questions]
    for name in dict.fromkeys([name for name, _ in rules] + ["all"]):
        mine = [m for m, level in zip(matches, taught_levels) if name in (level, "all")]
        picked = [i for i, level in enumerate(levels) if name in (level, "all")]
        s = answer_scores(
            [answers[i] for i in picked],
            [references[i] for i in picked],
            known,
            [questions[i] for i in picked],
        )
        print(
            f"{name:24} {len(mine):5} {percent(sum(mine) / max(1, len(mine)))} | {len(picked):4} "
            f"{percent(s['real_words']):>7} {percent(s['overlap']):>7} {percent(s['topic']):>6}"
        )
    judged = [
        m for m, level in zip(matches, taught_levels) if level.startswith(("L1", "L2", "all"))
    ]
    scores["exact_match_train_judged"] = sum(judged) / max(1, len(judged))
    which = "levels 1-2 (L1 and L2/L4 rules)" if rules is TINYTALKS_LEVELS else "all"
    print(
        "train replies, exact match of the greedy reply: "
        f"{percent(scores['exact_match_train'])} of "
        f"{len(matches)}; {which}: {percent(scores['exact_match_train_judged'])} of {len(judged)}"
        f"{verdict(scores['exact_match_train_judged'], exact_match_bar)}"
    )
    print(
        f"5-turn chats of test questions: {percent(scores['repeated_in_chat'])} of the answers "
        "repeat the "
        f"previous one ({len(chats)} chats)"
    )
    for question, reference, answer, level in zip(questions, references, answers, levels):
        print(
            f"  [{level.split()[0]}] Q: {question}\n     model: {answer}\n"
            f"     reference: {reference}"
        )
    for number, chat in enumerate(chats, 1):
        print(
            f"  chat {number}: "
            + " | ".join(
                f"Q: {q} A: {a}" for q, a in zip(questions[(number - 1) * CHAT_TURNS :], chat)
            ),
            flush=True,
        )
    return [{"kind": "test", "chat_answer_loss": loss, **scores}]


def earlier_turns(messages) -> list:
    """(question, answer) pairs of a conversation before its last exchange."""
    turns = [m for m in messages[:-2] if m["role"] != "system"]
    return [(q["content"], a["content"]) for q, a in zip(turns[::2], turns[1::2])]


def system_of(messages) -> str:
    return messages[0]["content"] if messages[0]["role"] == "system" else ""


def verdict(share, bar) -> str:
    """' (bar 80%): PASS' when share reaches bar, ' (bar 80%): FAIL' when not; '' without a bar."""
    return f" (bar {100 * bar:g}%): {'PASS' if share >= bar else 'FAIL'}" if bar else ""
