"""The milestone scorers: PASS/FAIL against a published loss bar, and a chat model's loss on its
answers."""

import pytest
import torch

from conftest import REPO, SHARED_DATA, train_here
from model import GPT, GPTConfig
from tinygpt.chat import ChatTemplate, answer_loss, exchange, qa_pairs, reply_examples
from tinygpt.common import verdict_text
from tinygpt.datasets import prepare
from tinygpt.optim import make_optimizers
from tinygpt.tokenizer import CharTokenizer

TINYTALKS = SHARED_DATA / "tinytalks"
PAIRS = [("what is 1 plus 1?", "it is 2."), ("what is 2 plus 3?", "it is 5."), ("hi?", "hello.")]
QA_TEXT = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in PAIRS)


def chat_of(tok):
    """(template, rendered conversations, (prompt, reply) examples) of PAIRS, one conversation
    each."""
    template = ChatTemplate.for_tokenizer(tok)[0]
    conversations = [exchange(q, a) for q, a in PAIRS]
    rendered = [template.render(tok, c)[0] for c in conversations]
    return template, rendered, reply_examples(template, tok, conversations)


def test_verdict_passes_at_or_below_the_bar_and_fails_above():
    assert verdict_text(1.88, 1.89).endswith("PASS")
    assert verdict_text(1.89, 1.89).endswith("PASS")
    assert verdict_text(1.90, 1.89).endswith("FAIL")
    assert verdict_text(1.0, 0.0) == ""


def test_qa_pairs_read_the_tinytalks_format():
    assert qa_pairs(QA_TEXT) == PAIRS


def test_answer_loss_is_low_for_a_model_that_learned_the_answers_and_high_otherwise():
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(set(QA_TEXT)))
    template, rendered, examples = chat_of(tok)
    model = GPT(GPTConfig(block_size=32, vocab_size=tok.vocab_size + 4, n_layer=2, n_head=2,
                          n_embd=48))
    untrained = answer_loss(model, examples, torch.no_grad(), "cpu")
    data = torch.tensor([token for ids in rendered * 8 for token in ids])
    [optimizer] = make_optimizers(model, 0.0, 3e-3, (0.9, 0.99), "cpu")
    model.train()
    for step in range(200):
        starts = torch.randint(0, len(data) - 33, (16,))
        x = torch.stack([data[s:s + 32] for s in starts])
        y = torch.stack([data[s + 1:s + 33] for s in starts])
        loss = model(x, y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    trained = answer_loss(model, examples, torch.no_grad(), "cpu")
    assert trained < 0.3 < untrained


@pytest.mark.skipif(not TINYTALKS.is_dir(), reason="needs ../shared/data/tinytalks")
def test_tinytalks_run_is_judged_against_the_milestone_bar(tmp_path, capsys):
    prepare("tinytalks", source=str(TINYTALKS), data_dir=str(tmp_path / "data"))
    train_here([REPO / "configs" / "tinytalks.py", f"--data_dir={tmp_path / 'data'}",
                f"--out_dir={tmp_path / 'out'}", "--max_iters=20", "--eval_interval=20",
                "--eval_iters=2", "--n_layer=1", "--n_embd=32", "--block_size=64", "--device=cpu",
                "--dtype=float32", "--plot=False"], tmp_path)
    printed = capsys.readouterr().out
    assert "(bar 1.5): FAIL" in printed  # 20 steps cannot reach the bar


def test_answer_loss_is_the_mean_over_the_answer_tokens_given_the_question():
    """Worked out by hand on a random model: each conversation read whole, the answer and its
    end-of-turn token scored token by token after the question's turn and the assistant's role
    token, every answer token weighing the same whatever its conversation's length."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    tok = CharTokenizer(sorted(set(QA_TEXT)))
    template, _, examples = chat_of(tok)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.vocab_size + 4, n_layer=1, n_head=2,
                          n_embd=16)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5)  # far from uniform: which tokens are scored shows in the loss
    losses = []
    for question, answer in PAIRS:
        prompt = [template.role["user"], *tok.encode(question), template.end,
                  template.role["assistant"]]
        reply = [*tok.encode(answer), template.end]
        ids = torch.tensor([prompt + reply])
        logits = model(ids, ids)[0][0]
        # The reply's i-th token is predicted at position len(prompt) + i - 1.
        for i, token in enumerate(reply):
            losses.append(F.cross_entropy(logits[len(prompt) + i - 1], torch.tensor(token)).item())
    expected = sum(losses) / len(losses)
    assert answer_loss(model, examples, torch.no_grad(), "cpu") == pytest.approx(expected, rel=1e-5)
