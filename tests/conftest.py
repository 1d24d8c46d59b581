"""Shared fixtures: the shared/ test data beside the checkout, and an offline tiktoken cache seeded from it."""
import os
import shutil
from pathlib import Path

import pytest

import mlxgpt  # noqa: F401  (first, before mlx.core: selects the fast BLAS)
from mlxgpt.tokenizer import GPT2_RANKS_CACHE_NAME

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared/ directory beside the checkout (test data only); skips when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"needs the shared test data directory {SHARED.resolve()} (a sibling of the checkout)")
    return SHARED.resolve()


@pytest.fixture(scope="session")
def tiktoken_cache(shared_dir, tmp_path_factory):
    """TIKTOKEN_CACHE_DIR holding the GPT-2 BPE ranks, so tiktoken works offline; skips when absent."""
    ranks = shared_dir / "data" / "tiktoken" / "r50k_base.tiktoken"
    if not ranks.is_file():
        pytest.skip(f"needs {ranks} (GPT-2 BPE ranks for offline tiktoken)")
    cache = tmp_path_factory.mktemp("tiktoken")
    shutil.copy(ranks, cache / GPT2_RANKS_CACHE_NAME)
    previous = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = previous
