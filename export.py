"""Export a trained run as a Hugging Face GPT-2 directory: `python export.py checkpoint=<run dir> out=<dir>`."""
from mlxgpt.cli import exit_on_user_error, run_hydra  # mlxgpt first: see mlxgpt.startup
from mlxgpt.config import ExportConfig

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from mlxgpt.config import validate_sample
    from mlxgpt.errors import UserError
    from mlxgpt.pretrained import export_hf, is_pretrained
    from mlxgpt.sampling import load_model

    if cfg.format != "hf":
        raise UserError(f"invalid format={cfg.format}: the supported format is hf")
    validate_sample(cfg, "export.py")
    if is_pretrained(cfg.checkpoint):
        raise UserError(f"checkpoint={cfg.checkpoint} is already a Hugging Face GPT-2 model; export.py converts "
                        f"mlxgpt runs and checkpoints")
    model, tokenizer, state = load_model(cfg.checkpoint, cfg.which)
    out = export_hf(model, cfg.out, overwrite=cfg.overwrite, tokenizer_meta=tokenizer.to_meta(),
                    vocab_size=tokenizer.vocab_size)
    print(f"exported iteration {state['iter']} of {cfg.checkpoint} to {out} (Hugging Face GPT-2 format)")
    if tokenizer.name == "char":
        print(f"its {tokenizer.vocab_size}-character vocabulary is in config.json (mlxgpt_tokenizer): Hugging Face "
              f"tokenizers do not know it; `init_from={out}` does")


if __name__ == "__main__":
    run_hydra(main, ExportConfig)
