"""Train a GPT: `python train.py [group=option ...] [key=value ...]`, or a sweep with `-m`. See README.md."""
from mlxgpt.cli import run_hydra  # mlxgpt first: see mlxgpt.startup
from mlxgpt.config import Config

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from mlxgpt.task import train

    return train(cfg)


if __name__ == "__main__":
    run_hydra(main, Config)
