"""interpret.py reads the model faithfully: its attention maps are the ones SDPA uses, its logit
lens ends at the model's own output, and activation patching puts back exactly what it says."""
import ast
from dataclasses import asdict

import pytest
import torch

from conftest import run_script, tiny_model
from tinygpt.checkpoint import save_checkpoint
from tools.interpret import (
    all_logits,
    attention_weights,
    draw_attention,
    logit_lens,
    main,
    patched_logits,
    patching_scores,
    restored_fraction,
    run_with_cache,
)


@pytest.mark.parametrize("overrides", [{}, {"pos": "rope", "qk_norm": True}, {"pos": "alibi"},
                                       {"pos": "sinusoidal"},
                                       {"pos": "rope", "qk_norm": True, "attn_float32": True}])
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
        torch.testing.assert_close(block.attn.c_proj(mixed), block.attn(h, rope), atol=1e-5,
                                   rtol=1e-5)
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
    idx = torch.randint(0, 20, (1, 6), generator=torch.Generator().manual_seed(0))
    weights = attention_weights(model, idx)
    paths = [tmp_path / f"{name}.png" for name in ("a", "same", "other")]
    draw_attention(weights, list("abcdef"), paths[0])
    draw_attention(weights, list("abcdef"), paths[1])
    draw_attention([torch.eye(6).expand_as(w) for w in weights], list("abcdef"), paths[2])
    pixels = [image.imread(p) for p in paths]
    # 3 rows of layers, 2 heads.
    assert pixels[0].shape[:2] == (round(2.4 * 3 * 120), round(2.4 * 2 * 120))
    assert (pixels[0] == pixels[1]).all() and not (pixels[0] == pixels[2]).all()


def test_cli_reads_a_prompt_longer_than_the_window_from_its_tail(tmp_path):
    model = tiny_model(vocab_size=3, block_size=16)
    meta = {"tokenizer": "char", "vocab": list("abc"), "vocab_size": 3}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(),
                                           "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": meta})
    png = tmp_path / "maps.png"
    result = run_script("tools/interpret.py", [f"--out_dir={tmp_path}", "--prompt=" + "abc" * 10,
                                               "--answer_tokens=4", f"--png={png}"])
    assert "the prompt has 30 tokens; reading its last 12" in result.stderr
    sequence = ast.literal_eval(result.stdout.splitlines()[0].removeprefix("sequence: "))
    assert len(sequence) == 16 and sequence.startswith(("abc" * 10)[-12:])
    assert png.stat().st_size > 1000


def clean_and_corrupted(model, T=10, seed=1):
    """Two random prompts of T tokens for a model, and the answer steps where their next tokens
    differ."""
    g = torch.Generator().manual_seed(seed)
    vocab_size = model.config.vocab_size
    clean, corrupt = (torch.randint(0, vocab_size, (1, T), generator=g) for _ in range(2))
    good, bad = all_logits(model, clean)[0].argmax(-1), all_logits(model, corrupt)[0].argmax(-1)
    steps = [(t, good[t].item(), bad[t].item()) for t in range(T) if good[t] != bad[t]]
    assert steps, "pick another seed: the two prompts predict the same tokens everywhere"
    return clean, corrupt, steps


@pytest.mark.parametrize("overrides", [{}, {"pos": "rope"}, {"pos": "alibi"}])
def test_patching_the_whole_clean_run_restores_all_of_it_and_patching_nothing_restores_none(
        overrides):
    model = tiny_model(n_layer=3, **overrides)
    clean, corrupt, steps = clean_and_corrupted(model)
    clean_logits, cache = run_with_cache(model, clean)
    corrupt_logits = all_logits(model, corrupt)
    everywhere = list(range(clean.size(1)))
    for layer in range(model.config.n_layer + 1):  # the embedding, then each block's output
        logits = patched_logits(model, corrupt, cache, "resid", layer, everywhere)
        torch.testing.assert_close(logits, clean_logits)
        torch.testing.assert_close(restored_fraction(logits, clean_logits, corrupt_logits, steps),
                                   torch.ones(len(steps)))
        logits = patched_logits(model, corrupt, cache, "resid", layer, [])
        torch.testing.assert_close(logits, corrupt_logits)
        restored = restored_fraction(logits, clean_logits, corrupt_logits, steps)
        assert torch.equal(restored, torch.zeros(len(steps)))


def test_cached_head_outputs_are_each_heads_attention_over_its_values():
    model = tiny_model(n_layer=2, n_head=4)
    idx = torch.randint(0, 20, (1, 8), generator=torch.Generator().manual_seed(2))
    _, cache = run_with_cache(model, idx)
    head_dim = model.config.n_embd // 4
    for layer, (block, w) in enumerate(zip(model.blocks, attention_weights(model, idx))):
        _, _, v = block.attn.queries_keys_values(block.ln_1(cache[("resid", layer)]))
        for h in range(4):  # head h is channels h * head_dim to (h + 1) * head_dim
            head = cache[("heads", layer)][0, :, h * head_dim:(h + 1) * head_dim]
            torch.testing.assert_close(head, w[0, h] @ v[0, h])


