"""GPT-2's weights in and out, as a specification.

The reference is `transformers` itself (a test-only dependency): tiny random GPT-2 models are built
with it, saved with save_pretrained, and this repo's model must compute what transformers computes
from the same folder. Nothing here touches the network.
"""
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from conftest import assert_one_line_error, run_script, tiny_hf_gpt2, tiny_model
from gpt2 import export_hf, load_weights
from tokenizer import GPT2Tokenizer

GPT2_VOCAB = 50257


def ids(vocab_size, shape=(2, 24), seed=0):
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, targets=idx)[0]  # with targets: the logits of every position


def assert_same_logits(ours, theirs):
    assert ours.shape == theirs.shape
    assert theirs.std() > 0.1  # logits that say something, not a flat guess
    torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- import

@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_a_hugging_face_folder_gives_the_logits_transformers_gives(tmp_path, activation):
    hf = tiny_hf_gpt2(tmp_path, activation_function=activation)  # gelu_new is GPT-2's tanh GELU
    weights = load_weights(tmp_path)
    model = model_from_checkpoint(weights)
    assert model.config.mlp == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation] and model.config.bias
    idx = ids(50)
    with torch.no_grad():
        assert_same_logits(our_logits(model, idx), hf(idx).logits)


def test_openai_style_file_with_bare_names_and_mask_buffers_loads_the_same(tmp_path):
    """OpenAI's files on the Hub name tensors without 'transformer.' and keep each layer's causal mask
    (attn.bias) and attn.masked_bias as tensors; they are buffers, not weights."""
    hf = tiny_hf_gpt2(tmp_path / "saved")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "openai"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    idx = ids(50)
    with torch.no_grad():
        assert_same_logits(our_logits(model_from_checkpoint(load_weights(folder)), idx), hf(idx).logits)


def test_greedy_generation_equals_transformers_greedy_generate(tmp_path):
    hf = tiny_hf_gpt2(tmp_path)
    model = model_from_checkpoint(load_weights(tmp_path))
    prompt = ids(50, (3, 5))
    ours = model.generate(prompt, 20, temperature=0)  # with the KV cache
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert len(set(ours[:, 5:].flatten().tolist())) > 3  # not one token repeated
    assert torch.equal(ours, theirs)


def test_sample_init_from_a_folder_writes_transformers_greedy_text_in_gpt2_bpe(tmp_path):
    hf = tiny_hf_gpt2(tmp_path, vocab_size=GPT2_VOCAB)
    tok = GPT2Tokenizer()
    prompt = tok.encode("ROMEO:")
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0].tolist()
    result = run_script("sample.py", [f"--init_from={tmp_path}", "--start=ROMEO:", "--max_new_tokens=12",
                                      "--temperature=0", "--device=cpu", "--dtype=float32"])
    assert result.stdout == tok.decode(expected) + "\n"


@pytest.mark.parametrize("break_it, message", [
    (lambda folder: (folder / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda folder: edit_config(folder, n_embd=64, n_head=4), "does not fit the model its config describes"),
    (lambda folder: edit_config(folder, n_layer=3), "no blocks.2.ln_1.weight"),
    (lambda folder: edit_config(folder, activation_function="relu"), "activation_function='relu'"),
    (lambda folder: edit_config(folder, tie_word_embeddings=False), "tie_word_embeddings=False"),
    (lambda folder: edit_config(folder, model_type="llama"), "model_type='llama'"),
    (lambda folder: (folder / "config.json").write_text("{not json"), "cannot be read"),
    (lambda folder: [p.unlink() for p in folder.iterdir()], "a folder with no model in it"),
])
def test_a_missing_or_mismatched_folder_is_a_one_line_error(tmp_path, break_it, message):
    tiny_hf_gpt2(tmp_path)
    break_it(tmp_path)
    with pytest.raises(CheckpointError, match=message) as error:
        load_weights(tmp_path)
    assert "\n" not in str(error.value)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_missing_path_is_a_one_line_error_that_lists_what_init_from_takes(tmp_path):
    result = run_script("sample.py", [f"--init_from={tmp_path / 'nowhere'}"], check=False)
    assert_one_line_error(result, "no such file or folder", "gpt2-xl", "a Hugging Face GPT-2 folder", "a .pt")


def test_a_gpt2_name_without_a_network_is_one_line_naming_the_local_folder_option(tmp_path):
    result = run_script("sample.py", ["--init_from=gpt2", "--device=cpu"], check=False,
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")})
    assert_one_line_error(result, "cannot download gpt2", "--init_from=PATH/TO/FOLDER")


# ------------------------------------------------------------------------------------- export

def test_export_round_trip_from_pretrained_gives_the_same_logits(tmp_path):
    """A model of this repo's defaults (no biases, exact GELU), exported by the CLI, loaded by transformers."""
    model = tiny_model(seed=3, vocab_size=40, n_embd=32, n_head=4, block_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)  # trained weights are far from the 0.02 init; the comparison must see every part
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(run_dir / "ckpt.pt", {"model": model.state_dict(), "model_args": vars(model.config),
                                          "config": {}, "step": 0, "meta": {"tokenizer": "char"}})
    run_script("export.py", [f"--out_dir={run_dir}", f"--to={tmp_path / 'hf'}"])
    hf, loading = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # nothing left to transformers' init
    idx = ids(40, (2, 32))
    with torch.no_grad():
        assert_same_logits(our_logits(model, idx), hf(idx).logits)


def test_gpt2_weights_survive_import_then_export_unchanged(tmp_path):
    hf = tiny_hf_gpt2(tmp_path / "in", activation_function="gelu_new")
    weights = load_weights(tmp_path / "in")
    export_hf({**weights, "model": model_from_checkpoint(weights).state_dict()}, tmp_path / "out")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu_new"
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with pytest.raises(CheckpointError, match="already holds config.json and model.safetensors; export to a new"):
        export_hf(weights, tmp_path / "out")  # never over another model


def test_export_refuses_what_gpt2_does_not_have_in_one_line(tmp_path):
    model = tiny_model(pos="rope", mlp="relu2", qk_norm=True, tie_weights=False)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "model_args": vars(model.config),
                                           "config": {}, "step": 0, "meta": {}})
    result = run_script("export.py", [f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}"], check=False)
    assert_one_line_error(result, "cannot be exported as GPT-2", "pos='rope'", "mlp='relu2'", "qk_norm=True",
                          "tie_weights=False")
    assert not (tmp_path / "hf").exists()
