"""Export a checkpoint of this repo as a Hugging Face GPT-2 folder that transformers loads.

    python -m tools.export --out_dir=out-shakespeare --to=hf-shakespeare
    python -c "from transformers import GPT2LMHeadModel as M; M.from_pretrained('hf-shakespeare')"

The folder holds config.json and model.safetensors. Models with learned positions, GELU, a head
tied to the embedding and no QK-norm export (bias=False exports zero biases); RoPE, ReLU^2,
QK-norm, untied heads and the no-attention ablation are not GPT-2 and are refused. A GPT-2 BPE
model reads GPT-2's tokenizer (GPT2TokenizerFast.from_pretrained('gpt2')); a BPE trained by
prepare.py (bpe:N) is written as tokenizer.json (PreTrainedTokenizerFast(tokenizer_file=...)); a
character vocabulary
stays in the run's meta.json, since transformers has no tokenizer for it.
"""
import sys
from dataclasses import dataclass

from tinygpt.checkpoint import checkpoint_path, clean_state_dict, load_checkpoint
from tinygpt.common import CheckpointError, must, run_cli
from tinygpt.gpt2 import export_hf


@dataclass
class ExportConfig:
    out_dir: str = "out"     # the training run's folder
    ckpt: str = ""           # file in out_dir; '' = best.pt if the run has one, else ckpt.pt
    to: str = ""             # a new folder for config.json and model.safetensors

    def __post_init__(self):
        must(self.to != "", "say where to write the Hugging Face folder: --to=FOLDER")


def export(cfg):
    path = checkpoint_path(cfg.out_dir, cfg.ckpt)
    checkpoint = load_checkpoint(path)
    folder = export_hf({**checkpoint, "model": clean_state_dict(checkpoint["model"])}, cfg.to)
    print(f"wrote {folder / 'config.json'} and {folder / 'model.safetensors'} from {path}")


def main(argv) -> int:
    usage = "usage: python -m tools.export --out_dir=OUT_DIR --to=FOLDER [--ckpt=best.pt]"
    return run_cli(ExportConfig, argv, usage, __doc__.split("\n\n")[0], export, (CheckpointError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
