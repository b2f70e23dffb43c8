"""sample.py end to end: a tiny model is trained once by train.py's main(), then sampled by real
processes where the process matters (stdin, streaming, files) and through sample.py's main() where
only the text does."""
import io
import json
import random
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import ENV, REPO, greedy_by_hand, tiny_model, train_here
from sample import TextStream
from sample import main as sample_main
from tinygpt.chat import answer_room, template_of
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
                "--warmup_iters=10", "--lr_decay_iters=150", "--device=cpu", "--dtype=float32",
                "--plot=False"], root)
    vocab = set(tokenizer_from_meta(load_checkpoint(out_dir / "ckpt.pt")["meta"]).vocab)
    return out_dir, vocab


def run(args, stdin=None, check=False):
    result = subprocess.run([sys.executable, *map(str, args)], input=stdin, capture_output=True,
                            text=True, cwd=REPO, timeout=300, env=ENV)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def sample(out_dir, *options, stdin=None):
    return run([REPO / "sample.py", f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32",
                *options], stdin=stdin)


@pytest.fixture
def sampled(capsys):
    """sample.py's main() in this process, for tests about what it generates rather than about the
    process (those run the command): (stdout, stderr) of a successful run."""
    def run_main(out_dir, *options):
        assert sample_main([f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32",
                            *options]) == 0
        return capsys.readouterr()
    return run_main


def trained_model(out_dir):
    checkpoint = load_checkpoint(out_dir / "ckpt.pt")
    return model_from_checkpoint(checkpoint), tokenizer_from_meta(checkpoint["meta"])


def test_samples_of_one_batch_are_independent_draws_that_continue_the_prompt(trained, sampled):
    """Three samples at temperature 1 differ from each other; with top_k=1 each of them is the
    greedy text, worked out here by a full forward pass per token."""
    out_dir, vocab = trained
    samples = sampled(out_dir, "--start=Q:", "--max_new_tokens=60", "--num_samples=3",
                      "--temperature=1.0").out
    samples = samples.removesuffix("\n").split("\n---------------\n")
    assert len(samples) == 3 and len(set(samples)) == 3
    assert all(text.startswith("Q:") and len(text) == len("Q:") + 60 and set(text) <= vocab
               for text in samples)
    model, tokenizer = trained_model(out_dir)
    greedy_ids = greedy_by_hand(model, torch.tensor([tokenizer.encode("Q:")]), 60)[0].tolist()
    greedy = tokenizer.decode(greedy_ids)
    result = sampled(out_dir, "--start=Q:", "--max_new_tokens=60", "--num_samples=3", "--top_k=1")
    assert result.out.removesuffix("\n").split("\n---------------\n") == [greedy] * 3


def test_same_seed_same_text_and_other_seed_other_text(trained, sampled):
    out_dir, _ = trained
    first, again, other = (sampled(out_dir, "--max_new_tokens=80", "--temperature=1.0",
                                   f"--seed={s}").out for s in (1, 1, 2))
    assert first == again
    assert first != other


def test_temperature_zero_is_greedy_whatever_the_seed(trained, sampled):
    """Past the 32-token window: the greedy text of full forward passes over the sliding window."""
    out_dir, _ = trained
    result = sampled(out_dir, "--start=Q: what is", "--max_new_tokens=60", "--temperature=0",
                     "--seed=5").out
    model, tokenizer = trained_model(out_dir)
    prompt = torch.tensor([tokenizer.encode("Q: what is")])
    expected = tokenizer.decode(greedy_by_hand(model, prompt, 60)[0].tolist())
    assert result == expected + "\n"
    assert sampled(out_dir, "--start=Q: what is", "--max_new_tokens=60", "--temperature=0",
                   "--seed=6").out == result


def test_stop_sequence_ends_each_sample_before_it(trained):
    out_dir, _ = trained
    result = sample(out_dir, "--start=Q: what is 1 plus 2?\nA:", "--stop=\n",
                    "--max_new_tokens=200", "--num_samples=2", "--temperature=0")
    samples = result.stdout.removesuffix("\n").split("\n---------------\n")
    assert len(samples) == 2
    assert all(s.count("\n") == 1 for s in samples)  # only the newline inside the prompt


