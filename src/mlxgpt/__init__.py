"""mlxgpt: GPT training experiments with MLX, configured by Hydra."""
from mlxgpt.blas import use_fast_blas

use_fast_blas()  # must run before the first `import mlx.core` (Linux CPU wheel only)

__version__ = "0.1.0"
