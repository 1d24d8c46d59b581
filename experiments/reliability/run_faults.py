"""Fault injection against real `train.py` runs: kill -9 at random moments and in the middle of checkpoint writes,
SIGINT / SIGTERM (once, twice, to one rank of two, and during an evaluation), a failing disk, a flipped bit in a
checkpoint, a diverging loss, a second run on the same directory, and a data prepare killed half-way. Every trial
ends with `trainer.resume=auto` (or a rerun) and compares the loss sequence with the uninterrupted run's; the table
counts what was lost.

    python experiments/reliability/run_faults.py [--trials 1.0] [--work /tmp/mlxgpt-faults] > results.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ITERS = 60
# A 0.4M-parameter model with a checkpoint every 2 iterations: checkpoint writes take a good part of the wall time.
CONFIG = ["model=nano", "model.n_layer=2", "model.n_embd=128", "model.n_head=4", "model.block_size=32",
          "model.dropout=0.1", "trainer.batch_size=2", "trainer.eval_iters=1", "trainer.eval_interval=2",
          "trainer.log_interval=3", "schedule.warmup_iters=5", f"schedule.decay_iters={ITERS}", "logger=none",
          "callbacks.sample.max_new_tokens=0", "callbacks.checkpoint.keep=1"]
FILE_SIZE_LIMIT = 2_500_000  # bytes: model.safetensors (~1.7 MB) fits, optimizer.safetensors (~3.4 MB) does not
# Evaluations of ~0.4 s (200 batches per split), over 90% of the wall time: a signal timed for one lands in it.
LONG_EVAL = ("trainer.eval_iters=200", "trainer.max_iters=20")
KEEP_TWO = "callbacks.checkpoint.keep=2"  # the newest checkpoint always has an older one to fall back to


def checkpoint_dir_iter(name: str) -> int:
    """The iteration of a checkpoint directory's name (iter_0000040, or iter_0000040-1 for a second save of it)."""
    return int(name.removeprefix("iter_").split("-")[0])


