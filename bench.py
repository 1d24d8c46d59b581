"""Training speed side by side: `python bench.py [--preset cpu|baby|gpt2] [overrides...]`. See src/mlxgpt/bench.py."""
from pathlib import Path

from mlxgpt.bench import main
from mlxgpt.cli import fail, user_message

if __name__ == "__main__":
    try:
        raise SystemExit(main(conf_dir=Path(__file__).resolve().parent / "conf"))
    except Exception as e:
        message = user_message(e)  # a UserError, a Hydra/OmegaConf error, or a plain error Hydra raised on an override
        if message is None:
            raise
        fail(message)