def test_first_sample_streams_before_generation_ends(trained):
    out_dir, _ = trained
    proc = subprocess.Popen([sys.executable, str(REPO / "sample.py"), f"--out_dir={out_dir}",
                             "--device=cpu", "--max_new_tokens=100000", "--start=Q:"],
                            stdout=subprocess.PIPE, cwd=REPO, env=ENV)
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
    (["--sink_tokens=4"], "sink_tokens=4 needs pos='rope' or 'alibi'"),
    (["--sink_tokens=-1"], "sink_tokens=-1 must be >= 0"),
])
def test_bad_requests_fail_with_one_line(trained, options, expected, capsys):
    """In-process, for speed (sample.py's main, as the command runs it): the other tests run the
    command."""
    out_dir, _ = trained
    assert sample_main([f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32", *options]) == 1
    out, err = capsys.readouterr()
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert out == ""


def test_help_lists_the_options_and_exits_0():
    result = run([REPO / "sample.py", "--help"])
    assert result.returncode == 0
    stdout = result.stdout
    assert "--top_p=0.95" in stdout and "--ckpt=''" in stdout and "best.pt" in stdout


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
    # Some tokens are partial characters.
    assert any(tok.decode([t]).endswith("\ufffd") for t in tok.encode(text))
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
    # A possible start of the stop waits...
    assert pieces[1] == "" or not " The Endgame".startswith(pieces[1])
    # ...and comes out once it cannot be the stop.
    assert "".join(pieces) == "a The Ender" and not stream.done


def test_gpt2_bpe_checkpoint_samples_what_greedy_generation_gives(tmp_path):
    tok = gpt2_or_skip()
    model = tiny_model(vocab_size=tok.vocab_size, block_size=32, n_embd=16)
    meta = {"tokenizer": "gpt2", "vocab_size": tok.vocab_size}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(),
                                           "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": meta})
    result = sample(tmp_path, "--start=ROMEO:", "--max_new_tokens=12", "--temperature=0")
    assert result.returncode == 0, result.stderr
    expected = greedy_by_hand(model, torch.tensor([tok.encode("ROMEO:")]), 12)[0].tolist()
    assert result.stdout == tok.decode(expected) + "\n"


# --------------------------------------------------------------------------------------------- chat

