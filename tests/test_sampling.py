"""Sampling as a distribution, and sample.py's options reaching it: frequencies against
softmax(logits / T) worked out by hand, and the CLI's output against greedy decoding by full forward
passes."""
import math
from dataclasses import asdict

import pytest
import torch

from conftest import greedy_by_hand, tiny_model
from model import sample_next
from sample import main as sample_main
from tinygpt.checkpoint import save_checkpoint

DRAWS = 40_000  # frequency within 0.01 of a probability: 4 standard deviations at most


def frequencies(logits, **options):
    generator = torch.Generator().manual_seed(0)
    picked = sample_next(logits.repeat(DRAWS, 1), generator=generator, **options)
    return torch.bincount(picked, minlength=logits.numel()).double() / DRAWS


# Probabilities 1 : 2 : 4 : 0 at temperature 1.
LOGITS = torch.tensor([0.0, math.log(2), math.log(4), -1e9])
HALVED = 1 + 2 ** .5 + 2  # the sum of the weights at temperature 2


@pytest.mark.parametrize("temperature, expected", [
    (1.0, [1 / 7, 2 / 7, 4 / 7, 0]),
    (0.5, [1 / 21, 4 / 21, 16 / 21, 0]),            # logits doubled: 1 : 4 : 16
    (2.0, [1 / HALVED, 2 ** .5 / HALVED, 2 / HALVED, 0])])  # halved: 1 : 1.41 : 2
def test_temperature_divides_the_logits(temperature, expected):
    got = frequencies(LOGITS, temperature=temperature)
    assert got.tolist() == pytest.approx(expected, abs=0.01)


def test_top_k_renormalises_over_the_k_best_after_the_temperature():
    got = frequencies(LOGITS, temperature=0.5, top_k=2)
    assert got.tolist() == pytest.approx([0, 4 / 20, 16 / 20, 0], abs=0.01)
    assert frequencies(LOGITS, top_k=1).tolist() == [0, 0, 1, 0]


def test_top_p_keeps_the_fewest_best_tokens_reaching_p_after_the_temperature():
    # at temperature 1 the best two hold 6/7 = 0.857: p = 0.8 keeps both, renormalised 2 : 4
    assert frequencies(LOGITS, top_p=0.8).tolist() == pytest.approx([0, 1 / 3, 2 / 3, 0], abs=0.01)
    # at temperature 0.5 the best alone holds 16/21 = 0.76: p = 0.75 keeps it alone
    assert frequencies(LOGITS, temperature=0.5, top_p=0.75).tolist() == [0, 0, 1, 0]


# ------------------------------------------------------------------------ sample.py's options

VOCAB = list("abcdefghij \n")


@pytest.fixture(scope="module")
def random_checkpoints(tmp_path_factory):
    """Two checkpoints of random models whose next token depends on the context: a 2-layer
    learned-positions one, and a 1-layer ALiBi one (with one layer a cached key depends on its token
    alone, so a sink cache equals a full forward pass over the sinks and the latest tokens)."""
    folders = {}
    for name, overrides in {"learned": {}, "alibi": {"pos": "alibi", "n_layer": 1}}.items():
        model = tiny_model(vocab_size=len(VOCAB), block_size=16, n_embd=32, **overrides)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(4)
        folder = tmp_path_factory.mktemp(name)
        meta = {"tokenizer": "char", "vocab": VOCAB, "vocab_size": len(VOCAB)}
        save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(),
                                             "model_args": asdict(model.config),
                                             "config": {}, "step": 0, "meta": meta})
        folders[name] = (folder, model)
    return folders


@pytest.fixture
def sample_text(capsys):
    """The text sample.py prints for a checkpoint folder and options: its main() in this process
    (the command itself runs as a process in test_sample.py), the trailing newline taken off."""
    def run(folder, *options):
        argv = [f"--out_dir={folder}", "--device=cpu", "--dtype=float32", "--start=abc", *options]
        assert sample_main(argv) == 0
        return capsys.readouterr().out.removesuffix("\n")
    return run


def greedy_text(model, prompt, steps, sinks=0):
    idx = torch.tensor([[VOCAB.index(c) for c in prompt]])
    return "".join(VOCAB[i] for i in greedy_by_hand(model, idx, steps, sinks)[0].tolist())


def test_sample_py_passes_temperature_top_k_and_top_p_to_generation(random_checkpoints,
                                                                     sample_text):
    """Each option in a setting that must give greedy decoding: top_k=1, a temperature near 0
    (dividing by it sharpens; multiplying would flatten), a top_p below any token's share. The plain
    sample differs."""
    folder, model = random_checkpoints["learned"]
    steps = 40  # past the 16-token window: the sliding window's restarts too
    greedy = greedy_text(model, "abc", steps)
    n = f"--max_new_tokens={steps}"
    seed = "--seed=3"
    assert sample_text(folder, n, "--temperature=0") == greedy
    assert sample_text(folder, n, "--temperature=1.0", "--top_p=1.0", "--top_k=1", seed) == greedy
    assert sample_text(folder, n, "--temperature=0.001", "--top_p=1.0", seed) == greedy
    assert sample_text(folder, n, "--temperature=1.0", "--top_p=0.01", seed) == greedy
    # The premise: the plain sample is not greedy.
    assert sample_text(folder, n, "--temperature=1.0", "--top_p=1.0", seed) != greedy


def test_sample_py_keeps_the_sink_tokens_past_the_window(random_checkpoints, sample_text):
    folder, model = random_checkpoints["alibi"]
    steps = 40
    with_sinks = greedy_text(model, "abc", steps, sinks=4)
    assert with_sinks != greedy_text(model, "abc", steps)  # the premise: sinks change the text here
    text = sample_text(folder, f"--max_new_tokens={steps}", "--temperature=0", "--sink_tokens=4")
    assert text == with_sinks
