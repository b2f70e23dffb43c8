"""TinyBot as a chat model: tinytalks_chat is TinyTalks' Q/A pairs as conversations in the chat
template, trained with the loss on the answers only, and the scores of a chat model (exact match on
taught questions, overlap and topic on held-out ones, repeats in a chat) count what they say on
hand-made answers."""

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, tiny_model
from tinygpt.chat import (
    ChatTemplate,
    answer_scores,
    greedy_answer,
    greedy_matches,
    qa_pairs,
    repeated_share,
    template_of,
)
from tinygpt.data import Batches, load_meta
from tinygpt.datasets import prepare
from tinygpt.tokenizer import ByteTokenizer

TINYTALKS = SHARED_DATA / "tinytalks"
needs_tinytalks = pytest.mark.skipif(not TINYTALKS.is_dir(), reason=f"no local copy at {TINYTALKS}")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    prepare("tinytalks_chat", source=TINYTALKS, data_dir=root)
    return root / "tinytalks_chat"


def answer_positions(ids) -> list:
    """Positions t whose target (token t + 1) is part of an answer: an assistant turn's text and the
    end-of-turn token after it, found in the ids themselves (258 is <|assistant|>, 259 <|end|>,
    257 <|user|>)."""
    positions, in_answer = [], False
    for t, token in enumerate(ids[1:]):
        if in_answer:
            positions.append(t)
        in_answer = (in_answer and token != 259) or (token == 258)
    return positions


@needs_tinytalks
def test_tinytalks_pairs_become_one_question_conversations_of_the_chat_template(chat_data):
    meta = load_meta(chat_data)
    pairs = qa_pairs((TINYTALKS / "splits" / "train.txt").read_text())
    assert meta["conversations"] == {"train": 210, "val": 45} == {"train": len(pairs), "val": 45}
    assert (meta["tokenizer"], meta["vocab_size"], meta["levels"]) == ("byte", 260, "tinytalks")
    ids = np.fromfile(chat_data / "train.bin", dtype="<u2")
    template = template_of(meta)
    starts = np.fromfile(chat_data / "train_starts.bin", dtype="<u8")
    first = template.messages_of(ByteTokenizer(), ids[:starts[1]])
    assert first == [{"role": "user", "content": pairs[0][0]},
                     {"role": "assistant", "content": pairs[0][1]}]
    test_pairs = qa_pairs((TINYTALKS / "splits" / "test.txt").read_text())
    assert (chat_data / "test.jsonl").read_text().count("\n") == len(test_pairs)


@needs_tinytalks
@pytest.mark.parametrize("split, block_size", [("train", 128), ("val", 256)])
def test_the_loss_is_the_mean_cross_entropy_over_the_answer_tokens_only(chat_data, split,
                                                                        block_size):
    batches = Batches(chat_data, load_meta(chat_data), block_size, "cpu")
    picks = batches.random_picks(split, np.random.default_rng(0), (3,)) if split == "train" \
        else batches.full_split_picks(split)[:3]
    x, y = batches.batch(split, picks)
    model = tiny_model(vocab_size=260, block_size=block_size)
    loss = model(x, y)[1]

    logits = model(x, torch.zeros_like(x))[0].double()
    rows, _ = batches.conversations(split, np.asarray(picks))  # the tokens, x and the last target
    terms = []
    for row in range(len(x)):
        ids = rows[row].tolist()
        assert ids[0] == 257  # a row starts with a whole conversation: its user turn
        for t in answer_positions(ids):
            terms.append(logits[row, t].exp().sum().log() - logits[row, t, ids[t + 1]])
    assert len(terms) == int((y != -1).sum()) > 0
    assert loss.item() == pytest.approx(sum(terms).item() / len(terms), rel=1e-5)


@needs_tinytalks
def test_the_full_val_split_scores_every_answer_token_once(chat_data):
    batches = Batches(chat_data, load_meta(chat_data), 128, "cpu")
    _, y = batches.batch("val", batches.full_split_picks("val"))
    val = np.fromfile(chat_data / "val.bin", dtype="<u2").tolist()
    mask = np.fromfile(chat_data / "val_mask.bin", dtype=np.uint8)
    assert int((y != -1).sum()) == len(answer_positions(val)) == int(mask.sum())
    plain = batches.whole_text()
    assert not plain.answer_loss and int((plain.batch("val", [0])[1] != -1).sum()) == 128


