"""Training speed side by side: `python bench.py [--preset cpu|baby|gpt2] [overrides...]`. See src/mlxgpt/bench.py."""
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from mlxgpt.bench import main
from mlxgpt.cli import fail, one_line
from mlxgpt.errors import UserError

if __name__ == "__main__":
    try:
        raise SystemExit(main(conf_dir=Path(__file__).resolve().parent / "conf"))
    except UserError as e:
        fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        fail(one_line(e))
