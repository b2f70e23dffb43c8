"""GPT-2's weights in and out, and fine-tuning from weights, as a specification.

The reference is `transformers` itself (a test-only dependency): tiny random GPT-2 models are built
with it, saved with save_pretrained, and this repo's model must compute what transformers computes
from the same folder. Nothing here touches the network.
"""
import json
import subprocess
from contextlib import nullcontext

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from conftest import (
    TINY,
    assert_one_line_error,
    needs_gpt2_bpe,
    records,
    run_script,
    run_train,
    tiny_args,
    tiny_hf_gpt2,
    tiny_model,
    tiny_text,
    train_here,
    train_losses,
    train_refusing,
)
from model import GPT, GPTConfig
from tinygpt.checkpoint import (
    check_vocabulary,
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    save_checkpoint,
    weights_to_fine_tune,
)
from tinygpt.common import CheckpointError, parse_options
from tinygpt.data import Batches, estimate_loss, load_meta
from tinygpt.datasets import prepare
from tinygpt.gpt2 import export_hf
from tinygpt.tokenizer import GPT2Tokenizer
from train import TrainConfig

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
    mlp = {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
    assert model.config.mlp == mlp and model.config.bias
    idx = ids(50)
    with torch.no_grad():
        assert_same_logits(our_logits(model, idx), hf(idx).logits)


def test_openai_style_file_with_bare_names_and_mask_buffers_loads_the_same(tmp_path):
    """OpenAI's files on the Hub name tensors without 'transformer.' and keep each layer's causal
    mask (attn.bias) and attn.masked_bias as tensors; they are buffers, not weights."""
    hf = tiny_hf_gpt2(tmp_path / "saved")
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    for layer in range(2):
        state[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(32, 32)).view(1, 1, 32, 32)
        state[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    folder = tmp_path / "openai"
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    (folder / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    idx = ids(50)
    with torch.no_grad():
        assert_same_logits(our_logits(model_from_checkpoint(load_weights(folder)), idx),
                           hf(idx).logits)


def test_greedy_generation_equals_transformers_greedy_generate(tmp_path):
    hf = tiny_hf_gpt2(tmp_path)
    model = model_from_checkpoint(load_weights(tmp_path))
    prompt = ids(50, (3, 5))
    ours = model.generate(prompt, 20, temperature=0)  # with the KV cache
    theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert len(set(ours[:, 5:].flatten().tolist())) > 3  # not one token repeated
    assert torch.equal(ours, theirs)


@needs_gpt2_bpe
def test_sample_init_from_a_folder_writes_transformers_greedy_text_in_gpt2_bpe(tmp_path):
    hf = tiny_hf_gpt2(tmp_path, vocab_size=GPT2_VOCAB)
    tok = GPT2Tokenizer()
    prompt = tok.encode("ROMEO:")
    expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                           pad_token_id=0)[0].tolist()
    result = run_script("sample.py", [f"--init_from={tmp_path}", "--start=ROMEO:",
                                      "--max_new_tokens=12", "--temperature=0", "--device=cpu",
                                      "--dtype=float32"])
    assert result.stdout == tok.decode(expected) + "\n"


@pytest.mark.parametrize("break_it, message", [
    (lambda folder: (folder / "model.safetensors").unlink(), "has no model.safetensors"),
    (lambda folder: edit_config(folder, n_embd=64, n_head=4),
     "does not fit the model its config describes"),
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


def test_a_missing_path_is_a_one_line_error_that_lists_what_init_from_takes(tmp_path, data_dir,
                                                                            capsys):
    import sample
    args = [f"--init_from={tmp_path / 'nowhere'}"]
    code = sample.main(args)
    result = subprocess.CompletedProcess(args, code, *capsys.readouterr())
    assert_one_line_error(result, "no such file or folder", "gpt2-xl",
                          "a Hugging Face GPT-2 folder", "a .pt")
    result = train_refusing(tiny_args(data_dir, tmp_path / "out", *args), capsys, tmp_path)
    assert_one_line_error(result, "no such file or folder (train that run first?)", "gpt2-xl")


def test_a_gpt2_name_without_a_network_is_one_line_naming_the_local_folder_option(tmp_path):
    result = run_script("sample.py", ["--init_from=gpt2", "--device=cpu"], check=False,
                        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")})
    assert_one_line_error(result, "cannot download gpt2", "--init_from=PATH/TO/FOLDER")


# ------------------------------------------------------------------------------------- export

def test_export_round_trip_from_pretrained_gives_the_same_logits(tmp_path):
    """A model of this repo's defaults (no biases, exact GELU), exported by the CLI, loaded by
    transformers."""
    model = tiny_model(seed=3, vocab_size=40, n_embd=32, n_head=4, block_size=32)
    with torch.no_grad():
        for p in model.parameters():
            # Trained weights are far from the 0.02 init; the comparison must see every part.
            p.mul_(10)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_checkpoint(run_dir / "ckpt.pt", {"model": model.state_dict(),
                                          "model_args": vars(model.config), "config": {},
                                          "step": 0, "meta": {"tokenizer": "char"}})
    run_script("tools/export.py", [f"--out_dir={run_dir}", f"--to={tmp_path / 'hf'}"])
    hf, loading = GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    # Nothing left to transformers' init.
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    idx = ids(40, (2, 32))
    with torch.no_grad():
        assert_same_logits(our_logits(model, idx), hf(idx).logits)


def test_gpt2_weights_survive_import_then_export_unchanged(tmp_path):
    hf = tiny_hf_gpt2(tmp_path / "in", activation_function="gelu_new")
    weights = load_weights(tmp_path / "in")
    export_hf({**weights, "model": model_from_checkpoint(weights).state_dict()}, tmp_path / "out")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["activation_function"] == "gelu_new"
    for name, tensor in hf.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    with pytest.raises(CheckpointError,
                       match="already holds config.json and model.safetensors; export to a new"):
        export_hf(weights, tmp_path / "out")  # never over another model


def test_export_refuses_what_gpt2_does_not_have_in_one_line(tmp_path, capsys):
    import tools.export
    model = tiny_model(pos="rope", mlp="relu2", qk_norm=True, tie_weights=False)
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(),
                                           "model_args": vars(model.config), "config": {},
                                           "step": 0, "meta": {}})
    # The command runs as a process in the test above.
    args = [f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}"]
    result = subprocess.CompletedProcess(args, tools.export.main(args), *capsys.readouterr())
    assert_one_line_error(result, "cannot be exported as GPT-2", "pos='rope'", "mlp='relu2'",
                          "qk_norm=True", "tie_weights=False")
    assert not (tmp_path / "hf").exists()


# --------------------------------------------------------------------------------- fine-tuning

@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory):
    """A data folder with 'tinybpe': the tiny sentences in GPT-2 BPE tokens."""
    root = tmp_path_factory.mktemp("bpe")
    (root / "tiny.txt").write_text(tiny_text())
    prepare("tinybpe", source=root / "tiny.txt", data_dir=root, tokenizer="gpt2")
    return root


@needs_gpt2_bpe
def test_fine_tuning_a_hugging_face_folder_starts_from_its_weights_in_its_shape(tmp_path, bpe_data,
                                                                                capsys):
    """The model takes the weights' shape, not the command line's, with block_size cropped to the
    one asked for and the run's dropout; its first evaluation is the loaded model's, and the loss
    falls."""
    tiny_hf_gpt2(tmp_path / "hf", vocab_size=GPT2_VOCAB, n_positions=64, n_layer=3, n_embd=48)
    out = tmp_path / "out"
    # TINY asks for 2 layers of 32, block 16
    args = [*TINY, f"--data_dir={bpe_data}", "--dataset=tinybpe", f"--out_dir={out}",
            f"--init_from={tmp_path / 'hf'}", "--dropout=0.1", "--max_iters=12"]
    train_here(args, cwd=tmp_path)
    printed = capsys.readouterr().out
    assert f"fine-tuning {tmp_path / 'hf'}: its weights and shape (block_size 16)" in printed
    assert "n_layer = 3" in printed and "n_embd = 48" in printed  # the effective config
    shape = load_checkpoint(out / "ckpt.pt")["model_args"]
    keys = ("n_layer", "n_embd", "block_size", "vocab_size", "bias", "mlp", "dropout")
    assert {k: shape[k] for k in keys} \
        == {"n_layer": 3, "n_embd": 48, "block_size": 16, "vocab_size": GPT2_VOCAB, "bias": True,
            "mlp": "gelu_tanh", "dropout": 0.1}

    cfg = parse_options(TrainConfig, args)
    model_args, state = weights_to_fine_tune(cfg, load_meta(bpe_data / "tinybpe"))
    loaded = GPT(GPTConfig(**model_args))
    loaded.load_state_dict(state)  # the folder's weights, cropped to 16 positions
    batches = Batches(bpe_data / "tinybpe", load_meta(bpe_data / "tinybpe"),
                      model_args["block_size"], "cpu")
    expected = estimate_loss(loaded, batches, cfg.eval_iters, cfg.batch_size, cfg.seed, 0,
                             nullcontext())
    assert records(out, "eval")[0]["val"] == pytest.approx(expected["val"], rel=1e-5)
    losses = train_losses(out)
    assert losses[12] < 0.8 * losses[1]


def pretrained_char_checkpoint(folder, meta, seed, **model_args):
    """A checkpoint of this repo whose weights no fresh model would have: a seed train.py does not
    use, scaled."""
    model = tiny_model(seed=seed, vocab_size=meta["vocab_size"], n_embd=32, **model_args)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
    folder.mkdir()
    # As train.py writes one.
    (folder / "config.json").write_text(json.dumps({"n_layer": model.config.n_layer}))
    save_checkpoint(folder / "best.pt", {"model": model.state_dict(),
                                         "model_args": vars(model.config), "config": {},
                                         "step": 500, "meta": meta, "optimizer": {}})
    return model


def test_fine_tuning_a_checkpoint_loads_its_weights_with_a_fresh_optimizer_and_a_rerun_resumes(
        tmp_path, data_dir, capsys):
    """From an out_dir of this repo (its best.pt): the weights, step 0 and a fresh AdamW. A rerun of
    the same command into the same out_dir resumes that out_dir's own checkpoint, never the weights
    again."""
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text())
    source = pretrained_char_checkpoint(tmp_path / "pretrained", meta, seed=99, n_layer=3)
    out = tmp_path / "out"
    command = tiny_args(data_dir, out, f"--init_from={tmp_path / 'pretrained'}",
                        "--learning_rate=1e-9", "--decay_lr=False")
    train_here([*command, "--max_iters=2"], cwd=tmp_path)  # the rerun below is a process
    assert "fine-tuning" in capsys.readouterr().out
    saved = load_checkpoint(out / "ckpt.pt")
    # Not the pretrained run's 500 steps.
    assert saved["step"] == 2 and saved["model_args"]["n_layer"] == 3
    # A fresh AdamW.
    assert {s["step"].item() for s in saved["optimizer"]["state"].values()} == {2.0}
    for name, tensor in source.state_dict().items():  # two steps at lr 1e-9 leave them as loaded
        torch.testing.assert_close(saved["model"][name], tensor, atol=1e-6, rtol=0)

    again = run_train([*command, "--max_iters=4"], cwd=tmp_path)
    assert f"resuming from {out / 'ckpt.pt'} at step 2" in again.stdout
    assert "fine-tuning" not in again.stdout
    assert load_checkpoint(out / "ckpt.pt")["step"] == 4


@pytest.mark.parametrize("pos", ["rope", "alibi"])
def test_weights_without_learned_positions_fine_tune_on_a_longer_window(tmp_path, data_dir, pos):
    """TinyBot pretrains on 128-byte windows and fine-tunes on 256: weights whose positions are
    computed (rope, alibi) take the run's block_size, and on the first positions the model is the
    one that was saved."""
    meta = json.loads((data_dir / "tiny" / "meta.json").read_text())
    source = pretrained_char_checkpoint(tmp_path / "short", meta, seed=3, block_size=16, pos=pos)
    cfg = parse_options(TrainConfig, [f"--init_from={tmp_path / 'short'}", "--block_size=32",
                                      "--dropout=0.0"])
    model_args, state = weights_to_fine_tune(cfg, meta)
    assert model_args["block_size"] == 32
    longer = GPT(GPTConfig(**model_args)).eval()
    longer.load_state_dict(state)
    x = ids(meta["vocab_size"], shape=(2, 32))
    torch.testing.assert_close(our_logits(longer, x[:, :16]), our_logits(source, x[:, :16]))
    assert our_logits(longer, x).shape[1] == 32  # the whole longer window runs


@needs_gpt2_bpe
def test_fine_tuning_refuses_weights_whose_vocabulary_or_positions_cannot_fit(tmp_path, data_dir,
                                                                              bpe_data, capsys):
    tiny_meta = json.loads((data_dir / "tiny" / "meta.json").read_text())
    reverse_meta = json.loads((data_dir / "reverse" / "meta.json").read_text())
    pretrained_char_checkpoint(tmp_path / "chars", tiny_meta, seed=1)
    result = train_refusing(tiny_args(data_dir, tmp_path / "out",
                                      f"--init_from={tmp_path / 'chars' / 'best.pt'}",
                                      "--dataset=reverse"), capsys, tmp_path)
    assert_one_line_error(result, "best.pt was trained on another character vocabulary")
    assert not (tmp_path / "out" / "ckpt.pt").exists()

    def refusal(weights_dir, meta, block_size=16):
        cfg = parse_options(TrainConfig, [f"--init_from={weights_dir}",
                                          f"--block_size={block_size}"])
        with pytest.raises(CheckpointError) as error:
            weights_to_fine_tune(cfg, meta)
        return str(error.value)

    short = tmp_path / "short"
    pretrained_char_checkpoint(short, reverse_meta, seed=2,
                               block_size=reverse_meta["example_len"] - 2)
    assert "positions, fewer than the" in refusal(short, reverse_meta)
    tiny_hf_gpt2(tmp_path / "hf")  # GPT-2's BPE, but only 50 token embeddings
    hf_on_chars = refusal(tmp_path / "hf", tiny_meta)
    assert "reads gpt2 tokens, but this data set is tokenized by char" in hf_on_chars
    bpe_meta = json.loads((bpe_data / "tinybpe" / "meta.json").read_text())
    hf_on_bpe = refusal(tmp_path / "hf", bpe_meta)
    assert f"has 50 token embeddings, fewer than the {GPT2_VOCAB}" in hf_on_bpe
    chars_on_bpe = refusal(tmp_path / "chars", bpe_meta)
    assert "reads char tokens, but this data set is tokenized by gpt2" in chars_on_bpe


def test_vocabulary_check_accepts_the_same_tokens_and_names_the_difference_otherwise():
    chars = {"tokenizer": "char", "vocab": list("abc"), "vocab_size": 3}
    check_vocabulary(chars, 3, chars, "w")
    check_vocabulary({"tokenizer": "gpt2"}, GPT2_VOCAB,
                     {"tokenizer": "gpt2", "vocab_size": GPT2_VOCAB}, "w")
    with pytest.raises(CheckpointError, match="another character vocabulary"):
        # The same characters, other ids.
        check_vocabulary(chars, 3, {**chars, "vocab": list("acb")}, "w")
