"""The benchmark harness on a tiny model: ours and the bare step timed side by side, a Markdown table written."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

from pathlib import Path

import pytest

from mlxgpt.bench import main
from mlxgpt.errors import UserError

CONF = Path(__file__).resolve().parents[1] / "conf"
TINY = ["model=nano", "model.n_embd=32", "trainer.batch_size=2", "trainer.block_size=16"]


def test_bench_times_ours_and_the_bare_step_and_writes_a_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NANOGPT_DIR", raising=False)
    assert main(["--steps", "2", "--warmup", "1", "--round", "1", "--out", str(tmp_path / "out"), *TINY],
                conf_dir=CONF) == 0
    table = (tmp_path / "out" / "cpu-cpu.md").read_text()
    assert table == capsys.readouterr().out.split("written:")[0].strip() + "\n"
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| bare")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)  # ms/step
    assert "tokens/s ours / bare" in table and "T=16, B=2" in table
    assert "nanoGPT PyTorch step skipped" in table  # no checkout given: (c) is skipped with the reason


def test_bench_rejects_a_missing_nanogpt_checkout(tmp_path):
    with pytest.raises(UserError, match="nanoGPT"):
        main(["--nanogpt", str(tmp_path / "nowhere"), "--out", str(tmp_path), *TINY], conf_dir=CONF)
