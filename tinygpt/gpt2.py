"""OpenAI's GPT-2 weights in and out, and the weights that fine-tuning and sampling start from.

A Hugging Face GPT-2 folder holds config.json (the shape) and model.safetensors (the tensors, read
without pickle). GPT-2's tensors are this repo's under other names (`transformer.h.3.` for
`blocks.3.`), with two differences: its four matrices per block are Conv1D weights, stored
(in, out), the transpose of nn.Linear's (out, in); and it always has biases, so a model trained
here with bias=False exports zero biases, which compute the same. Its GELU is the tanh
approximation (mlp='gelu_tanh' here). The four GPT-2 names download with huggingface_hub.

    python sample.py --init_from=gpt2-xl --start="What is the answer to life?"
    python train.py configs/finetune_shakespeare.py           # init_from = 'gpt2-xl'
    python -m tools.export --out_dir=out-shakespeare --to=hf-shakespeare
"""
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from model import GPT, GPTConfig
from tinygpt.checkpoint import check_vocabulary, checkpoint_path, clean_state_dict, load_checkpoint
from tinygpt.common import CheckpointError, atomic_write

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 350M, 774M and 1558M parameters
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}  # transformers' name: ours
EOS = 50256  # GPT-2's <|endoftext|>


def download(name) -> Path:
    """The local folder of one of the GPT-2 names, downloaded into the Hugging Face cache once."""
    from huggingface_hub import snapshot_download  # imported only when a name is given
    try:
        return Path(snapshot_download(f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"]))
    except Exception as e:  # offline, no network, a proxy: the hub's errors differ, the remedy does not
        raise CheckpointError(f"cannot download {name} from the Hugging Face Hub ({type(e).__name__}); without a "
                              f"network, put its config.json and model.safetensors in a folder and pass "
                              f"--init_from=PATH/TO/FOLDER") from None


def our_name(name) -> str:
    """'transformer.h.3.mlp.c_fc.weight' (or 'h.3.mlp.c_fc.weight') -> 'blocks.3.mlp.c_fc.weight'."""
    name = name.removeprefix("transformer.")
    return "blocks." + name[2:] if name.startswith("h.") else name


def hf_name(name) -> str:
    """'blocks.3.mlp.c_fc.weight' -> 'transformer.h.3.mlp.c_fc.weight', as save_pretrained names it."""
    return "transformer." + ("h." + name[7:] if name.startswith("blocks.") else name)


def model_args_of_hf(config, where) -> dict:
    """GPTConfig fields of a GPT-2 config.json (a dict); a one-line CheckpointError for what this model
    cannot compute the same way."""
    problems = [f"{key}={config[key]!r} (this model runs {want!r})" for key, want in
                [("model_type", "gpt2"), ("layer_norm_epsilon", 1e-5), ("scale_attn_weights", True),
                 ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False),
                 ("tie_word_embeddings", True)] if config.get(key, want) != want]
    if config.get("activation_function", "gelu_new") not in GELUS:
        problems.append(f"activation_function={config['activation_function']!r} (this model runs {', '.join(GELUS)})")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 0)):
        problems.append(f"n_inner={config['n_inner']} (this model's MLP is 4 x n_embd wide)")
    if problems:
        raise CheckpointError(f"{where} describes a model this repo cannot load: {'; '.join(problems)}")
    try:
        args = GPTConfig(block_size=config["n_positions"], vocab_size=config["vocab_size"], n_layer=config["n_layer"],
                         n_head=config["n_head"], n_embd=config["n_embd"], bias=True, pos="learned",
                         mlp=GELUS[config.get("activation_function", "gelu_new")])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is not a GPT-2 config.json ({type(e).__name__}: {e})") from None
    return asdict(args)


def check_shapes(state, model_args, where):
    """A one-line CheckpointError unless state holds exactly the tensors, with the shapes, of a GPT of model_args."""
    with torch.device("meta"):  # shapes only: nothing is allocated
        expected = {k: v.shape for k, v in GPT(GPTConfig(**model_args)).state_dict().items()}
    problems = [f"no {k}" for k in expected if k not in state] + [f"an unknown {k}" for k in state if k not in expected]
    problems += [f"{k} is {list(state[k].shape)}, not {list(shape)}" for k, shape in expected.items()
                 if k in state and state[k].shape != shape]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{where} does not fit the model its config describes: {'; '.join(problems[:3])}{more}")


