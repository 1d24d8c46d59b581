"""Generate text from a trained run: `python sample.py checkpoint=<run dir> prompt="..." num_samples=3`."""
from mlxgpt.cli import exit_on_user_error, print_result, print_stream, run_hydra  # mlxgpt first: see mlxgpt.startup
from mlxgpt.config import SampleConfig

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="sample")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from mlxgpt.sampling import sample

    for i, pieces in enumerate(sample(cfg)):
        print_result(f"--- sample {i + 1}/{cfg.num_samples} ---")
        print_stream(pieces)


if __name__ == "__main__":
    run_hydra(main, SampleConfig)