class Lab:
    """Runs train.py in a work directory and judges the outcome of each trial."""

    def __init__(self, work: Path, seed: int):
        self.work, self.rng, self.n = work, np.random.default_rng(seed), 0
        self.env = {**os.environ, "MLXGPT_DATA_DIR": str(work / "data")}
        self.rows: dict[str, dict] = defaultdict(lambda: defaultdict(int))

    def command(self, name: str, *extra: str, ranks: int = 1) -> list[str]:
        """train.py's command line; with ranks > 1, under mlx.launch (ring backend over loopback)."""
        iters = [] if any(e.startswith("trainer.max_iters=") for e in extra) else [f"trainer.max_iters={ITERS}"]
        launch = [str(Path(sys.executable).parent / "mlx.launch"), "-n", str(ranks), "--backend", "ring",
                  "--starting-port", str(int(self.rng.integers(20000, 60000))), "--"] if ranks > 1 else []
        return [*launch, sys.executable, str(ROOT / "train.py"), *CONFIG, *iters, f"paths.log_dir={self.work}/logs",
                f"run_name={name}", *extra]

    def run(self, name: str, *extra: str, ranks: int = 1, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, *extra, ranks=ranks), cwd=self.work, env=self.env,
                              capture_output=True, text=True, timeout=600, **kw)

    def start(self, name: str, *extra: str, ranks: int = 1) -> subprocess.Popen:
        err = open(self.work / f"{name}.err", "a")
        return subprocess.Popen(self.command(name, *extra, ranks=ranks), cwd=self.work, env=self.env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)

    def new_name(self, kind: str) -> str:
        self.n += 1
        return f"{kind}_{self.n}"

    def ckpts(self, name: str) -> Path:
        return self.work / "logs" / "runs" / name / "checkpoints"

    def losses(self, name: str) -> list[tuple]:
        path = self.work / "logs" / "runs" / name / "metrics.jsonl"
        return [(r["event"], r["iter"], r["train/loss"], r.get("val/loss"))
                for r in map(json.loads, path.read_text().splitlines())]

    def reference(self, *extra: str, ranks: int = 1) -> list[tuple]:
        """The loss sequence of an uninterrupted run with these settings."""
        name = self.new_name("reference")
        assert self.run(name, *extra, ranks=ranks).returncode == 0
        return self.losses(name)

    def writing(self, name: str) -> bool:
        try:
            return any(n.startswith(".iter_") and n.endswith(".tmp") for n in os.listdir(self.ckpts(name)))
        except FileNotFoundError:
            return False

    def links_whole(self, name: str) -> bool:
        """`last`/`best`, where present, point at complete checkpoints (all files, loadable headers)."""
        from mlxgpt import checkpoint
        from mlxgpt.errors import UserError

        for link in ("last", "best"):
            path = self.ckpts(name) / link
            if path.is_symlink():
                try:
                    checkpoint.verify(path.resolve())
                except UserError:
                    return False
        return True

    def latest_iter(self, name: str) -> int:
        from mlxgpt import checkpoint

        latest = checkpoint.latest(self.ckpts(name))
        return json.loads((latest / "state.json").read_text())["iter"] if latest else 0

    def saved_iter(self, name: str) -> int:
        """The iteration `last` points at (-1 before the first save), from the link alone: safe to poll a live run."""
        try:
            return checkpoint_dir_iter(os.readlink(self.ckpts(name) / "last"))
        except FileNotFoundError:
            return -1

    def snapshot(self, name: str) -> str:
        """A digest of every file of the run dir (a link: its target) but the lock and the job log, which every
        attempt writes: equal snapshots mean nothing was written."""
        run_dir, digest = self.ckpts(name).parent, hashlib.sha256()
        for path in sorted(run_dir.rglob("*")):
            if (path.is_symlink() or path.is_file()) and path.name not in (".lock", "train.log"):
                digest.update(str(path.relative_to(run_dir)).encode() + b"\0")
                digest.update(os.readlink(path).encode() if path.is_symlink() else path.read_bytes())
        return digest.hexdigest()

    def logged_iter(self, name: str) -> int:
        path = self.work / "logs" / "runs" / name / "metrics.jsonl"
        if not path.exists():
            return 0
        iters = [json.loads(ln)["iter"] for ln in path.read_text().splitlines() if ln.endswith("}")]
        return max(iters, default=0)

    def wait(self, proc: subprocess.Popen, condition, timeout: float = 300) -> bool:
        deadline = time.time() + timeout
        while not condition():
            if proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(0.001)
        return True

    def finish_and_judge(self, row: dict, name: str, reference: list, *extra: str) -> None:
        """Resume to the end; count a loss when the links broke, the resume failed or the losses differ."""
        row["trials"] += 1
        row["broken last/best"] += not self.links_whole(name)
        self.resume_and_compare(row, name, reference, "trainer.resume=auto", *extra)

    def resume_and_compare(self, row: dict, name: str, reference: list, *extra: str, ranks: int = 1) -> None:
        """Continue the run to the end; count a loss when it failed or its losses differ from the reference."""
        done = self.run(name, *extra, ranks=ranks)
        row["resume failed"] += done.returncode != 0 or "exited with code" in done.stderr  # mlx.launch exits 0
        row["losses differ"] += done.returncode == 0 and self.losses(name) != reference


def kill_at_random(lab: Lab, reference: list, trials: int) -> None:
    """Three kill -9 per trial, each (1 in 4) at a random moment of the startup (imports, config, data, model,
    compile) or (3 in 4) at a random training step plus 0-100 ms (a step, an evaluation or a write); then resume."""
    row = lab.rows["kill -9 at a random moment (3 kills per trial)"]
    for _ in range(trials):
        name = lab.new_name("kill")
        for _ in range(3):
            seen = lab.logged_iter(name)  # records past the checkpoint, from the killed attempt: to be redone
            proc = lab.start(name, "trainer.resume=auto")
            if lab.rng.random() < 0.25 or seen >= ITERS - 1:
                time.sleep(lab.rng.uniform(0.0, 2.0))
            else:
                target = int(lab.rng.integers(seen + 1, ITERS))
                lab.wait(proc, lambda: lab.logged_iter(name) >= target)
                time.sleep(lab.rng.uniform(0.0, 0.1))
            if proc.poll() is not None:
                row["ended before the kill"] += 1
                continue
            kill9(lab, proc, name, row)
            row["steps redone"] += max(0, lab.logged_iter(name) - lab.latest_iter(name))
        lab.finish_and_judge(row, name, reference)


def kill9(lab: Lab, proc, name: str, row: dict) -> None:
    """SIGKILL the run and count the kill, and whether it landed during a checkpoint write."""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    row["kills"] += 1
    row["kills mid-write"] += lab.writing(name)


