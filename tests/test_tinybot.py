"""TinyBot as a chat model: tinytalks_chat trains on whole Q/A pairs with the loss on the answers only, and
the scores of a chat model (exact match on taught questions, overlap and topic on held-out ones, repeats in a
chat) count what they say on hand-made answers."""
import re

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, tiny_model
from tinygpt.common import DataError
from tinygpt.data import Batches, load_meta
from tinygpt.datasets import pair_index, prepare
from tinygpt.evaluation import answer_scores, greedy_answer, greedy_matches, repeated_share
from tinygpt.tokenizer import ByteTokenizer

TINYTALKS = SHARED_DATA / "tinytalks"
needs_tinytalks = pytest.mark.skipif(not TINYTALKS.is_dir(), reason=f"no local copy at {TINYTALKS}")


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    prepare("tinytalks_chat", source=TINYTALKS, data_dir=root)
    return root / "tinytalks_chat"


def answer_positions(text) -> list:
    """Positions t whose target (character t + 1) is part of an answer: from the space after each "A:" up to
    and with the newline that ends the answer, or the end of the text; found in the text itself."""
    positions = []
    for match in re.finditer(r"\nA:", text):
        end = text.find("\n", match.end())
        end = len(text) - 1 if end == -1 else end
        positions += range(match.end() - 1, end)  # t predicts t + 1: ':' predicts the space, ... '.' the newline
    return positions


@needs_tinytalks
@pytest.mark.parametrize("split, block_size", [("train", 64), ("val", 256)])
def test_the_loss_is_the_mean_cross_entropy_over_the_answer_tokens_only(chat_data, split, block_size):
    batches = Batches(chat_data, load_meta(chat_data), block_size, "cpu")
    picks = batches.random_picks(split, np.random.default_rng(0), (3,)) if split == "train" \
        else batches.full_split_picks(split)[:3]
    x, y = batches.batch(split, picks)
    model = tiny_model(vocab_size=256, block_size=block_size)
    loss = model(x, y)[1]

    logits = model(x, torch.zeros_like(x))[0].double()
    rows, _ = batches.conversations(split, np.asarray(picks))  # the tokens, x and the last target
    terms = []
    for row in range(len(x)):
        text = bytes(rows[row].tolist()).decode()
        assert text.startswith("Q: ")  # a conversation starts with a whole pair
        for t in answer_positions(text):
            terms.append(logits[row, t].exp().sum().log() - logits[row, t, ord(text[t + 1])])
    assert len(terms) == int((y != -1).sum()) > 0
    assert loss.item() == pytest.approx(sum(terms).item() / len(terms), rel=1e-5)


@needs_tinytalks
def test_the_full_val_split_scores_every_answer_token_once(chat_data):
    batches = Batches(chat_data, load_meta(chat_data), 128, "cpu")
    _, y = batches.batch("val", batches.full_split_picks("val"))
    val_text = (chat_data / "val.bin").read_bytes()[::2].decode()  # uint16 little-endian bytes
    assert int((y != -1).sum()) == len(answer_positions(val_text))
    plain = batches.whole_text()
    assert not plain.answer_loss and int((plain.batch("val", [0])[1] != -1).sum()) == 128


def test_a_text_without_pairs_or_a_broken_index_is_a_one_line_error(tmp_path):
    with pytest.raises(DataError, match="no Q/A pairs"):
        pair_index(ByteTokenizer(), "just some text\n")
    folder = tmp_path / "chat"
    folder.mkdir()
    text, index = pair_index(ByteTokenizer(), "Q: Hi?\nA: Hello.\n\nQ: Bye?\nA: Bye!\n")
    ids = np.frombuffer(text.encode(), dtype=np.uint8).astype("<u2")
    meta = {"dtype": "uint16", "answer_loss": True, "pairs_files": {"train": "t.bin", "val": "t.bin"}}
    for name in ("train.bin", "val.bin"):
        ids.tofile(folder / name)
    with pytest.raises(DataError, match="not found; prepare"):
        Batches(folder, meta, 16, "cpu")
    index[::-1].tofile(folder / "t.bin")  # pairs out of order
    with pytest.raises(DataError, match="does not index"):
        Batches(folder, meta, 16, "cpu")
    index.tofile(folder / "t.bin")
    assert Batches(folder, meta, 16, "cpu").count("train") == 2