def load_hf(folder) -> dict:
    """{'model', 'model_args', 'meta'} of a Hugging Face GPT-2 folder, shaped like a checkpoint of this repo."""
    folder = Path(folder)
    missing = [name for name in ("config.json", "model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} has no {' and no '.join(missing)}: a Hugging Face GPT-2 folder holds "
                              "config.json and model.safetensors (save_pretrained writes them; no pickle is read)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
    except Exception as e:  # bad JSON, a truncated or foreign safetensors file
        raise CheckpointError(f"{folder} cannot be read ({type(e).__name__}: {str(e)[:160]})") from None
    model_args = model_args_of_hf(config, folder / "config.json")
    state = {our_name(k): v.t() if k.endswith(CONV1D) else v for k, v in tensors.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old files keep the causal mask as a buffer
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # tied: stored once
    check_shapes(state, model_args, folder / "model.safetensors")
    return {"model": state, "model_args": model_args, "meta": {"tokenizer": "gpt2"}}


def load_weights(source) -> dict:
    """{'model', 'model_args', 'meta'} of a GPT-2 name, a Hugging Face GPT-2 folder, or a checkpoint of
    this repo: a .pt file, or an out_dir (its best.pt, else its ckpt.pt)."""
    path = Path(source)
    if source in GPT2_NAMES:
        return load_hf(download(source))
    if path.is_dir() and ((path / "best.pt").is_file() or (path / "ckpt.pt").is_file()):
        path = checkpoint_path(path)  # an out_dir (its config.json is the run's options, not a GPT-2 config)
    elif (path / "config.json").is_file() or (path / "model.safetensors").is_file():
        return load_hf(path)
    if path.is_file():
        return load_checkpoint(path, mmap=True)  # mapped: its optimizer state is never read
    what = "no such file or folder" if not path.exists() else "a folder with no model in it"
    raise CheckpointError(f"--init_from={source}: {what}; give a GPT-2 name ({', '.join(GPT2_NAMES)}), a Hugging "
                          "Face GPT-2 folder (config.json + model.safetensors), or a checkpoint of this repo (a .pt or "
                          "an out_dir)")


def weights_to_fine_tune(cfg, meta, resume_from=None) -> tuple:
    """(cfg, model_args, state_dict) of a run that fine-tunes the weights cfg.init_from names on the data
    set of meta. The model's shape is the weights' (they replace cfg's model fields), with cfg's dropout (and attn_dropout),
    and block_size cropped to cfg's if it asks for less (as nanoGPT's crop_block_size); weights without learned
    positions (rope, alibi, sinusoidal: tables computed for any length) take cfg's block_size, longer or not, so a
    model pretrained on short windows fine-tunes on long ones. A run that resumes
    its own checkpoint (a rerun of the same command) takes the shape from it and no tensors (None): they
    come with the resume. A one-line CheckpointError when the weights' vocabulary cannot read this data
    set, or their positions cannot hold one of its examples."""
    if resume_from:
        weights = load_checkpoint(resume_from, mmap=True)  # mapped, not read: only its model_args and meta are used
        model_args, state = {**weights["model_args"], "dropout": cfg.dropout, "attn_dropout": cfg.attn_dropout}, None
    else:
        weights = load_weights(cfg.init_from)
        state = clean_state_dict(weights["model"])
        learned = "wpe.weight" in state
        block_size = min(cfg.block_size, weights["model_args"]["block_size"]) if learned else cfg.block_size
        model_args = {**weights["model_args"], "block_size": block_size, "dropout": cfg.dropout,
                      "attn_dropout": cfg.attn_dropout}  # the run's dropout, not the weights'
        if learned:
            state["wpe.weight"] = state["wpe.weight"][:block_size]  # the first positions, as trained
        check_shapes(state, model_args, cfg.init_from)
    where = resume_from or cfg.init_from
    positions = weights["model_args"]["block_size"] if state is None or learned else block_size
    check_vocabulary(weights.get("meta") or {}, model_args["vocab_size"], meta, where)
    if state is not None and meta["vocab_size"] > model_args["vocab_size"]:  # template tokens
        tied = model_args.get("tie_weights", True)
        state = with_new_rows(state, meta["vocab_size"], cfg.seed, tied)
        model_args = {**model_args, "vocab_size": meta["vocab_size"]}
    if meta.get("task") and positions < meta["example_len"] - 1:
        raise CheckpointError(f"{where} holds {positions} positions, fewer than the {meta['example_len'] - 1} tokens "
                              f"of a {meta['task']} example; fine-tune a model with a longer block_size")
    return replace(cfg, **{k: v for k, v in model_args.items() if k != "vocab_size"}), model_args, state


def with_new_rows(state, vocab_size, seed, tied=True) -> dict:
    """state with its token embedding (and the head) grown to vocab_size rows, for the template
    tokens a chat data set adds past the text's ids: each new row is the mean of the old ones,
    so the new tokens start as likely as an average one, plus a little seeded noise, so that
    they differ."""
    generator = torch.Generator().manual_seed(seed)

    def grown(table):
        noise = 0.02 * torch.randn(vocab_size - len(table), table.shape[1], generator=generator)
        return torch.cat([table, (table.float().mean(0) + noise).to(table.dtype)])

    new = {"wte.weight": grown(state["wte.weight"])}
    if "lm_head.weight" in state:
        new["lm_head.weight"] = new["wte.weight"] if tied else grown(state["lm_head.weight"])
    return {**state, **new}


def hf_config(model_args, meta) -> dict:
    """The config.json of a GPT-2 folder for a model of model_args; a one-line CheckpointError for the
    options GPT-2 does not have."""
    problems = [text for wrong, text in [
        (model_args["pos"] != "learned", f"pos={model_args['pos']!r} (GPT-2 has learned positions)"),
        (model_args["mlp"] not in ("gelu", "gelu_tanh"), f"mlp={model_args['mlp']!r} (GPT-2's MLP is GELU)"),
        (model_args["qk_norm"], "qk_norm=True (GPT-2 has no QK-norm)"),
        (not model_args["tie_weights"], "tie_weights=False (GPT-2's head is the token embedding)"),
        (not model_args["attention"], "attention=False (the no-attention ablation)")] if wrong]
    if problems:
        raise CheckpointError(f"this model cannot be exported as GPT-2: {'; '.join(problems)}")
    eos = EOS if meta.get("tokenizer") == "gpt2" else None
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": model_args["vocab_size"],
            "n_positions": model_args["block_size"], "n_embd": model_args["n_embd"], "n_layer": model_args["n_layer"],
            "n_head": model_args["n_head"], "n_inner": None, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new" if model_args["mlp"] == "gelu_tanh" else "gelu",
            "resid_pdrop": model_args["dropout"], "embd_pdrop": model_args["dropout"],
            "attn_pdrop": model_args["dropout"], "tie_word_embeddings": True, "bos_token_id": eos, "eos_token_id": eos}


def export_hf(checkpoint, folder) -> Path:
    """Write a checkpoint of this repo as a Hugging Face GPT-2 folder (config.json, model.safetensors)."""
    folder = Path(folder)
    config = hf_config(checkpoint["model_args"], checkpoint.get("meta") or {})
    taken = [name for name in ("config.json", "model.safetensors") if (folder / name).exists()]
    if taken:
        raise CheckpointError(f"{folder} already holds {' and '.join(taken)}; export to a new folder")
    state = clean_state_dict(checkpoint["model"])
    for name, tensor in list(state.items()):  # bias=False: GPT-2 has biases everywhere; zeros change nothing
        if name.endswith(".weight") and name not in ("wte.weight", "wpe.weight", "lm_head.weight"):
            state.setdefault(name[:-len("weight")] + "bias", torch.zeros(tensor.shape[0], dtype=tensor.dtype))
    del state["lm_head.weight"]  # tied to wte.weight; GPT-2 stores it once
    tensors = {hf_name(k): (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": "pt"})  # transformers reads only files that say "pt"
    atomic_write(folder / "model.safetensors", lambda f: f.write(data))
    atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    return folder