def kill_mid_write(lab: Lab, reference: list, trials: int) -> None:
    """kill -9 the moment a temporary checkpoint directory appears (the k-th write of the run), then resume."""
    row = lab.rows["kill -9 during a checkpoint write"]
    for _ in range(trials):
        name = lab.new_name("killw")
        proc = lab.start(name)
        skip = int(lab.rng.integers(0, ITERS // 2 - 1))  # writes to let pass first
        for _ in range(skip):
            lab.wait(proc, lambda: lab.writing(name))
            lab.wait(proc, lambda: not lab.writing(name))
        lab.wait(proc, lambda: lab.writing(name))
        if proc.poll() is not None:
            row["ended before the kill"] += 1
        kill9(lab, proc, name, row)
        lab.finish_and_judge(row, name, reference)


def signal_once(lab: Lab, reference: list, trials: int, signum: int) -> None:
    """One SIGINT/SIGTERM at a random moment of training: exit 128+n, a checkpoint of the stopped step, resume."""
    row = lab.rows[f"{signal.Signals(signum).name} once"]
    for _ in range(trials):
        name = lab.new_name(signal.Signals(signum).name.lower())
        proc = lab.start(name)
        lab.wait(proc, lambda: (lab.ckpts(name) / "last").exists())
        time.sleep(lab.rng.uniform(0.0, 1.0))
        send_and_count(lab, row, name, proc, signum)
        lab.finish_and_judge(row, name, reference)


def send_and_count(lab: Lab, row: dict, name: str, proc, signum: int) -> bool:
    """Send one stop signal; count in `row` how the run ended and the steps its resume redoes. Whether it stopped."""
    proc.send_signal(signum)
    code = proc.wait()
    row["exit 128+n"] += code == 128 + signum
    row["ended before the signal"] += code == 0
    if code == 128 + signum:
        row["steps redone"] += max(0, lab.logged_iter(name) - lab.latest_iter(name))  # the stopped step is saved
    return code == 128 + signum


def sigterm_one_rank(lab: Lab, reference: list, trials: int) -> None:
    """A 2-rank run (mlx.launch): SIGTERM to one rank alone (rank 0 or 1) at a random moment, as from `kill` or a
    scheduler. Both ranks must stop at the same iteration, within 2 minutes, then the run resumes on 2 ranks."""
    row = lab.rows["SIGTERM to one rank of 2 (mlx.launch)"]
    for k in range(trials):
        name = lab.new_name("onerank")
        proc = lab.start(name, ranks=2)
        lab.wait(proc, lambda: (lab.ckpts(name) / "last").exists())
        time.sleep(lab.rng.uniform(0.0, 1.0))
        ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(sorted(ranks, key=int)[k % 2]), signal.SIGTERM)  # the ranks start in order: the lower pid is 0
        try:
            proc.wait(timeout=120)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        row["hung"] += hung
        err = (lab.work / f"{name}.err").read_text()
        row["ended before the signal"] += "exited with code" not in err
        row["both ranks stopped (exit 143)"] += all(f"rank {r} exited with code 143" in err for r in (0, 1))
        row["steps redone"] += max(0, lab.logged_iter(name) - lab.latest_iter(name))
        row["trials"] += 1
        row["broken last/best"] += not lab.links_whole(name)
        lab.resume_and_compare(row, name, reference, "trainer.resume=auto", ranks=2)


def sigint_twice(lab: Lab, reference: list, trials: int) -> None:
    """SIGINT, then a second one as soon as the first is acknowledged: the process ends at once."""
    row = lab.rows["SIGINT twice"]
    for _ in range(trials):
        name = lab.new_name("twice")
        proc = lab.start(name)
        lab.wait(proc, lambda: (lab.ckpts(name) / "last").exists())
        time.sleep(lab.rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGINT)
        lab.wait(proc, lambda: "SIGINT received" in (lab.work / f"{name}.err").read_text())
        proc.send_signal(signal.SIGINT)
        code = proc.wait()
        row["killed by the 2nd"] += code == -signal.SIGINT
        row["ended before the signal"] += code == 0
        row["kills mid-write"] += lab.writing(name)
        lab.finish_and_judge(row, name, reference)


def signal_in_evaluation(lab: Lab, reference: list, trials: int) -> None:
    """SIGINT or SIGTERM in the middle of the evaluation at a random iteration (the last one too): the run stops at
    once, its checkpoint marks the evaluation pending (eval_pending), and the resumed run does it first."""
    from mlxgpt import checkpoint

    row = lab.rows["SIGINT/SIGTERM during an evaluation (eval_iters=200)"]
    for k in range(trials):
        signum = (signal.SIGINT, signal.SIGTERM)[k % 2]
        name = lab.new_name("evalsig")
        proc = lab.start(name, *LONG_EVAL)
        at = 2 * int(lab.rng.integers(2, 11))  # evaluations every 2 iterations, up to max_iters=20
        # `last` moves to the checkpoint of the evaluation before; two steps (~20 ms) later the one at `at` (~0.4 s)
        lab.wait(proc, lambda: lab.saved_iter(name) >= at - 2)
        time.sleep(lab.rng.uniform(0.1, 0.3))
        if send_and_count(lab, row, name, proc, signum):
            state = checkpoint.read_state(checkpoint.latest(lab.ckpts(name)))
            row["stopped mid-evaluation"] += state.get("eval_pending", False)
        lab.finish_and_judge(row, name, reference, *LONG_EVAL)


def flip_a_bit(path: Path, rng: np.random.Generator) -> None:
    """Flip a random bit of a random byte of a safetensors file's array data (past its header): the size stays."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[int(rng.integers(header_end, len(data)))] ^= 1 << int(rng.integers(0, 8))
    path.write_bytes(data)


def bit_flip(lab: Lab, reference: list, trials: int) -> None:
    """A run stopped (SIGINT) at a random step; one bit of its last checkpoint's model or optimizer file flipped.
    Resuming is refused in one line naming an older checkpoint, with nothing written; resuming from that one works."""
    from mlxgpt import checkpoint

    row = lab.rows["a bit flipped in the last checkpoint (keep=2)"]
    for k in range(trials):
        name = lab.new_name("flip")
        proc = lab.start(name, KEEP_TWO)
        at = int(lab.rng.integers(4, ITERS - 4))
        lab.wait(proc, lambda: lab.saved_iter(name) >= at)
        proc.send_signal(signal.SIGINT)
        row["ended before the signal"] += proc.wait() == 0
        flipped = checkpoint.latest(lab.ckpts(name)) / checkpoint.ARRAY_FILES[k % 2]
        flip_a_bit(flipped, lab.rng)
        before = lab.snapshot(name)
        refused = lab.run(name, "trainer.resume=auto", KEEP_TWO)
        lines = refused.stderr.strip().splitlines()
        row["trials"] += 1
        row["exit 2, one line"] += (refused.returncode == 2 and "Traceback" not in refused.stderr
                                    and [ln for ln in lines if ln.startswith("error: ")] == lines[-1:]
                                    and f"{flipped} is corrupt: its contents differ" in lines[-1])
        row["wrote nothing"] += lab.snapshot(name) == before
        older = lines[-1].partition("use another checkpoint, e.g. ")[2] if lines else ""
        if not older:
            row["resume failed"] += 1
            continue
        row["steps redone"] += lab.logged_iter(name) - checkpoint_dir_iter(Path(older).name)
        lab.resume_and_compare(row, name, reference, f"trainer.resume={older}", KEEP_TWO)


def limit_file_size() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


def disk_full(lab: Lab, reference: list, trials: int) -> None:
    """A run stopped (SIGINT) at a random step, resumed where files can hold at most 2.5 MB: its next checkpoint
    write fails half-way. Then resumed with space again."""
    row = lab.rows["write fails during a save (file size limit)"]
    for _ in range(trials):
        name = lab.new_name("disk")
        proc = lab.start(name)
        lab.wait(proc, lambda: (lab.ckpts(name) / "last").exists())
        proc.send_signal(signal.SIGINT)
        proc.wait()
        before = lab.latest_iter(name)
        failed = subprocess.run(lab.command(name, "trainer.resume=auto"), cwd=lab.work, env=lab.env,
                                capture_output=True, text=True, preexec_fn=limit_file_size)
        last = failed.stderr.strip().splitlines()[-1]
        row["exit 2, one line"] += failed.returncode == 2 and "cannot write the checkpoint" in last
        row["previous kept"] += lab.latest_iter(name) == before and "Traceback" not in failed.stderr
        lab.finish_and_judge(row, name, reference)


def diverging(lab: Lab, trials: int) -> None:
    """Resume a healthy run with optimizer.lr=1e30: NaN two steps later; stop/skip keep the last good checkpoint."""
    for on_nan in ("stop", "skip"):
        row = lab.rows[f"loss goes NaN (on_nan={on_nan})"]
        for _ in range(trials):
            name = lab.new_name(f"nan_{on_nan}")
            assert lab.run(name, "trainer.max_iters=10").returncode == 0
            before = lab.latest_iter(name)
            proc = lab.run(name, "trainer.resume=auto", "optimizer.lr=1e30", f"trainer.on_nan={on_nan}")
            row["trials"] += 1
            row["exit 2, one line"] += proc.returncode == 2 and "non-finite" in proc.stderr.strip().splitlines()[-1]
            row["broken last/best"] += not lab.links_whole(name)
            row["last good kept"] += lab.latest_iter(name) == before


def second_run(lab: Lab, reference: list, trials: int) -> None:
    """A second run on a directory in use is refused (nothing written); after kill -9 of the first, its lock is
    taken over by the resume."""
    row = lab.rows["second run on a directory in use"]
    for _ in range(trials):
        name = lab.new_name("lock")
        first = lab.start(name)
        lab.wait(first, lambda: (lab.ckpts(name) / "last").exists())
        first.send_signal(signal.SIGSTOP)
        hydra_config = (lab.ckpts(name).parent / ".hydra" / "config.yaml").read_bytes()
        second = lab.run(name, "trainer.resume=auto", "trainer.eval_iters=2")
        row["refused"] += second.returncode == 2 and "is in use by pid" in second.stderr
        row["wrote nothing"] += (lab.ckpts(name).parent / ".hydra" / "config.yaml").read_bytes() == hydra_config
        first.send_signal(signal.SIGKILL)
        first.wait()
        lab.finish_and_judge(row, name, reference)


PREPARE = """
import sys, mlxgpt
from omegaconf import OmegaConf
from mlxgpt.config import DataConfig
from mlxgpt.data import prepare
print(prepare(OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "big", "source": "text", "path": sys.argv[1],
                                                                  "cache_dir": sys.argv[2]})))
