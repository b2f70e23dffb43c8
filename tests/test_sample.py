"""sample.py end to end: a tiny model is trained once by train.py's main(), then sampled by real processes where the
process matters (stdin, streaming, files) and through sample.py's main() where only the text does."""
import io
import random
import subprocess
import sys

import pytest
import torch

from dataclasses import asdict

from conftest import ENV, REPO, greedy_by_hand, tiny_model, train_here
from sample import TextStream
from sample import main as sample_main
from tinygpt.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from tinygpt.datasets import prepare
from tinygpt.tokenizer import GPT2Tokenizer, tokenizer_from_meta


def qa_text(pairs=300, seed=0):
    """Small Q&A corpus in the TinyTalks format: 'Q: ...\\nA: ...\\n\\n'."""
    rng = random.Random(seed)
    lines = []
    for _ in range(pairs):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(f"Q: what is {a} plus {b}?\nA: it is {a + b}.\n\n")
    return "".join(lines)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(out_dir, vocab) of a tiny char model trained for a few seconds on the Q&A corpus."""
    root = tmp_path_factory.mktemp("sample")
    source = root / "qa.txt"
    source.write_text(qa_text())
    prepare("qa", source=str(source), data_dir=str(root / "data"))
    out_dir = root / "out"
    train_here(["--dataset=qa", f"--data_dir={root / 'data'}", f"--out_dir={out_dir}",
                "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=16",
                "--max_iters=150", "--eval_interval=150", "--eval_iters=2", "--learning_rate=3e-3",
                "--warmup_iters=10", "--lr_decay_iters=150", "--device=cpu", "--dtype=float32", "--plot=False"], root)
    vocab = set(tokenizer_from_meta(load_checkpoint(out_dir / "ckpt.pt")["meta"]).vocab)
    return out_dir, vocab


def run(args, stdin=None, check=False):
    result = subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True,
                            text=True, cwd=REPO, timeout=300, env=ENV)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def sample(out_dir, *options, stdin=None):
    return run([REPO / "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", *options],
               stdin=stdin)


@pytest.fixture
def sampled(capsys):
    """sample.py's main() in this process, for tests about what it generates rather than about the process
    (those run the command): (stdout, stderr) of a successful run."""
    def run_main(out_dir, *options):
        assert sample_main([f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", *options]) == 0
        return capsys.readouterr()
    return run_main


def trained_model(out_dir):
    checkpoint = load_checkpoint(out_dir / "ckpt.pt")
    return model_from_checkpoint(checkpoint), tokenizer_from_meta(checkpoint["meta"])


def test_samples_of_one_batch_are_independent_draws_that_continue_the_prompt(trained, sampled):
    """Three samples at temperature 1 differ from each other; with top_k=1 each of them is the greedy text,
    worked out here by a full forward pass per token."""
    out_dir, vocab = trained
    samples = sampled(out_dir, "--start=Q:", "--max_new_tokens=60", "--num_samples=3", "--temperature=1.0").out
    samples = samples.removesuffix("\n").split("\n---------------\n")
    assert len(samples) == 3 and len(set(samples)) == 3
    assert all(text.startswith("Q:") and len(text) == len("Q:") + 60 and set(text) <= vocab for text in samples)
    model, tokenizer = trained_model(out_dir)
    greedy = tokenizer.decode(greedy_by_hand(model, torch.tensor([tokenizer.encode("Q:")]), 60)[0].tolist())
    result = sampled(out_dir, "--start=Q:", "--max_new_tokens=60", "--num_samples=3", "--top_k=1")
    assert result.out.removesuffix("\n").split("\n---------------\n") == [greedy] * 3


def test_same_seed_same_text_and_other_seed_other_text(trained, sampled):
    out_dir, _ = trained
    first, again, other = (sampled(out_dir, "--max_new_tokens=80", "--temperature=1.0", f"--seed={s}").out
                           for s in (1, 1, 2))
    assert first == again
    assert first != other


def test_temperature_zero_is_greedy_whatever_the_seed(trained, sampled):
    """Past the 32-token window: the greedy text of full forward passes over the sliding window."""
    out_dir, _ = trained
    result = sampled(out_dir, "--start=Q: what is", "--max_new_tokens=60", "--temperature=0", "--seed=5").out
    model, tokenizer = trained_model(out_dir)
    expected = tokenizer.decode(greedy_by_hand(model, torch.tensor([tokenizer.encode("Q: what is")]), 60)[0].tolist())
    assert result == expected + "\n"
    assert sampled(out_dir, "--start=Q: what is", "--max_new_tokens=60", "--temperature=0", "--seed=6").out == result


def test_stop_sequence_ends_each_sample_before_it(trained):
    out_dir, _ = trained
    result = sample(out_dir, "--start=Q: what is 1 plus 2?\nA:", "--stop=\n", "--max_new_tokens=200",
                    "--num_samples=2", "--temperature=0")
    samples = result.stdout.removesuffix("\n").split("\n---------------\n")
    assert len(samples) == 2
    assert all(s.count("\n") == 1 for s in samples)  # only the newline inside the prompt


def test_chat_over_a_pipe_answers_every_line_up_to_the_answer_boundary(trained):
    out_dir, _ = trained
    questions = ["what is 2 plus 2?", "what is 7 plus 1?", "", "what is 3 plus 3?"]
    result = sample(out_dir, "--chat", "--max_new_tokens=100", stdin="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3  # one answer per non-empty question, each on its own line
    assert all(line.startswith("A:") and len(line) > 2 for line in lines)


def test_chat_reports_a_bad_question_and_goes_on(trained):
    out_dir, _ = trained
    result = sample(out_dir, "--chat", "--max_new_tokens=30", stdin="what is é?\nwhat is 1 plus 1?\n")
    assert result.returncode == 0
    assert "'é'" in result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_first_sample_streams_before_generation_ends(trained):
    out_dir, _ = trained
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), f"--out_dir={out_dir}", "--device=cpu",
                             "--max_new_tokens=100000", "--start=Q:"], stdout=subprocess.PIPE, cwd=REPO, env=ENV)
    try:
        first = proc.stdout.read(40)
        still_running = proc.poll() is None
    finally:
        proc.kill()
        proc.wait()
    assert len(first) == 40 and still_running


def test_prompt_from_file_and_long_prompt_note(trained, tmp_path):
    out_dir, _ = trained
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(qa_text(pairs=5, seed=3))  # longer than the model's 32-token window
    result = sample(out_dir, f"--start=FILE:{prompt}", "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt.read_text())
    assert "sees only the last 32" in result.stderr


@pytest.mark.parametrize("options, expected", [
    (["--start=héllo"], "'é'"),
    (["--start=FILE:/no/such/prompt.txt"], "no such file"),
    (["--temperature=hot"], "temperature"),
    (["--top_q=0.9"], "top_p"),
    (["--temperature=-1"], "temperature=-1.0 must be >= 0"),
    (["--top_p=1.5"], "top_p=1.5 must be in (0, 1]"),
    (["--top_k=0"], "top_k=0 must be at least 1"),
    (["--max_new_tokens=-5"], "max_new_tokens=-5 must be at least 1"),
    (["--num_samples=0"], "num_samples=0 must be at least 1"),
    (["--ckpt=nothing.pt"], "no checkpoint at"),
    (["--sink_tokens=4"], "needs a model with pos='rope' or 'alibi' (this one has 'learned')"),
    (["--sink_tokens=-1"], "sink_tokens=-1 must be >= 0"),
])
def test_bad_requests_fail_with_one_line(trained, options, expected, capsys):
    """In-process, for speed (sample.py's main, as the command runs it): the other tests run the command."""
    out_dir, _ = trained
    assert sample_main([f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", *options]) == 1
    out, err = capsys.readouterr()
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_help_lists_the_options_and_exits_0():
    result = run([REPO / "sample.py", "--help"])
    assert result.returncode == 0
    assert "--top_p=0.95" in result.stdout and "--ckpt=''" in result.stdout and "best.pt" in result.stdout


def test_missing_and_corrupt_checkpoints_fail_with_one_line(tmp_path):
    missing = sample(tmp_path / "nothing-here")
    assert missing.returncode == 1 and "python train.py" in missing.stderr
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    corrupt = sample(tmp_path)
    assert corrupt.returncode == 1 and len(corrupt.stderr.strip().splitlines()) == 1
    assert "Traceback" not in corrupt.stderr


def gpt2_or_skip():
    try:
        return GPT2Tokenizer()
    except Exception as e:  # no network and no TIKTOKEN_CACHE_DIR
        pytest.skip(f"tiktoken's gpt2 files are not available: {e}")


def stream_pieces(tokenizer, text, stop):
    stream = TextStream(tokenizer, stop)
    return [stream.add(token) for token in tokenizer.encode(text)], stream


def test_streaming_never_splits_a_multi_byte_character():
    tok = gpt2_or_skip()
    text = "Naïve café 🙂 — 日本語 ok"
    assert any(tok.decode([t]).endswith("\ufffd") for t in tok.encode(text))  # some tokens are partial characters
    pieces, _ = stream_pieces(tok, text, stop="")
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_streaming_stops_before_a_stop_string_that_spans_tokens_and_holds_back_only_its_prefix():
    tok = gpt2_or_skip()
    text = "First line. Thereafter The End of it"
    pieces, stream = stream_pieces(tok, text, stop=" The End")
    assert "".join(pieces) == "First line. Thereafter" and stream.done
    assert stream.add(tok.encode(" more")[0]) == ""  # nothing after the stop
    pieces, stream = stream_pieces(tok, "a The Ender", stop=" The Endgame")
    assert pieces[1] == "" or not " The Endgame".startswith(pieces[1])  # a possible start of the stop waits...
    assert "".join(pieces) == "a The Ender" and not stream.done  # ...and comes out once it cannot be the stop


def test_gpt2_bpe_checkpoint_samples_what_greedy_generation_gives(tmp_path):
    tok = gpt2_or_skip()
    model = tiny_model(vocab_size=tok.vocab_size, block_size=32, n_embd=16)
    meta = {"tokenizer": "gpt2", "vocab_size": tok.vocab_size}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": meta})
    result = sample(tmp_path, "--start=ROMEO:", "--max_new_tokens=12", "--temperature=0")
    assert result.returncode == 0, result.stderr
    expected = greedy_by_hand(model, torch.tensor([tok.encode("ROMEO:")]), 12)[0].tolist()
    assert result.stdout == tok.decode(expected) + "\n"


def test_chat_history_keeps_whole_recent_turns_that_fit():
    from sample import chat_prompt_ids
    from tinygpt.tokenizer import CharTokenizer
    turns = [(f"question {i}?", f" answer number {i}.") for i in range(6)]  # answers as the model writes them
    framed = [f"Q: {q}\nA:{a}\n\n" for q, a in turns]
    tok = CharTokenizer(sorted(set("".join(framed) + "Q: last?\nA:")))
    for budget in (12, 60, 100, 400):
        text = tok.decode(chat_prompt_ids(tok, turns, "last?", budget))
        assert text.endswith("Q: last?\nA:")
        kept = 0  # the most recent whole turns whose characters fit beside the question
        while kept < len(framed) and sum(map(len, framed[len(framed) - kept - 1:])) + len("Q: last?\nA:") <= budget:
            kept += 1
        assert text == "".join(framed[len(framed) - kept:]) + "Q: last?\nA:"


def test_chat_answers_with_the_conversation_so_far_in_the_context(tmp_path, sampled, monkeypatch):
    vocab = sorted(set(qa_text()))
    model = tiny_model(vocab_size=len(vocab), block_size=128, n_embd=32)
    with torch.no_grad():  # a random model whose next token depends strongly on the context
        for p in model.parameters():
            p.mul_(6)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": {"tokenizer": "char", "vocab": vocab}})
    questions = ["what is 2?", "what is 7?"]  # short: both turns fit in half the 128-token window

    def chat(*options, asked=questions):  # in this process: the pipe's own test runs the command
        monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(asked) + "\n"))
        return sampled(tmp_path, "--chat", "--temperature=0", "--max_new_tokens=10", *options).out.splitlines()

    with_history, without, alone = chat(), chat("--history=False"), chat(asked=questions[1:])
    assert without[1] == alone[0]  # no history: the second answer is the one the question gets alone
    context = f"Q: {questions[0]}\n{with_history[0]}\n\nQ: {questions[1]}\nA:"  # the first turn, then the second
    tok = tokenizer_from_meta({"tokenizer": "char", "vocab": vocab})
    out = tok.decode(model.generate(torch.tensor([tok.encode(context)]), 10, temperature=0)[0].tolist())
    assert with_history[1] == "A:" + out[len(context):].split("\n")[0]
    assert with_history[1] != without[1]  # and the first turn changed the answer
    endless = chat("--max_new_tokens=500", asked=questions[:1])  # this model never writes a newline...
    assert len(endless[0]) == len("A:") + 64  # ...so its answer stops at 64 tokens, half this window


def test_chat_answers_get_a_quarter_of_the_window_and_at_least_64_tokens_while_half_allows():
    from sample import answer_room

    assert [answer_room(b) for b in (32, 128, 256, 1024)] == [16, 64, 64, 256]


def test_a_bpe_of_the_datas_own_trains_samples_evaluates_and_exports_from_the_checkpoint_alone(
    tmp_path, sampled, capsys
):
    """prepare.py --tokenizer=bpe:N, then train.py; with the data folder gone, sample.py and the
    checkpoint's tokenizer still decode (meta holds the BPE), and the export writes the tokenizer
    transformers reads."""
    from tools.evaluate import main as evaluate_main
    from tools.export import main as export_main

    source = tmp_path / "qa.txt"
    source.write_text(qa_text(400) + "Zoë → café ✓\n" * 3, encoding="utf-8")
    assert prepare(
        "qabpe", source=str(source), data_dir=str(tmp_path / "data"), tokenizer="bpe:280"
    )
    out_dir = tmp_path / "out"
    train_here(
        [
            "--dataset=qabpe",
            f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={out_dir}",
            "--n_layer=1",
            "--n_head=2",
            "--n_embd=32",
            "--block_size=32",
            "--batch_size=16",
            "--max_iters=40",
            "--eval_interval=40",
            "--eval_iters=2",
            "--learning_rate=3e-3",
            "--warmup_iters=5",
            "--lr_decay_iters=40",
            "--device=cpu",
            "--dtype=float32",
            "--plot=False",
        ],
        tmp_path,
    )
    assert evaluate_main([f"--out_dir={out_dir}", "--device=cpu"]) == 0
    assert "bits per byte" in capsys.readouterr().out
    (tmp_path / "data" / "qabpe" / "tokenizer.json").unlink()
    (tmp_path / "data" / "qabpe" / "meta.json").rename(tmp_path / "meta.json")
    model, tokenizer = trained_model(out_dir)
    assert (tokenizer.kind, tokenizer.vocab_size, model.config.vocab_size) == ("bpe", 280, 280)
    assert tokenizer.decode(tokenizer.encode("Q: what is Zoë?\nA:")) == "Q: what is Zoë?\nA:"
    text = sampled(out_dir, "--start=Q: what is", "--max_new_tokens=20", "--temperature=0").out
    ids = tokenizer.encode("Q: what is")
    greedy = greedy_by_hand(model, torch.tensor([ids]), 20)[0].tolist()
    assert text.rstrip("\n") == tokenizer.decode(greedy).rstrip("\n")
    assert export_main([f"--out_dir={out_dir}", f"--to={tmp_path / 'hf'}"]) == 0
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert hf_tokenizer.encode("Q: what is Zoë?") == tokenizer.encode("Q: what is Zoë?")
