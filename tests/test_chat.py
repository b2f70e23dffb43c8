"""Conversations as a specification: the one chat template, its loss mask, what a conversations file
may hold (and the one-line errors for what it may not), the split by conversation, the batches'
targets, the history a chat keeps, and fine-tuning weights (GPT-2's among them) on conversations."""

import json

import numpy as np
import pytest
import torch

from conftest import (
    REPO,
    TINY,
    assert_one_line_error,
    run_script,
    tiny_hf_gpt2,
    tiny_model,
    train_here,
    train_refusing,
)
from tinygpt.chat import ChatTemplate, read_conversations, template_of
from tinygpt.checkpoint import check_vocabulary, load_checkpoint, with_new_rows
from tinygpt.common import CheckpointError, DataError
from tinygpt.data import Batches, load_meta
from tinygpt.datasets import prepare
from tinygpt.gpt2 import export_hf, load_hf
from tinygpt.tokenizer import ByteTokenizer, CharTokenizer, GPT2Tokenizer, tokenizer_from_meta

S, U, A, E = (
    256,
    257,
    258,
    259,
)  # the byte vocabulary's template tokens: system, user, assistant, end of turn
THREE_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Yo"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def write_jsonl(path, conversations, extra_lines=()):
    lines = [json.dumps({"messages": messages}) for messages in conversations] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def exchange(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def small_talk(n=40):
    return [exchange(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(n)]


def test_a_three_turn_conversation_is_scored_on_the_assistant_turns_and_their_end_tokens_only():
    template, vocab_size = ChatTemplate.for_tokenizer(ByteTokenizer())
    assert (template.tokens, vocab_size) == (
        {"<|system|>": S, "<|user|>": U, "<|assistant|>": A, "<|end|>": E},
        260,
    )
    ids, mask = template.render(ByteTokenizer(), THREE_TURNS)
    assert ids == [
        S,
        *b"Be brief.",
        E,
        U,
        *b"Hi",
        E,
        A,
        *b"Yo",
        E,
        U,
        *b"2+2?",
        E,
        A,
        *b"4",
        E,
        U,
        *b"Bye",
        E,
        A,
        *b"Ciao",
        E,
    ]
    by_hand = (
        [0] * 11
        + [0] * 4
        + [0, 1, 1, 1]  # system, first question: nothing; "Yo" and its end: scored
        + [0] * 6
        + [0, 1, 1]  # the second question, then "4" and its end
        + [0] * 5
        + [0, 1, 1, 1, 1, 1]
    )  # the third question, then "Ciao" and its end
    assert mask == [bool(m) for m in by_hand]
    assert template.messages_of(ByteTokenizer(), ids) == THREE_TURNS


def test_the_batches_put_the_loss_on_that_mask_as_it_is_stored_on_disk(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", [THREE_TURNS] * 4)
    folder = prepare("three", source=source, data_dir=tmp_path, tokenizer="byte")
    meta = load_meta(folder)
    assert meta["conversations"] == {"train": 3, "val": 1} and meta["vocab_size"] == 260
    mask = np.fromfile(folder / "train_mask.bin", dtype=np.uint8)
    assert (
        mask.tolist()
        == [
            int(m)
            for m in ChatTemplate.for_tokenizer(ByteTokenizer())[0].render(
                ByteTokenizer(), THREE_TURNS
            )[1]
        ]
        * 3
    )
    batches = Batches(folder, meta, 64, "cpu")
    x, y = batches.batch(
        "train", np.array([[0, 1]])
    )  # 39 tokens each: the second one is cut after 26
    assert x[0, :11].tolist() == x[0, 39:50].tolist() == [S, *b"Be brief.", E]
    assert [int(t) for t in y[0] if t != -1] == [*b"Yo", E, *b"4", E, *b"Ciao", E, *b"Yo", E]


def test_every_tokenizer_gets_the_template_past_its_text_ids_and_gpt2_a_padded_vocabulary(tmp_path):
    chars = CharTokenizer(sorted(set("Hi Yo")))
    assert ChatTemplate.for_tokenizer(chars)[0].first == chars.vocab_size == 5  # H, i, space, Y, o
    try:
        gpt2 = GPT2Tokenizer()
    except DataError as e:
        pytest.skip(str(e))
    template, vocab_size = ChatTemplate.for_tokenizer(gpt2)
    assert (template.tokens["<|system|>"], template.end, vocab_size) == (50257, 50260, 50304)
    source = write_jsonl(tmp_path / "chats.jsonl", small_talk(10))
    for kind in ("char", "byte", "gpt2"):
        meta = load_meta(prepare(f"talk_{kind}", source=source, data_dir=tmp_path, tokenizer=kind))
        tok, template = tokenizer_from_meta(meta), template_of(meta)
        assert template.first == meta["text_vocab_size"] == tok.vocab_size
        assert meta["vocab_size"] == (50304 if kind == "gpt2" else tok.vocab_size + 4)
        ids = np.fromfile(tmp_path / f"talk_{kind}" / "val.bin", dtype="<u2")
        assert template.messages_of(tok, ids) in small_talk(
            10
        )  # the one val conversation, read back whole


def test_the_val_split_is_whole_conversations_drawn_by_the_seed(tmp_path):
    source = write_jsonl(tmp_path / "chats.jsonl", small_talk(40))

    def val_questions(seed, name):
        folder = prepare(name, source=source, data_dir=tmp_path, tokenizer="byte", seed=seed)
        meta = load_meta(folder)
        ids = np.fromfile(folder / "val.bin", dtype="<u2")
        return [
            m["content"]
            for m in template_of(meta).messages_of(ByteTokenizer(), ids)
            if m["role"] == "user"
        ]

    first, again, other = val_questions(1, "a"), val_questions(1, "b"), val_questions(2, "c")
    assert (
        len(first) == 4 and first == again and first != other
    )  # a tenth, the same for the same seed
    train = load_meta(tmp_path / "a")["conversations"]["train"]
    assert train == 36


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "Expecting property name"),
        ('{"text": "a document"}', 'not an object with a "messages" list'),
        ('{"messages": [{"role": "robot", "content": "Hi"}]}', "message 1 has role 'robot'"),
        (
            '{"messages": [{"role": "user", "content": "  "}, '
            '{"role": "assistant", "content": "Hi"}]}',
            "message 1 (user) has empty or no text content",
        ),
        (
            '{"messages": [{"role": "assistant", "content": "Hi"}, '
            '{"role": "user", "content": "Yo"}]}',
            "roles assistant, user",
        ),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"}]}',
            "roles user, user",
        ),
        ('{"messages": [{"role": "user", "content": "Hi"}]}', "roles user:"),
        (
            '{"messages": [{"role": "user", "content": "Hi"}, '
            '{"role": "system", "content": "Be kind."}, '
            '{"role": "assistant", "content": "Yo"}]}',
            "roles user, system, assistant",
        ),
        ('{"messages": []}', "roles none"),
    ],
)
def test_a_line_that_is_not_a_conversation_is_a_one_line_error_naming_file_and_line(
    tmp_path, capsys, line, message
):
    source = write_jsonl(tmp_path / "chats.jsonl", small_talk(3), extra_lines=["", line])
    with pytest.raises(DataError) as error:
        read_conversations(source)
    assert str(error.value).startswith(f"{source}:5: ") and message in str(error.value)
    from prepare import main

    assert main(["bad", f"--source={source}", f"--data_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and f"{source}:5: " in err[0]
        and not (tmp_path / "bad" / "meta.json").exists()
    )


def test_a_conversation_longer_than_max_tokens_is_left_out_and_counted(tmp_path, capsys):
    long = exchange("Tell me everything.", "word " * 60)
    source = write_jsonl(tmp_path / "chats.jsonl", [*small_talk(20), long])
    meta = load_meta(
        prepare("capped", source=source, data_dir=tmp_path, tokenizer="byte", max_tokens=100)
    )
    assert meta["conversations"]["train"] + meta["conversations"]["val"] == 20
    assert (meta["left_out_too_long"], meta["left_out_first"]) == (1, [f"{source}:21"])
    assert "1 left out for being longer than --max_tokens=100" in capsys.readouterr().out
    kept = load_meta(prepare("all", source=source, data_dir=tmp_path, tokenizer="byte"))
    assert (kept["left_out_too_long"], kept["max_tokens"]) == (0, 1024)
    with pytest.raises(
        DataError,
        match="longer than block_size \\+ 1 = 65; raise block_size, or prepare it again "
        "with --max_tokens=65",
    ):
        Batches(tmp_path / "all", kept, 64, "cpu")
    with pytest.raises(DataError, match="--max_tokens is for conversations"):
        prepare("text", source=REPO / "README.md", data_dir=tmp_path, max_tokens=10)


def test_a_broken_index_or_mask_is_a_one_line_error(tmp_path):
    folder = prepare(
        "talk",
        source=write_jsonl(tmp_path / "chats.jsonl", small_talk(10)),
        data_dir=tmp_path,
        tokenizer="byte",
    )
    meta = load_meta(folder)
    starts = np.fromfile(folder / "train_starts.bin", dtype="<u8")
    starts[::-1].tofile(folder / "train_starts.bin")
    with pytest.raises(DataError, match="does not index train.bin's conversations"):
        Batches(folder, meta, 64, "cpu")
    starts.tofile(folder / "train_starts.bin")
    (folder / "val_mask.bin").write_bytes(b"\x01")
    with pytest.raises(DataError, match="val_mask.bin is not one byte per token of val.bin"):
        Batches(folder, meta, 64, "cpu")
    (folder / "val_mask.bin").unlink()
    with pytest.raises(DataError, match="val_mask.bin not found; prepare the data set again"):
        Batches(folder, meta, 64, "cpu")


def test_the_history_keeps_the_system_message_and_the_most_recent_whole_turns_that_fit():
    tok = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tok)[0]
    turns = [(f"question {i}?", f"answer number {i}.") for i in range(6)]
    system = [{"role": "system", "content": "Be kind."}]
    for budget in (40, 90, 150, 400):
        ids = template.history_prompt(tok, "Be kind.", turns, "last?", budget)
        kept = 0  # the most recent whole turns that fit beside the system message and the question
        while (
            kept < len(turns)
            and len(
                template.prompt(
                    tok,
                    [
                        *system,
                        *[m for q, a in turns[len(turns) - kept - 1 :] for m in exchange(q, a)],
                        {"role": "user", "content": "last?"},
                    ],
                )
            )
            <= budget
        ):
            kept += 1
        recent = [m for q, a in turns[len(turns) - kept :] for m in exchange(q, a)]
        assert ids == template.prompt(tok, [*system, *recent, {"role": "user", "content": "last?"}])
        assert len(ids) <= budget
    with pytest.raises(ValueError, match="more than the 12 the window leaves"):
        template.history_prompt(tok, "Be kind.", turns, "last?", 12)


