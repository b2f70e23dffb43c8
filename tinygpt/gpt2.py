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
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from model import GPTConfig
from tinygpt.common import CheckpointError, atomic_write

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# transformers' name of each GELU (config.json), and the mlp option of model.py that computes it.
GELUS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
EOS = 50256  # GPT-2's <|endoftext|>


def download(name) -> Path:
    """The local folder of one of the GPT-2 names, downloaded into the Hugging Face cache once."""
    from huggingface_hub import snapshot_download  # imported only when a name is given
    files = ["config.json", "model.safetensors"]
    try:
        return Path(snapshot_download(f"openai-community/{name}", allow_patterns=files))
    # Offline, no network or a proxy: the hub raises different errors, and the remedy is the same.
    except Exception as e:
        raise CheckpointError(f"cannot download {name} from the Hugging Face Hub "
                              f"({type(e).__name__}); without a network, put its config.json and "
                              "model.safetensors in a folder and pass "
                              "--init_from=PATH/TO/FOLDER") from None


def our_name(name) -> str:
    """'transformer.h.3.mlp.c_fc.weight' (or 'h.3.mlp.c_fc.weight') ->
    'blocks.3.mlp.c_fc.weight'."""
    name = name.removeprefix("transformer.")
    return "blocks." + name[2:] if name.startswith("h.") else name


def hf_name(name) -> str:
    """'blocks.3.mlp.c_fc.weight' -> 'transformer.h.3.mlp.c_fc.weight', as save_pretrained names
    it."""
    return "transformer." + ("h." + name[7:] if name.startswith("blocks.") else name)


def model_args_of_hf(config, where) -> dict:
    """GPTConfig fields of a GPT-2 config.json (a dict); a one-line CheckpointError for what this
    model cannot compute the same way."""
    expected = {"model_type": "gpt2", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
                "tie_word_embeddings": True}
    problems = [f"{key}={config[key]!r} (this model runs {want!r})"
                for key, want in expected.items() if config.get(key, want) != want]
    activation = config.get("activation_function", "gelu_new")
    if activation not in GELUS:
        problems.append(f"activation_function={activation!r} (this model runs "
                        f"{', '.join(GELUS)})")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 0)):
        problems.append(f"n_inner={config['n_inner']} (this model's MLP is 4 x n_embd wide)")
    if problems:
        raise CheckpointError(f"{where} describes a model this repo cannot load: "
                              f"{'; '.join(problems)}")
    try:
        args = GPTConfig(block_size=config["n_positions"], vocab_size=config["vocab_size"],
                         n_layer=config["n_layer"], n_head=config["n_head"],
                         n_embd=config["n_embd"], bias=True, pos="learned", mlp=GELUS[activation])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where} is not a GPT-2 config.json "
                              f"({type(e).__name__}: {e})") from None
    return asdict(args)


def load_hf(folder) -> dict:
    """{'model', 'model_args', 'meta'} of a Hugging Face GPT-2 folder, shaped like a checkpoint of
    this repo."""
    folder = Path(folder)
    files = ("config.json", "model.safetensors")
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"{folder} has no {' and no '.join(missing)}: a Hugging Face GPT-2 "
                              "folder holds config.json and model.safetensors (save_pretrained "
                              "writes them; no pickle is read)")
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tensors = load_file(folder / "model.safetensors")
    except Exception as e:  # bad JSON, a truncated or foreign safetensors file
        raise CheckpointError(f"{folder} cannot be read "
                              f"({type(e).__name__}: {str(e)[:160]})") from None
    model_args = model_args_of_hf(config, folder / "config.json")
    # Older files keep the causal mask as a buffer (attn.bias), which is not a weight.
    state = {our_name(k): v.t() if k.endswith(CONV1D) else v for k, v in tensors.items()
             if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    if "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # tied, so the file stores it once
    return {"model": state, "model_args": model_args, "meta": {"tokenizer": "gpt2"}}


def hf_config(args, meta) -> dict:
    """The config.json of a GPT-2 folder for a model of model_args `args`; a one-line
    CheckpointError for the options GPT-2 does not have."""
    problems = [text for wrong, text in [
        (args["pos"] != "learned", f"pos={args['pos']!r} (GPT-2 has learned positions)"),
        (args["mlp"] not in ("gelu", "gelu_tanh"), f"mlp={args['mlp']!r} (GPT-2's MLP is GELU)"),
        (args["qk_norm"], "qk_norm=True (GPT-2 has no QK-norm)"),
        (not args["tie_weights"], "tie_weights=False (GPT-2's head is the token embedding)"),
        (not args["attention"], "attention=False (the no-attention ablation)")] if wrong]
    if problems:
        raise CheckpointError(f"this model cannot be exported as GPT-2: {'; '.join(problems)}")
    eos = EOS if meta.get("tokenizer") == "gpt2" else None
    dropout = args["dropout"]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": args["vocab_size"], "n_positions": args["block_size"],
            "n_embd": args["n_embd"], "n_layer": args["n_layer"], "n_head": args["n_head"],
            "n_inner": None, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new" if args["mlp"] == "gelu_tanh" else "gelu",
            "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
            "tie_word_embeddings": True, "bos_token_id": eos, "eos_token_id": eos}


def export_hf(checkpoint, folder) -> Path:
    """Write a checkpoint of this repo as a Hugging Face GPT-2 folder (config.json,
    model.safetensors, and tokenizer.json for a BPE trained by prepare.py)."""
    folder = Path(folder)
    config = hf_config(checkpoint["model_args"], checkpoint.get("meta") or {})
    taken = [name for name in ("config.json", "model.safetensors") if (folder / name).exists()]
    if taken:
        raise CheckpointError(f"{folder} already holds {' and '.join(taken)}; export to a new "
                              "folder")
    state = dict(checkpoint["model"])  # the caller's keys are clean (checkpoint.clean_state_dict)
    # GPT-2 has biases everywhere, so a model trained with bias=False gets zeros, which add nothing.
    for name, tensor in list(state.items()):
        if name.endswith(".weight") and name not in ("wte.weight", "wpe.weight", "lm_head.weight"):
            zeros = torch.zeros(tensor.shape[0], dtype=tensor.dtype)
            state.setdefault(name[:-len("weight")] + "bias", zeros)
    del state["lm_head.weight"]  # tied to wte.weight, which GPT-2 stores once for both
    tensors = {hf_name(k): (v.t() if k.endswith(CONV1D) else v).contiguous()
               for k, v in state.items()}
    folder.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={"format": "pt"})  # transformers reads only files that say "pt"
    atomic_write(folder / "model.safetensors", lambda f: f.write(data))
    atomic_write(folder / "config.json", lambda f: f.write(json.dumps(config, indent=2).encode()))
    bpe = (checkpoint.get("meta") or {}).get("bpe")
    if bpe:  # the tokenizers library's file: PreTrainedTokenizerFast(tokenizer_file=...) reads it
        atomic_write(folder / "tokenizer.json", lambda f: f.write(bpe.encode("utf-8")))
    return folder