def test_exact_match_agrees_with_greedy_decoding_on_a_model_that_learned_its_answers():
    tok = ByteTokenizer()
    pairs = [("Hi?", "Hello."), ("Sky?", "Blue."), ("Two?", "2 is two.")]
    ids = torch.zeros(len(pairs), 24, dtype=torch.long)  # one pair a row, from position 0 as greedy_answer asks
    targets = torch.full_like(ids, -1)
    for row, (question, answer) in enumerate(pairs):
        prompt, reply = tok.encode(f"Q: {question}\nA:"), tok.encode(f" {answer}\n")
        ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
        targets[row, len(prompt):len(prompt) + len(reply)] = torch.tensor(reply)
    model = tiny_model(vocab_size=256, block_size=64, n_layer=1, n_embd=32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(150):  # memorise the three answers
        loss = model(ids[:, :-1], targets[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert [greedy_answer(model, tok, q, "cpu") for q, _ in pairs] == [a for _, a in pairs]
    changed = [(q, a.replace(".", "!")) for q, a in pairs]
    assert greedy_matches(model, tok, pairs + changed, "cpu", batch_size=4) == [True] * 3 + [False] * 3
    too_long = [("Hi? " + "x" * 64, "Hello.")]  # beyond the window: not an answer greedy decoding can give
    assert greedy_matches(model, tok, pairs + too_long, "cpu") == [True] * 3 + [False]


def test_answer_scores_on_hand_made_answers():
    known = {"the", "sky", "is", "blue", "cats", "say", "meow", "yes", "ice", "cold", "it", "dogs"}
    questions = ["What color is the sky?", "What do cats say?", "Is ice cold?", "What do dogs eat?"]
    references = ["The sky is blue.", "Cats say meow.", "Yes, ice is cold.", "Dogs eat meat."]
    answers = ["The sky is blue!", "Cats say woof zorp.", "It is.", "Meat."]
    scores = answer_scores(answers, references, known, questions)
    assert scores["real_words"] == pytest.approx(8 / 11)  # 'woof', 'zorp' and 'meat' are not in the training text
    assert scores["overlap"] == pytest.approx(3 / 4)  # sky/blue, cats/say, meat; 'it' and 'is' are too short
    assert scores["topic"] == pytest.approx(2 / 4)  # sky and cats are in their questions; 'meat' is not
    assert answer_scores([], [], known, []) == {"real_words": 0.0, "overlap": 0.0, "topic": 0.0}


def test_repeats_count_answers_equal_to_the_one_just_before():
    chats = [["Hi!", "Hi!", "Blue.", "Hi!", "Hi!"], ["A.", "B.", "C.", "D.", "E."]]
    assert repeated_share(chats) == pytest.approx(2 / 8)  # two of the eight follow-ups repeat; 'Hi!' after 'Blue.' does not
    assert repeated_share([["only one"]]) == 0.0


@needs_tinytalks
def test_the_chat_report_judges_the_taught_level_1_2_share_against_exact_match_bar(chat_data, capsys):
    """The fine-tune's bar is what the recipe is for (docs/tinybot.md): an untrained model fails it in one
    verdict line; without a bar no verdict is printed."""
    from contextlib import nullcontext
    from tinygpt.evaluation import qa_report
    batches = Batches(chat_data, load_meta(chat_data), 64, "cpu")
    model = tiny_model(vocab_size=256, block_size=64)
    records = [qa_report(model, batches, nullcontext(), exact_match_bar=0.8)]
    verdicts = [line for line in capsys.readouterr().out.splitlines() if "(bar 80%)" in line]
    assert records[-1]["exact_match_train_l1_l2"] < 0.8
    assert len(verdicts) == 1 and verdicts[0].startswith("train questions, exact match") and verdicts[0].endswith("FAIL")
    qa_report(model, batches, nullcontext())
    assert "(bar" not in capsys.readouterr().out
