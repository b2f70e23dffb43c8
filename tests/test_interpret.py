"""interpret.py reads the model faithfully: its attention maps are the ones SDPA uses, its logit
lens ends at the model's own output."""
import pytest
import torch

import ast
from dataclasses import asdict

from checkpoint import save_checkpoint
from conftest import run_script, tiny_model
from interpret import attention_weights, draw_attention, logit_lens


@pytest.mark.parametrize("overrides", [{}, {"pos": "rope", "qk_norm": True}])
def test_attention_maps_reproduce_the_models_attention_output(overrides):
    model = tiny_model(**overrides)
    idx = torch.randint(0, 20, (1, 12), generator=torch.Generator().manual_seed(1))
    weights = attention_weights(model, idx)
    assert len(weights) == model.config.n_layer
    x, rope = model.embed(idx)
    for block, w in zip(model.blocks, weights):
        assert torch.allclose(w.sum(-1), torch.ones(()))          # rows are distributions
        assert torch.all(w.triu(diagonal=1) == 0)                  # no query reads the future
        h = block.ln_1(x)
        _, _, v = block.attn.queries_keys_values(h, rope)
        mixed = (w @ v).transpose(1, 2).reshape(h.shape)
        torch.testing.assert_close(block.attn.c_proj(mixed), block.attn(h, rope), atol=1e-5, rtol=1e-5)
        x = block(x, rope)


def test_ablated_attention_map_is_the_identity():
    model = tiny_model(attention=False)
    weights = attention_weights(model, torch.randint(0, 20, (1, 9)))
    assert all(torch.equal(w[0, 0], torch.eye(9)) for w in weights)


def test_logit_lens_ends_at_the_models_own_prediction():
    model = tiny_model()
    idx = torch.randint(0, 20, (1, 10))
    readouts = logit_lens(model, idx)
    assert len(readouts) == model.config.n_layer + 1
    logits, _ = model(idx, targets=torch.zeros_like(idx))
    torch.testing.assert_close(readouts[-1], logits.softmax(-1))


def test_attention_png_draws_one_map_per_layer_and_head_from_the_weights(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    model = tiny_model(n_layer=3, n_head=2)
    weights = attention_weights(model, torch.randint(0, 20, (1, 6), generator=torch.Generator().manual_seed(0)))
    paths = [tmp_path / f"{name}.png" for name in ("a", "same", "other")]
    draw_attention(weights, list("abcdef"), paths[0])
    draw_attention(weights, list("abcdef"), paths[1])
    draw_attention([torch.eye(6).expand_as(w) for w in weights], list("abcdef"), paths[2])
    pixels = [image.imread(p) for p in paths]
    assert pixels[0].shape[:2] == (round(2.4 * 3 * 120), round(2.4 * 2 * 120))  # 3 rows of layers, 2 heads
    assert (pixels[0] == pixels[1]).all() and not (pixels[0] == pixels[2]).all()


def test_cli_reads_a_prompt_longer_than_the_window_from_its_tail(tmp_path):
    model = tiny_model(vocab_size=3, block_size=16)
    meta = {"tokenizer": "char", "vocab": list("abc"), "vocab_size": 3}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": meta})
    png = tmp_path / "maps.png"
    result = run_script("interpret.py", [f"--out_dir={tmp_path}", "--prompt=" + "abc" * 10, "--answer_tokens=4",
                                         f"--png={png}"])
    assert "the prompt has 30 tokens; reading its last 12" in result.stderr
    sequence = ast.literal_eval(result.stdout.splitlines()[0].removeprefix("sequence: "))
    assert len(sequence) == 16 and sequence.startswith(("abc" * 10)[-12:])
    assert png.stat().st_size > 1000
