"""mlxgpt: GPT training experiments with MLX, configured by Hydra."""
from mlxgpt.startup import quiet_interrupt_while_importing

quiet_interrupt_while_importing()  # first: a script's Ctrl-C in the imports below (and in hydra's, mlx's) is quiet

from mlxgpt.blas import use_fast_blas  # noqa: E402
from mlxgpt.malloc import keep_freed_memory  # noqa: E402

use_fast_blas()  # must run before the first `import mlx.core` (Linux CPU wheel only)
keep_freed_memory()  # Linux CPU wheel only

__version__ = "0.1.0"