"""


def prepare_killed(lab: Lab, trials: int) -> None:
    """Data prepare of a ~20 MB text killed at a random moment, then rerun: the same files as an uninterrupted one."""
    from mlxgpt.data.sources import pydoc_text

    row = lab.rows["data prepare killed, then rerun"]
    text = lab.work / "big.txt"
    if not text.exists():
        text.write_text(pydoc_text() * 40)

    def prepare(cache: Path, **kw):
        return subprocess.Popen([sys.executable, "-c", PREPARE, str(text), str(cache)], cwd=lab.work, env=lab.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw)

    def digest(directory: Path) -> str:
        files = sorted(p for p in directory.iterdir() if p.suffix in (".bin", ".json") and not p.name.startswith("."))
        return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()

    start = time.time()
    clean = Path(prepare(lab.work / "prep_clean").communicate()[0].strip())
    duration, expected = time.time() - start, digest(clean)
    for k in range(trials):
        cache = lab.work / f"prep_{k}"
        proc = prepare(cache)
        time.sleep(lab.rng.uniform(0.2, duration))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        row["kills"] += 1
        rerun = prepare(cache).communicate()[0].strip()
        row["trials"] += 1
        row["files differ"] += digest(Path(rerun)) != expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mlxgpt-faults"))
    parser.add_argument("--trials", type=float, default=1.0, help="scale the number of trials of every scenario")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT / "src"))
    import mlxgpt  # noqa: F401  (fast BLAS before mlx.core)

    lab = Lab(args.work, args.seed)
    n = lambda k: max(1, round(k * args.trials))  # noqa: E731
    start = time.time()
    reference = lab.reference()
    kill_at_random(lab, reference, n(10))
    kill_mid_write(lab, reference, n(10))
    signal_once(lab, reference, n(8), signal.SIGINT)
    signal_once(lab, reference, n(4), signal.SIGTERM)
    sigint_twice(lab, reference, n(6))
    sigterm_one_rank(lab, lab.reference(ranks=2), n(6))
    signal_in_evaluation(lab, lab.reference(*LONG_EVAL), n(6))
    disk_full(lab, reference, n(3))
    bit_flip(lab, reference, n(6))
    diverging(lab, n(2))
    second_run(lab, reference, n(3))
    prepare_killed(lab, n(5))

    columns = ["trials", "kills", "kills mid-write", "exit 128+n", "killed by the 2nd", "both ranks stopped (exit 143)",
               "hung", "stopped mid-evaluation",
               "exit 2, one line", "refused", "wrote nothing", "previous kept", "last good kept",
               "ended before the kill", "ended before the signal", "steps redone", "broken last/best", "resume failed",
               "losses differ", "files differ"]
    used = [c for c in columns if any(c in row for row in lab.rows.values())]
    print(f"| scenario | {' | '.join(used)} |\n|---|{'---|' * len(used)}")
    for scenario, row in lab.rows.items():
        print(f"| {scenario} | {' | '.join(str(row.get(c, '')) for c in used)} |")
    print(f"\n{sum(r['trials'] for r in lab.rows.values())} trials in {time.time() - start:.0f} s "
          f"({os.cpu_count()} cores, mlxgpt {ROOT})")


if __name__ == "__main__":
    main()
