"""mlxgpt: GPT training experiments with MLX, configured by Hydra."""
from mlxgpt.blas import use_fast_blas
from mlxgpt.malloc import keep_freed_memory

use_fast_blas()  # must run before the first `import mlx.core` (Linux CPU wheel only)
keep_freed_memory()  # Linux CPU wheel only

__version__ = "0.1.0"
