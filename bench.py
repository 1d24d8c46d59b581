"""Training speed side by side: `python bench.py [--preset cpu|baby|gpt2] [overrides...]`. See src/mlxgpt/bench.py."""
from mlxgpt.bench import main  # mlxgpt first: see mlxgpt.startup
from mlxgpt.cli import run_main

from pathlib import Path

if __name__ == "__main__":
    run_main(lambda: main(conf_dir=Path(__file__).resolve().parent / "conf"))