@pytest.fixture(scope="module")
def chat_trained(tmp_path_factory):
    """out_dir of a tiny char model trained for a few seconds on conversations of sums, in the chat
    template."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    lines = []
    for _ in range(200):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        turns = [{"role": "user", "content": f"{a} plus {b}?"},
                 {"role": "assistant", "content": f"it is {a + b}."}]
        lines.append(json.dumps({"messages": turns}))
    (root / "sums.jsonl").write_text("\n".join(lines) + "\n")
    prepare("sums", source=str(root / "sums.jsonl"), data_dir=str(root / "data"))
    out_dir = root / "out"
    train_here(["--dataset=sums", f"--data_dir={root / 'data'}", f"--out_dir={out_dir}",
                "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=64", "--batch_size=16",
                "--max_iters=150", "--eval_interval=150", "--eval_iters=2", "--learning_rate=3e-3",
                "--warmup_iters=10", "--lr_decay_iters=150", "--device=cpu", "--dtype=float32",
                "--plot=False"], root)
    return out_dir


def greedy_reply(model, tokenizer, template, prompt_ids, room):
    """The greedy answer after prompt_ids, worked out by full forward passes, up to a template
    token."""
    out = greedy_by_hand(model, torch.tensor([prompt_ids]), room)[0, len(prompt_ids):].tolist()
    ends = [i for i, token in enumerate(out) if template.is_special(token)]
    return tokenizer.decode(out[:ends[0] if ends else room])


def test_chat_answers_each_line_in_the_template_up_to_the_end_of_turn_token(chat_trained):
    """Over a pipe: one 'A: ...' line per non-empty line; each the greedy answer to the user turn
    rendered in the checkpoint's template after the earlier turns, stopped at the end-of-turn
    token."""
    questions = ["3 plus 4?", "", "7 plus 1?"]
    result = sample(chat_trained, "--chat", "--temperature=0", stdin="\n".join(questions) + "\n")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("A: ") for line in lines)
    model, tokenizer = trained_model(chat_trained)
    template = template_of(load_checkpoint(chat_trained / "ckpt.pt")["meta"])
    room = answer_room(model.config.block_size)
    first_prompt = template.history_prompt(tokenizer, "", [], "3 plus 4?", 48)
    first = greedy_reply(model, tokenizer, template, first_prompt, room)
    second_prompt = template.history_prompt(tokenizer, "", [("3 plus 4?", first)], "7 plus 1?", 48)
    assert lines == [f"A: {first}",
                     f"A: {greedy_reply(model, tokenizer, template, second_prompt, room)}"]
    # It stopped at the end-of-turn token, not the room.
    assert first.startswith("it is ") and len(first) < room


def test_chat_keeps_the_system_message_and_drops_the_oldest_turns(chat_trained, sampled,
                                                                  monkeypatch):
    model, tokenizer = trained_model(chat_trained)
    template = template_of(load_checkpoint(chat_trained / "ckpt.pt")["meta"])
    asked = [f"{i} plus {i}?" for i in range(6)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(asked) + "\n"))
    chat = sampled(chat_trained, "--chat", "--temperature=0", "--system=split").out
    answers = [line[3:] for line in chat.splitlines()]
    turns = list(zip(asked, answers))
    # 64 - a quarter for the answer.
    last = template.history_prompt(tokenizer, "split", turns[:-1], asked[-1], 48)
    assert last[:7] == template.render(tokenizer, [{"role": "system", "content": "split"}])[0]
    assert len(template.messages_of(tokenizer, last)) < 1 + 2 * 5  # not every earlier turn fits
    assert answers[-1] == greedy_reply(model, tokenizer, template, last, 16)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(asked) + "\n"))
    alone = sampled(chat_trained, "--chat", "--temperature=0", "--history=False").out.splitlines()
    plain = template.history_prompt(tokenizer, "", [], asked[-1], 48)
    assert alone[-1] == "A: " + greedy_reply(model, tokenizer, template, plain, 16)


def test_chat_reports_a_line_it_cannot_encode_and_goes_on(chat_trained):
    result = sample(chat_trained, "--chat", "--max_new_tokens=30", stdin="1 plus é?\n1 plus 1?\n")
    assert result.returncode == 0
    assert "'é'" in result.stderr and len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize("options, expected", [
    (["--chat"], "has no chat template: it was not trained on conversations"),
    (["--system=Be kind."], "--system is the system message of a chat; add --chat"),
])
def test_chat_refuses_a_checkpoint_without_a_template_and_a_system_message_without_chat(
        trained, options, expected, capsys):
    out_dir, _ = trained
    assert sample_main([f"--out_dir={out_dir}", "--device=cpu", *options]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]


def test_chat_refuses_a_system_message_that_leaves_no_room(chat_trained, capsys):
    assert sample_main([f"--out_dir={chat_trained}", "--device=cpu", "--chat",
                        "--system=" + "1 plus 1 " * 10]) == 1
    assert "--system: the question and the system message take" in capsys.readouterr().err


def test_a_chat_model_sampled_as_text_shows_its_template_tokens_by_name(chat_trained, sampled):
    text = sampled(chat_trained, "--start=1 plus 2?", "--max_new_tokens=40", "--temperature=0").out
    assert "<|end|>" in text  # the model ends a turn after a question, as it was trained


def test_answers_get_a_quarter_of_the_window():
    assert [answer_room(b) for b in (32, 128, 256, 1024)] == [8, 32, 64, 256]


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
