"""The benchmark harness on a tiny model: ours and the bare step timed side by side, a Markdown table written."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import gc
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from mlxgpt.bench import compose, main, run, table_name
from mlxgpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["model=nano", "model.n_embd=32", "trainer.batch_size=2", "trainer.block_size=16"]


def test_bench_times_ours_and_the_bare_step_and_writes_a_table(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NANOGPT_DIR", raising=False)
    assert main(["--steps", "2", "--warmup", "1", "--round", "1", "--out", str(tmp_path / "out"), *TINY],
                conf_dir=CONF) == 0
    written = sorted(p.name for p in (tmp_path / "out").iterdir())  # named by preset, device and the overrides
    assert written == ["cpu-cpu-model=nano-model.n_embd=32-trainer.batch_size=2-trainer.block_size=16.md"]
    table, printed = (tmp_path / "out" / written[0]).read_text(), capsys.readouterr()
    assert table == printed.out.split("written:")[0].strip() + "\n"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not any("warmup_iters" in w for w in warnings)  # the bench's few iterations are its own choice: no advice
    rows = [line for line in table.splitlines() if line.startswith("| ours") or line.startswith("| bare")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)  # ms/step
    assert "tokens/s ours / bare" in table and "T=16, B=2" in table
    assert "nanoGPT PyTorch step skipped" in table  # no checkout given: (c) is skipped with the reason


def test_table_names_keep_tables_of_other_settings_apart():
    assert table_name("cpu-cpu", []) == "cpu-cpu"
    assert table_name("baby-cpu", ["trainer.batch_size=1", "hydra/launcher=x"]) == \
        "baby-cpu-trainer.batch_size=1-hydra_launcher=x"
    long = table_name("gpt2-gpu", [f"model.n_layer={n}" for n in range(30)])
    assert len(long) == 109 and long != table_name("gpt2-gpu", [f"model.n_layer={n}" for n in range(31)])


def test_bench_rejects_a_missing_nanogpt_checkout(tmp_path):
    with pytest.raises(UserError, match="nanoGPT"):
        main(["--nanogpt", str(tmp_path / "nowhere"), "--out", str(tmp_path), *TINY], conf_dir=CONF)


def test_ours_is_timed_by_stretches_and_each_contender_gets_as_many_steps(tmp_path, monkeypatch):
    """The queued loop's single step intervals are uneven, so each step of ours counts as its stretch's mean; the
    last stretch may be shorter, and the other contenders' turns match every stretch."""
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    cfg = compose(CONF, TINY + ["logger=none", "callbacks.sample.max_new_tokens=0"])
    (ours, bare), skipped, trainer = run(cfg, ["ours", "bare"], steps=5, warmup=1, round_steps=2, nanogpt=None)
    assert not skipped and trainer.iter == 1 + 5 + 2  # warm-up, timed steps, an untimed step before each later turn
    a, b, c = ours.step_s[0], ours.step_s[2], ours.step_s[4]
    assert ours.step_s == [a, a, b, b, c] and len({a, b, c}) == 3 and len(bare.step_s) == 5


def test_bench_override_that_hydra_rejects_with_a_plain_error_is_one_line(tmp_path):
    """`model=1.5` makes Hydra raise a ValueError (not a HydraException): one line and exit 2, as train.py."""
    out = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--out", str(tmp_path), "model=1.5"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.startswith("error: invalid override") and "Traceback" not in out.stderr


@pytest.mark.parametrize("flags, message", [
    (["--round", "0"], "--round 0: must be >= 1"),  # was a ZeroDivisionError
    (["--torch-threads", "0"], "--torch-threads 0: must be >= 1"),  # was ignored (and -3 a torch RuntimeError)
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--contenders", "ours,torch"], "--contenders 'ours,torch': unknown torch"),
    (["--name", "a/b"], "--name 'a/b' is not a file name"),  # was a FileNotFoundError after the run
    (["--out", "/proc/no/such"], "cannot create --out /proc/no/such"),
])
def test_bench_flags_are_checked_before_the_run(tmp_path, flags, message):
    with pytest.raises(UserError) as e:
        main(["--out", str(tmp_path), *flags, *TINY], conf_dir=CONF)
    assert str(e.value).startswith(message) and "; " in str(e.value)


def test_a_refused_override_creates_no_out_directory(tmp_path):
    with pytest.raises(UserError, match="optimizer.lr"):
        main(["--out", str(tmp_path / "out"), *TINY, "optimizer.lr=nan"], conf_dir=CONF)
    assert not (tmp_path / "out").exists()


def test_bench_with_every_contender_skipped_is_an_error_not_an_empty_table(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NANOGPT_DIR", raising=False)
    with pytest.raises(UserError, match=r"^nothing to time \(nanoGPT PyTorch step skipped: .*add ours or bare"):
        main(["--contenders", "nanogpt", "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "out"), *TINY],
             conf_dir=CONF)
    assert not list((tmp_path / "out").iterdir())


def _peaks_mb(contenders: list[str]) -> dict[str, float]:
    gc.collect()  # an earlier run's trainer (held in reference cycles) would count in this run's peak
    cfg = compose(CONF, ["model=nano", "model.n_embd=128", "trainer.batch_size=2", "trainer.block_size=16",
                         "logger=none", "callbacks.sample.max_new_tokens=0"])
    results, _, _ = run(cfg, contenders, steps=2, warmup=1, round_steps=1, nanogpt=None)
    return {r.name.split(" ")[0]: r.peak_memory_gb * 1e3 for r in results}


def test_each_contenders_peak_memory_is_its_own(tmp_path, monkeypatch):
    """Ours' peak leaves out the bare step's model and optimizer state held between its turns (was +40% here)."""
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    alone, together = _peaks_mb(["ours"]), _peaks_mb(["ours", "bare"])
    assert together["ours"] == pytest.approx(alone["ours"], rel=0.05)
    # The bare step's own peak varies by up to ~12% at this size (when MLX's CPU thread frees intermediates); another
    # contender's state counted in it would add more than half
    assert together["bare"] == pytest.approx(_peaks_mb(["bare"])["bare"], rel=0.25)


def test_torch_flags_name_the_table_so_the_presets_table_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NANOGPT_DIR", raising=False)
    main(["--steps", "1", "--warmup", "1", "--contenders", "bare", "--torch-threads", "1", "--torch-compile", "off",
          "--out", str(tmp_path / "out"), *TINY[:2]], conf_dir=CONF)
    assert [p.name for p in (tmp_path / "out").iterdir()] == [
        "cpu-cpu-torch-compile=off-torch-threads=1-model=nano-model.n_embd=32.md"]
