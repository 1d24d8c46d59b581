"""End to end: train.py and sample.py in subprocesses on tiny models (real Hydra, real data, real checkpoints)."""
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.block_size=32",
        "trainer.batch_size=4", "trainer.eval_iters=2", "trainer.log_interval=5", "logger=none",
        "callbacks.sample.max_new_tokens=20"]

pytestmark = pytest.mark.slow


def run(args, tmp_path, check=True, **kw):
    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300, **kw)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(run_dir: Path, event: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def losses(run_dir: Path) -> list[tuple]:
    """The logged loss sequence: (event, iter, train loss, val loss) of every record."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append((r["event"], r["iter"], r["train/loss"], r.get("val/loss")))
    return out


def test_train_loss_goes_down_writes_run_dir_and_samples(tmp_path):
    proc = run(["train.py", *TINY, "trainer.max_iters=60", "trainer.eval_interval=20", "optimizer.lr=3e-3",
                f"paths.log_dir={tmp_path}/logs", "run_name=r"], tmp_path)
    run_dir = tmp_path / "logs/runs/r"
    evals = records(run_dir, "eval")
    assert [e["iter"] for e in evals] == [0, 20, 40, 60]
    assert evals[-1]["val/loss"] < evals[0]["val/loss"] - 0.5
    ckpts = run_dir / "checkpoints"
    best_eval = min(evals[1:], key=lambda e: e["val/loss"])  # iteration 0 is never saved
    best, last = (json.loads((ckpts / link / "state.json").read_text()) for link in ("best", "last"))
    assert (best["iter"], best["best_val_loss"]) == (best_eval["iter"], best_eval["val/loss"])
    assert (last["iter"], last["tokens_seen"], last["seed"]) == (60, 60 * 4 * 32, 1337)
    assert last["config"]["paths"]["data_dir"] == str(tmp_path / "data")  # the resolved config (MLXGPT_DATA_DIR)
    assert last["config"]["callbacks"]["evaluation"]["interval"] == 20
    kept = sorted(p.name for p in ckpts.iterdir() if not p.is_symlink())  # keep=2 newest, and the one best names
    assert kept == sorted({"iter_0000040", "iter_0000060", f"iter_{best_eval['iter']:07d}"})
    assert all(sorted(f.name for f in (ckpts / k).iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                                  "state.json"] for k in kept)
    composed = OmegaConf.load(run_dir / ".hydra/config.yaml")
    assert (composed.run_name, composed.model.n_layer, composed.optimizer.lr, composed.trainer.max_iters) == (
        "r", 2, 3e-3, 60)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    assert "sample after 60 iterations" in proc.stdout and "device cpu" in proc.stdout
    assert "n_layer: 2" in proc.stdout  # the resolved config tree is printed
    log = (run_dir / "train.log").read_text()  # the console's messages, with time and level, and every log line
    assert "[INFO] mlxgpt: device cpu" in log and "iter 60: train loss" in log and "sample after 60" in log
    assert "iter 55: loss " in log and "tok/s " in log
    assert re.search(r"^iter 55: loss [\d.]+, lr .*, 92% of 60, eta 00:\d\d$", proc.stdout, re.M)  # no terminal:
    assert "\r" not in proc.stderr  # lines, not a progress bar's redraws
    train = records(run_dir, "train")
    assert all(r["tok_per_s"] > 0 and r["mfu"] is not None for r in train)

    done = proc.stdout.splitlines()[-1]  # the last line says how to sample (a run ended with its sample's text)
    assert done == (f"mlxgpt: done: 60 iterations, best val loss {best_eval['val/loss']:.4f}; sample from it: "
                    f"python sample.py checkpoint=logs/runs/r")
    sample_command = shlex.split(done.partition("sample from it: ")[2])[1:]
    out = run([*sample_command, "prompt=def", "num_samples=2", "max_new_tokens=30", "seed=3"], tmp_path).stdout
    assert out.count("--- sample") == 2 and out.count("\ndef") == 2
    again = run(["sample.py", f"checkpoint={run_dir}", "prompt=def", "num_samples=2", "max_new_tokens=30",
                 "seed=3"], tmp_path).stdout
    assert again == out  # seeded

    endless = subprocess.Popen([sys.executable, str(ROOT / "sample.py"), f"checkpoint={run_dir}", "prompt=def",
                                "num_samples=1", "max_new_tokens=100000000"], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env={**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")})
    deadline = threading.Timer(120, endless.kill)  # a sample.py that prints nothing before the end: EOF, not a hang
    deadline.start()
    try:
        assert endless.stdout.readline() == b"--- sample 1/1 ---\n"
        assert endless.stdout.read(40).startswith(b"def")  # the tokens are shown as they are drawn
        endless.send_signal(signal.SIGINT)
        assert endless.wait(timeout=60) == 130
    finally:
        deadline.cancel()
        endless.kill()

    refused = run(["train.py", *TINY, "trainer.max_iters=60", f"paths.log_dir={tmp_path}/logs", "run_name=r"],
                  tmp_path, check=False)
    assert refused.returncode == 2 and "trainer.resume=auto" in refused.stderr
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"  # nothing overwritten

    exported = run(["export.py", f"checkpoint={run_dir}", "format=hf", f"out={tmp_path}/hf"], tmp_path)
    assert "exported iteration 60" in exported.stdout
    assert (tmp_path / "hf/config.json").is_file() and (tmp_path / "hf/model.safetensors").is_file()
    vocabulary = json.loads((run_dir / "checkpoints/last/state.json").read_text())["tokenizer"]
    assert json.loads((tmp_path / "hf/config.json").read_text())["mlxgpt_tokenizer"] == vocabulary
    again = run(["export.py", f"checkpoint={run_dir}", f"out={tmp_path}/hf"], tmp_path, check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1  # refuses to overwrite, one line
    reexport = run(["export.py", f"checkpoint={tmp_path}/hf", f"out={tmp_path}/hf2"], tmp_path, check=False)
    assert reexport.returncode == 2 and "is already a Hugging Face GPT-2 model" in reexport.stderr
    from_export = run(["sample.py", f"checkpoint={tmp_path}/hf", "prompt=def", "num_samples=2", "max_new_tokens=30",
                       "seed=3"], tmp_path).stdout
    assert from_export == out  # the export (of the best checkpoint, as sample.py's default) samples as its run
    for into in (run_dir, run_dir / "checkpoints/last"):  # overwrite=true never replaces a run's own files
        before = {p: p.read_bytes() for p in into.rglob("*") if p.is_file()}
        refused = run(["export.py", f"checkpoint={run_dir}", f"out={into}", "overwrite=true"], tmp_path, check=False)
        assert refused.returncode == 2 and "is an mlxgpt run or checkpoint directory" in refused.stderr
        assert {p: p.read_bytes() for p in into.rglob("*") if p.is_file()} == before
    hf_init = run(["train.py", *TINY, f"init_from={tmp_path}/hf", "trainer.eval_only=true",
                   f"paths.log_dir={tmp_path}/logs", "run_name=hf"], tmp_path)
    assert "eval only" in hf_init.stdout and "-character vocabulary of" in hf_init.stdout

    ev = run(["train.py", *TINY, f"init_from={run_dir}", "trainer.eval_only=true", f"paths.log_dir={tmp_path}/logs",
              "run_name=e"], tmp_path)
    assert "eval only" in ev.stdout
    result = json.loads((tmp_path / "logs/runs/e/result.json").read_text())
    assert result["val/loss"] == pytest.approx(evals[-1]["val/loss"], abs=0.1)
    from_hf = json.loads((tmp_path / "logs/runs/hf/result.json").read_text())
    assert from_hf["val/loss"] == pytest.approx(result["val/loss"], abs=1e-4)  # export -> import keeps the model

    # fine-tune on a text with some of the checkpoint's characters: tokenized with the checkpoint's vocabulary
    (tmp_path / "code.txt").write_text("def add(a, b):\n    return a + b\n\n" * 300)
    ft = run(["train.py", *TINY, f"init_from={run_dir}", "data=text", f"data.path={tmp_path}/code.txt",
              "trainer.max_iters=10", "trainer.eval_interval=10", f"paths.log_dir={tmp_path}/logs", "run_name=ft"],
             tmp_path)
    assert "character vocabulary of" in ft.stdout
    ft_dir = tmp_path / "logs/runs/ft"
    assert json.loads((ft_dir / "checkpoints/last/state.json").read_text())["tokenizer"] == vocabulary
    assert records(ft_dir, "eval")[0]["val/loss"] < math.log(len(vocabulary["chars"])) - 0.5  # ids kept their meaning
    out = run(["sample.py", f"checkpoint={ft_dir}", "prompt=def", "num_samples=1", "max_new_tokens=10"], tmp_path)
    assert "\ndef" in out.stdout


def test_export_of_a_padded_vocabulary_holds_the_tokens_rows_only(tmp_path):
    """model.vocab_size above the tokenizer's: transformers gets no extra ids to sample, as sample.py draws none."""
    (tmp_path / "abc.txt").write_text("abc cab\n" * 200)
    run(["train.py", *TINY, "data=text", f"data.path={tmp_path}/abc.txt", "model.vocab_size=64", "trainer.max_iters=2",
         "trainer.eval_interval=2", f"paths.log_dir={tmp_path}/logs", "run_name=p"], tmp_path)
    run(["export.py", f"checkpoint={tmp_path}/logs/runs/p", f"out={tmp_path}/hf"], tmp_path)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    assert config["vocab_size"] == len(config["mlxgpt_tokenizer"]["chars"]) == 5


def test_early_stopping_ends_the_run_when_the_val_loss_stops_improving(tmp_path):
    """No evaluation improves on the first by min_delta=100: the run stops after `patience` of them."""
    proc = run(["train.py", *TINY, "trainer.max_iters=100", "trainer.eval_interval=10",
                "callbacks=[default,early_stopping]", "callbacks.early_stopping.patience=2",
                "callbacks.early_stopping.min_delta=100", f"paths.log_dir={tmp_path}/logs", "run_name=es"], tmp_path)
    run_dir = tmp_path / "logs/runs/es"
    assert [e["iter"] for e in records(run_dir, "eval")] == [0, 10, 20]
    assert "early stopping at iteration 20: val loss has not improved for 2 evaluations" in proc.stdout
    assert json.loads((run_dir / "result.json").read_text())["iter"] == 20
    assert json.loads((run_dir / "checkpoints/last/state.json").read_text())["iter"] == 20
    assert "sample after 20 iterations" in proc.stdout  # the run ends as usual


@pytest.mark.parametrize("streams", [1, 2])
def test_kill_then_resume_reproduces_the_uninterrupted_losses(tmp_path, streams):
    common = [*TINY, "model.dropout=0.1", "trainer.max_iters=150", "trainer.eval_interval=10",
              "trainer.gradient_accumulation_steps=2", f"trainer.cpu_streams={streams}",
              f"paths.log_dir={tmp_path}/logs",
              "callbacks.sample.every_evals=1", "callbacks.sample.max_new_tokens=8"]
    run(["train.py", *common, "run_name=full"], tmp_path)

    env = {**os.environ, "MLXGPT_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *common, "run_name=killed"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "logs/runs/killed/checkpoints/iter_0000030"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(json.loads(ln)["iter"] for ln in
                    (tmp_path / "logs/runs/killed/metrics.jsonl").read_text().splitlines() if ln.endswith("}"))
    assert killed_at < 150

    run(["train.py", *common, "run_name=killed", "trainer.resume=auto"], tmp_path)
    full, resumed = losses(tmp_path / "logs/runs/full"), losses(tmp_path / "logs/runs/killed")
    assert len(full) == len(resumed) and resumed == full
    samples = [(tmp_path / f"logs/runs/{name}/samples.jsonl").read_text() for name in ("full", "killed")]
    assert samples[1] == samples[0] and samples[0].count("\n") == 16  # evals at 0, 10, ..., 150; the one at 150 is the end's
