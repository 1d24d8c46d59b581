"""Compare runs: `python compare.py <sweep dir or run dirs...> [--out DIR]` writes a table and plots. See README.md."""
from mlxgpt.cli import run_main  # mlxgpt first: see mlxgpt.startup
from mlxgpt.compare import main

if __name__ == "__main__":
    run_main(main)