def test_fine_tuning_adds_rows_for_the_template_tokens_and_keeps_every_text_row(tmp_path):
    byte_chat = {"tokenizer": "byte", "vocab_size": 260, "text_vocab_size": 256}
    check_vocabulary(
        {"tokenizer": "byte"}, 256, byte_chat, "w"
    )  # the four new rows are the template's
    with pytest.raises(
        CheckpointError,
        match="has 200 token embeddings, fewer than the 256 of this data set's text",
    ):
        check_vocabulary({"tokenizer": "byte"}, 200, byte_chat, "w")
    wte = torch.randn(256, 8)
    state = with_new_rows({"wte.weight": wte, "lm_head.weight": wte}, 260, seed=0)
    assert state["wte.weight"].shape == (260, 8) and torch.equal(state["wte.weight"][:256], wte)
    assert state["lm_head.weight"] is state["wte.weight"]  # still tied
    new = state["wte.weight"][256:]
    assert (
        torch.allclose(new.mean(0), wte.mean(0), atol=0.03)
        and len(set(map(tuple, new.tolist()))) == 4
    )
    untied = with_new_rows({"wte.weight": wte, "lm_head.weight": 2 * wte}, 260, seed=0, tied=False)
    assert torch.equal(untied["lm_head.weight"][:256], 2 * wte)