def test_exact_match_agrees_with_greedy_decoding_on_a_model_that_learned_its_answers():
    tok = ByteTokenizer()
    template = ChatTemplate.for_tokenizer(tok)[0]
    pairs = [("Hi?", "Hello."), ("Sky?", "Blue."), ("Two?", "2 is two.")]
    # One conversation a row, from position 0 as greedy_answer asks.
    ids = torch.zeros(len(pairs), 24, dtype=torch.long)
    targets = torch.full_like(ids, -1)
    examples = []
    for row, (question, answer) in enumerate(pairs):
        prompt = template.prompt(tok, [{"role": "user", "content": question}])
        reply = tok.encode(answer) + [template.end]
        ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        targets[row, len(prompt):len(prompt) + len(reply)] = torch.tensor(reply)
        examples.append((prompt, reply))
    model = tiny_model(vocab_size=260, block_size=64, n_layer=1, n_embd=32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(150):  # memorise the three answers
        loss = model(ids[:, :-1], targets[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    answers = [greedy_answer(model, template, tok, q, "cpu") for q, _ in pairs]
    assert answers == [a for _, a in pairs]
    changed = [(p, tok.encode(a.replace(".", "!")) + [template.end])
               for (p, _), (_, a) in zip(examples, pairs)]
    matches = greedy_matches(model, examples + changed, "cpu", batch_size=4)
    assert matches == [True] * 3 + [False] * 3
    too_long = [(template.prompt(tok, [{"role": "user", "content": "Hi? " + "x" * 64}]),
                 examples[0][1])]
    # Beyond the window.
    assert greedy_matches(model, examples + too_long, "cpu") == [True] * 3 + [False]


def test_answer_scores_on_hand_made_answers():
    known = {"the", "sky", "is", "blue", "cats", "say", "meow", "yes", "ice", "cold", "it", "dogs"}
    questions = ["What color is the sky?", "What do cats say?", "Is ice cold?", "What do dogs eat?"]
    references = ["The sky is blue.", "Cats say meow.", "Yes, ice is cold.", "Dogs eat meat."]
    answers = ["The sky is blue!", "Cats say woof zorp.", "It is.", "Meat."]
    scores = answer_scores(answers, references, known, questions)
    # 'woof', 'zorp' and 'meat' are not in the training text.
    assert scores["real_words"] == pytest.approx(8 / 11)
    # sky/blue, cats/say, meat; 'it' and 'is' are too short.
    assert scores["overlap"] == pytest.approx(3 / 4)
    # Sky and cats are in their questions; 'meat' is not.
    assert scores["topic"] == pytest.approx(2 / 4)
    assert answer_scores([], [], known, []) == {"real_words": 0.0, "overlap": 0.0, "topic": 0.0}


def test_levels_are_told_from_the_question_where_the_rules_can():
    from tinygpt.chat import level_of
    assert level_of("What is 6 plus 3?") == level_of("Which is less, 4 or 6?") == "L3 math"
    assert level_of("Hello TinyBot!") == level_of("When were you made?") == level_of("Thanks!") == \
        "L1 greetings, identity"
    assert level_of("I like pop music.") == level_of("Yes, I did!") == "L5 statements (context)"
    assert level_of("What color is the sky?") == level_of("Can fish breathe underwater?") == \
        "L2/L4 facts, reasoning"


def test_repeats_count_answers_equal_to_the_one_just_before():
    chats = [["Hi!", "Hi!", "Blue.", "Hi!", "Hi!"], ["A.", "B.", "C.", "D.", "E."]]
    # Two of the eight follow-ups repeat; 'Hi!' after 'Blue.' does not.
    assert repeated_share(chats) == pytest.approx(2 / 8)
    assert repeated_share([["only one"]]) == 0.0


@needs_tinytalks
def test_the_chat_report_judges_the_taught_level_1_2_share_against_exact_match_bar(chat_data,
                                                                                   capsys):
    """The fine-tune's bar is what the recipe is for (docs/tinybot.md): an untrained model fails it
    in one verdict line; without a bar no verdict is printed."""
    from contextlib import nullcontext

    from tinygpt.data import final_report
    batches = Batches(chat_data, load_meta(chat_data), 128, "cpu")
    model = tiny_model(vocab_size=260, block_size=128)
    records = final_report(model, batches, nullcontext(), 16, exact_match_bar=0.8)
    verdicts = [line for line in capsys.readouterr().out.splitlines() if "(bar 80%)" in line]
    assert records[-1]["exact_match_train_judged"] < 0.8
    assert len(verdicts) == 1
    assert verdicts[0].startswith("train replies, exact match") and verdicts[0].endswith("FAIL")
    assert "levels 1-2 (L1 and L2/L4 rules): " in verdicts[0] and " of 146 " in verdicts[0]
    final_report(model, batches, nullcontext(), 16)
    assert "(bar" not in capsys.readouterr().out
