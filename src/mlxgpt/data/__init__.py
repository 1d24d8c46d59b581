"""Data: sources (where text comes from) -> prepare (tokens in shard files, once) -> loader (batches)."""
from mlxgpt.data.loader import TokenData
from mlxgpt.data.prepare import prepare


def load_data(cfg) -> TokenData:
    """Prepare cfg's corpus if needed and open it."""
    return TokenData(prepare(cfg))


__all__ = ["TokenData", "load_data", "prepare"]