def test_a_byte_model_pretrained_on_text_fine_tunes_on_conversations(tmp_path, data_dir, capsys):
    (tmp_path / "text.txt").write_text("the cat sees the moon. " * 200)
    prepare("text", source=tmp_path / "text.txt", data_dir=tmp_path, tokenizer="byte")
    prepare(
        "talk",
        source=write_jsonl(tmp_path / "chats.jsonl", small_talk(30)),
        data_dir=tmp_path,
        tokenizer="byte",
    )
    common = [
        *TINY,
        f"--data_dir={tmp_path}",
        "--block_size=32",
        "--max_iters=4",
        "--eval_interval=4",
    ]
    train_here([*common, "--dataset=text", f"--out_dir={tmp_path / 'pre'}"], tmp_path)
    train_here(
        [
            *common,
            "--dataset=talk",
            f"--out_dir={tmp_path / 'ft'}",
            f"--init_from={tmp_path / 'pre'}",
        ],
        tmp_path,
    )
    checkpoint = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    pretrained = load_checkpoint(tmp_path / "pre" / "ckpt.pt")
    assert (
        checkpoint["model_args"]["vocab_size"] == 260 and template_of(checkpoint["meta"]).end == E
    )
    assert "final val loss on the answers" in capsys.readouterr().out
    refused = train_refusing(
        [
            *common,
            "--dataset=talk",
            f"--out_dir={tmp_path / 'ft2'}",
            f"--init_from={tmp_path / 'pre'}",
            "--block_size=16",
        ],
        capsys,
        tmp_path,
    )
    assert_one_line_error(refused, "longer than block_size + 1 = 17")
    assert pretrained["model"]["wte.weight"].shape[0] == 256