def test_patching_one_head_puts_in_that_heads_channels_only():
    model = tiny_model(n_layer=2, n_head=4)
    clean, corrupt, _ = clean_and_corrupted(model)
    _, cache = run_with_cache(model, clean)
    head_dim = model.config.n_embd // 4
    for h in range(4):
        noisy = cache[("heads", 1)] + 100 * torch.randn_like(cache[("heads", 1)])
        head = slice(h * head_dim, (h + 1) * head_dim)
        noisy[..., head] = cache[("heads", 1)][..., head]
        noisy_cache = {**cache, ("heads", 1): noisy}
        with_noise = patched_logits(model, corrupt, noisy_cache, "heads", 1, [3], [h])
        torch.testing.assert_close(with_noise,
                                   patched_logits(model, corrupt, cache, "heads", 1, [3], [h]))


def test_patching_every_head_of_a_layer_is_patching_that_layers_attention_output():
    model = tiny_model(n_layer=2, n_head=4)
    clean, corrupt, _ = clean_and_corrupted(model)
    _, cache = run_with_cache(model, clean)
    for layer in range(2):
        for positions in ([4], [0, 5, 9], list(range(10))):
            whole = patched_logits(model, corrupt, cache, "attn", layer, positions)
            by_heads = patched_logits(model, corrupt, cache, "heads", layer, positions,
                                      heads=[0, 1, 2, 3])
            torch.testing.assert_close(by_heads, whole)
            some_heads = patched_logits(model, corrupt, cache, "heads", layer, positions,
                                        heads=[0, 2])
            # The head mask takes only its own channels.
            assert not torch.allclose(some_heads, whole)


def test_patching_sweeps_score_each_position_and_head_and_whole_attention():
    model = tiny_model(n_layer=2, n_head=2)
    clean, corrupt, steps = clean_and_corrupted(model)
    resid, heads = patching_scores(model, clean, corrupt, steps)
    # 2 heads, then both.
    assert resid.shape == (len(steps), 3, 10) and heads.shape == (len(steps), 2, 3)
    for s, (position, _, _) in enumerate(steps):
        # after the last block a position feeds nothing but its own logits
        expected = torch.zeros(10)
        expected[position] = 1
        torch.testing.assert_close(resid[s, -1], expected)
    clean_logits, cache = run_with_cache(model, clean)
    corrupt_logits = all_logits(model, corrupt)

    def score(logits, s):
        return restored_fraction(logits, clean_logits, corrupt_logits, steps)[s]

    # At the predicting position: head 1, then the whole attention.
    for s, (position, _, _) in enumerate(steps):
        for layer in range(2):
            one = patched_logits(model, corrupt, cache, "heads", layer, [position], [1])
            torch.testing.assert_close(heads[s, layer, 1], score(one, s))
            whole = patched_logits(model, corrupt, cache, "attn", layer, [position])
            torch.testing.assert_close(heads[s, layer, -1], score(whole, s))


def save_tiny_checkpoint(folder, **overrides):
    model = tiny_model(vocab_size=3, block_size=16, **overrides)
    meta = {"tokenizer": "char", "vocab": list("abc"), "vocab_size": 3}
    save_checkpoint(folder / "ckpt.pt", {"model": model.state_dict(),
                                         "model_args": asdict(model.config),
                                         "config": {}, "step": 0, "meta": meta})


def test_cli_prints_the_patching_tables_and_draws_them(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    save_tiny_checkpoint(tmp_path)
    png = tmp_path / "patching.png"
    assert main([f"--out_dir={tmp_path}", "--prompt=abcab", "--corrupt=abcaa", "--answer_tokens=3",
                 f"--png={png}"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("clean:     'abcab")
    assert out.splitlines()[1].startswith("corrupted: 'abcaa")
    tables = out.count("residual stream, one position patched at a time")
    assert tables >= 1 and out.count("\nembed ") == tables and out.count("\nlayer 1 ") == 2 * tables
    assert png.stat().st_size > 1000


@pytest.mark.parametrize("args, error", [
    (["--corrupt=abc"], "--prompt has 5 tokens and --corrupt 3; patching pairs positions"),
    (["--corrupt=abcaz"], "--corrupt cannot be encoded: character 'z'"),
    (["--corrupt=abcab"], "nothing for patching to restore"),
    (["--corrupt=abcaa", "--answer_tokens=0"], "patching needs answer_tokens >= 1"),
])
def test_cli_patching_errors_are_one_line(tmp_path, capsys, args, error):
    save_tiny_checkpoint(tmp_path)
    assert main([f"--out_dir={tmp_path}", "--prompt=abcab", "--png=", *args]) == 1
    err = capsys.readouterr().err
    assert error in err and err.count("\n") == 1


def test_patching_reads_a_checkpoint_of_the_first_format(tmp_path, capsys):
    """A checkpoint written before checkpoints carried a format version (format 1: no "format"
    key) whose model options this model.py still has loads and is patched like any other."""
    model = tiny_model(vocab_size=3, block_size=16)
    meta = {"tokenizer": "char", "vocab": list("abc"), "vocab_size": 3}
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(),
                                           "model_args": asdict(model.config),
                                           "config": {}, "step": 0, "meta": meta})
    assert main([f"--out_dir={tmp_path}", "--prompt=abcab", "--corrupt=abcaa", "--answer_tokens=3",
                 "--png="]) == 0
    out = capsys.readouterr().out
    assert out.startswith("clean:     'abcab")
    assert "residual stream, one position patched at a time" in out