def test_gpt2_fine_tunes_on_conversations_and_exports_with_its_padded_vocabulary(tmp_path, capsys):
    """configs/finetune_gpt2_chat.py on a tiny random GPT-2 (GPT-2's 50,257 ids) and a conversations
    file this test writes: the template's rows are added up to 50,304, the checkpoint chats, and it
    exports to a Hugging Face folder that loads back with the same weights."""
    try:
        GPT2Tokenizer()
    except DataError as e:
        pytest.skip(str(e))
    tiny_hf_gpt2(tmp_path / "hf", vocab_size=50257, n_positions=64, n_embd=16, n_head=2)
    source = write_jsonl(tmp_path / "chats.jsonl", small_talk(20))
    prepare("mychat_gpt2", source=source, data_dir=tmp_path / "data", tokenizer="gpt2")
    out = tmp_path / "out"
    train_here(
        [
            REPO / "configs" / "finetune_gpt2_chat.py",
            f"--init_from={tmp_path / 'hf'}",
            f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={out}",
            "--max_iters=3",
            "--eval_interval=3",
            "--eval_iters=1",
            "--batch_size=2",
            "--device=cpu",
            "--dtype=float32",
            "--plot=False",
        ],
        tmp_path,
    )
    checkpoint = load_checkpoint(out / "ckpt.pt")
    assert (
        checkpoint["model_args"]["vocab_size"] == 50304
        and checkpoint["model_args"]["block_size"] == 64
    )
    assert template_of(checkpoint["meta"]).tokens["<|end|>"] == 50260
    chat = run_script(
        "sample.py",
        [f"--out_dir={out}", "--chat", "--device=cpu", "--max_new_tokens=5", "--temperature=0"],
        stdin="What is 3 plus 3?\n",
    )
    assert chat.stdout.startswith("A: ") and len(chat.stdout.splitlines()) == 1
    export_hf(checkpoint, tmp_path / "exported")
    back = load_hf(tmp_path / "exported")
    assert back["model_args"]["vocab_size"] == 50304
    assert torch.equal(back["model"]["wte.weight"], checkpoint["model"]["wte.weight"])
    capsys.readouterr()


def test_the_docs_conversations_prepare_with_every_conversation_kept(tmp_path):
    meta = load_meta(
        prepare("mychat", source=REPO / "docs" / "conversations.jsonl", data_dir=tmp_path,
                tokenizer="byte")
    )  # as the README prepares it
    assert meta["conversations"]["train"] + meta["conversations"]["val"] == 10
    assert meta["left_out_too_long"] == 0 and meta["vocab_size"] == 260


def test_a_corpus_jsonl_of_documents_is_still_a_corpus_and_not_conversations(tmp_path):
    from tinygpt.datasets import is_conversations, is_corpus

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n')
    chats = write_jsonl(tmp_path / "chats.jsonl", small_talk(2))
    assert is_corpus("web", docs) and not is_conversations("web", docs)
    assert is_conversations("talk", chats) and not is_corpus("talk", chats)
    assert tiny_model  # the shared helpers stay importable here


def test_chat_code_lives_in_chat_py_which_imports_only_common():
    """The template, the Q&A framing and the chat scores are chat.py's alone; it imports no other
    part of the package than common.py, so the data builders and the final report can both call
    it."""
    import ast

    tree = ast.parse((REPO / "tinygpt" / "chat.py").read_text())
    ours = {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tinygpt")
    }
    assert ours == {"tinygpt.common"}
    for module in ("tokenizer.py", "evaluation.py", "data.py"):
        text = (REPO / "tinygpt" / module).read_text()
        assert not any(
            word in text for word in ("TinyTalks", "qa_", "answer_room", "<|user|>", "Q: ")
        ), module
    for script in ("train.py", "sample.py"):
        assert "tinytalks" not in (REPO / script).read_text().lower(), script
