"""Training speed side by side (`python bench.py`, `make bench`): our Trainer vs a bare compiled MLX step vs nanoGPT.

(a) `ours`: Trainer.fit as train.py builds it, callbacks included; timed in stretches of its real loop (Rounds).
(b) `bare`: a compiled value_and_grad + clip + AdamW step of the same model on a fixed batch (framework overhead).
(c) `nanogpt`: nanoGPT's PyTorch model and training step on the same config and device, when torch is installed and
    `--nanogpt DIR` (or NANOGPT_DIR) names a nanoGPT checkout: its model.py is imported from there, never copied.

The contenders take turns in rounds inside the timed loop, so all of them see the same machine load. Reported:
median ms/step after warm-up, tokens/s, MFU (model.flops_per_token against the device peak), peak memory, and the
first-step (compile) time. With `mlx.launch -n N` (ours and bare all-reduce; nanoGPT runs on rank 0 with the
global batch) tokens/s counts all ranks.
"""
from __future__ import annotations

import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import argparse
import contextlib
import hashlib
import importlib.util
import io
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxgpt import blas, device
from mlxgpt.callbacks.base import Callback
from mlxgpt.errors import UserError, make_dir
from mlxgpt.model import GPT
from mlxgpt.trainer import StreamSplit, mixed_precision_loss

PRESETS = {  # Hydra overrides; the data is the embedded default (offline), its vocabulary sizes the model
    # nanoGPT's README CPU run (4L/4H/128, T64) and shakespeare_char (6L/6H/384, T256), bias=False as its train.py
    "cpu": ["model=mini", "model.block_size=64", "model.bias=false", "trainer.batch_size=12",
            "trainer.cpu_streams=2"],  # its small kernels run faster as two concurrent halves (on a CPU only)
    "baby": ["model=baby", "model.bias=false", "trainer.batch_size=64"],
    "gpt2": ["model=gpt2_small", "model.vocab_size=50304", "trainer.batch_size=8"],  # GPT-2 124M, T1024
}
TORCH_DEVICE = {"cpu": "cpu", "cuda": "cuda", "metal": "mps"}  # MLX backend -> torch device
RUN_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MLXGPT_MALLOC", "MLXGPT_BLAS")  # recorded
QUIET_RUN = ["logger=none", "callbacks.evaluation.at_start=false", "trainer.eval_iters=1",
             "callbacks.sample.max_new_tokens=0"]


@dataclass
class Result:
    name: str
    tokens_per_step: int
    step_s: list[float] = field(default_factory=list)
    first_step_s: float | None = None
    peak_memory_gb: float | None = None
    note: str = ""

    @property
    def median_s(self) -> float:
        return statistics.median(self.step_s)


# ---------------------------------------------------------------------------------------------------- contenders
class BareStep:
    """The same model trained by a bare compiled step: value_and_grad, average over ranks, clip, AdamW."""

    def __init__(self, trainer):
        t, o = trainer.cfg.trainer, trainer.cfg.optimizer
        mx.random.seed(t.seed)
        self.model = GPT(trainer.model.config)
        self.model.grad_checkpoint = t.grad_checkpoint
        self.optimizer = optim.AdamW(o.lr, betas=list(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                     bias_correction=True)
        self.optimizer.init(self.model.trainable_parameters())
        group, accum, clip = trainer.group, trainer.accum, t.grad_clip
        loss = self.model.loss if t.dtype == "float32" else mixed_precision_loss(self.model, getattr(mx, t.dtype))
        loss_and_grad = nn.value_and_grad(self.model, loss)
        state = [self.model.state, self.optimizer.state, mx.random.state]

        def update(g):
            g = tree_map(lambda a: a / accum, g) if accum > 1 else g
            g = nn.average_gradients(g, group=group) if group.size() > 1 else g
            g, _ = optim.clip_grad_norm(g, clip) if clip > 0 else (g, None)
            self.optimizer.update(self.model, g)

        def fused(x, y):
            loss, g = loss_and_grad(x, y)
            update(g)
            return loss

        compile_ = partial(mx.compile, inputs=state, outputs=state)
        self.update, self.fused, self.accum = compile_(update), compile_(fused), accum
        self.streams = trainer.streams  # the trainer's CPU streams, mirrored
        self.grads = StreamSplit(loss_and_grad, self.streams, compile_) if self.streams > 1 else compile_(loss_and_grad)
        shape = (trainer.batch_size, trainer.block_size)
        self.x = mx.random.randint(0, self.model.config.vocab_size, shape)
        self.y = mx.random.randint(0, self.model.config.vocab_size, shape)
        self.result = Result("bare MLX step", trainer.tokens_per_iter)

    def step(self) -> None:
        if self.accum == 1 and self.streams == 1:
            mx.eval(self.fused(self.x, self.y), self.model.state, self.optimizer.state)
            return
        total = None
        for _ in range(self.accum):
            loss, g = self.grads(self.x, self.y)
            total = g if total is None else tree_map(mx.add, total, g)
            if self.accum > 1:
                mx.eval(loss, total)
        self.update(total)
        mx.eval(loss, self.model.state, self.optimizer.state)


class NanoGPTStep:
    """nanoGPT's model (imported from a checkout) and train.py's step: forward, backward, clip, AdamW, zero_grad."""

    def __init__(self, trainer, model_py: Path, torch_compile: str, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)

        spec = importlib.util.spec_from_file_location("nanogpt_model", model_py)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        t, o, c = trainer.cfg.trainer, trainer.cfg.optimizer, trainer.model.config
        self.device = TORCH_DEVICE[device.backend()]
        self.torch, self.accum, self.clip = torch, trainer.accum, t.grad_clip
        torch.manual_seed(t.seed)
        config = module.GPTConfig(block_size=trainer.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                  n_head=c.n_head, n_embd=c.n_embd, dropout=c.dropout, bias=c.bias)
        with contextlib.redirect_stdout(io.StringIO()):  # nanoGPT prints parameter counts
            self.model = module.GPT(config).to(self.device)
            self.optimizer = self.model.configure_optimizers(o.weight_decay, o.lr, tuple(o.betas), self.device)
        compiled = torch_compile == "on" or torch_compile == "auto" and self.device == "cuda"
        self.forward = torch.compile(self.model) if compiled else self.model
        dtype = t.dtype if self.device != "cpu" else "float32"
        self.autocast = (torch.amp.autocast(device_type=self.device, dtype=getattr(torch, dtype))
                         if dtype != "float32" else contextlib.nullcontext())
        batch = trainer.world * trainer.batch_size  # one process, the global batch
        self.x = torch.randint(c.vocab_size, (batch, trainer.block_size), device=self.device)
        self.y = torch.randint(c.vocab_size, (batch, trainer.block_size), device=self.device)
        self.result = Result("nanoGPT PyTorch step", trainer.tokens_per_iter,
                             note=f"{model_py}; torch {torch.__version__}, {self.device}, {dtype}, "
                                  f"torch.compile {'on' if compiled else 'off'}, {torch.get_num_threads()} threads")

    def step(self) -> None:
        with blas.all_cores():  # in this process torch's sgemm is the OpenBLAS that MLX uses: all cores for it
            self._step()

    def _step(self) -> None:
        for _ in range(self.accum):
            with self.autocast:
                _, loss = self.forward(self.x, self.y)
            (loss / self.accum).backward()
        if self.clip > 0:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def peak_memory_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 1e9 if self.device == "cuda" else None


class Rounds(Callback):
    """Times stretches of `round_steps` iterations of the real training loop (the steps, the loop's bookkeeping and
    all other callbacks), each step counted as the stretch's mean: the loop queues an update before the callbacks of
    the one before it, so single intervals are not single steps. After the warm-up, turns: a stretch of ours, then
    `round_steps` timed steps of each other contender. Each turn starts with one untimed step: a step right after
    another framework's runs slower (caches, the other's threads winding down)."""

    priority = -1  # first: the evaluation at the last iteration falls outside the timed stretches

    def __init__(self, warmup: int, round_steps: int, others: list, ours: Result):
        self.warmup, self.round_steps, self.others, self.ours = warmup, round_steps, others, ours
        self.start, self.steps, self.settling = 0.0, 0, False
        self.others_bytes = 0  # MLX memory the other contenders hold between their turns: not ours

    def on_train_start(self, trainer) -> None:
        mx.reset_peak_memory()

    def needs_state(self, trainer, iteration: int) -> bool:
        """Where a stretch starts or ends nothing of ours is queued ahead, so that a stretch holds the compute of
        exactly its own steps (and the others never run beside ours)."""
        return iteration <= self.warmup or self.settling or self.steps + 1 == self.round_steps

    def on_step_end(self, trainer, logs) -> None:
        if trainer.iter == 1:
            self.ours.first_step_s = logs["dt_s"]  # the step alone: the other callbacks' on_train_start came before
        if trainer.iter <= self.warmup or self.settling:
            self.settling = False
            self.start = time.perf_counter()
            return
        self.steps += 1
        if self.steps < self.round_steps and trainer.iter < trainer.max_iters:
            return
        n, self.steps = self.steps, 0
        self.ours.step_s += [(time.perf_counter() - self.start) / n] * n
        if self.ours.peak_memory_gb is None:
            self.ours.peak_memory_gb = (mx.get_peak_memory() - self.others_bytes) / 1e9
        for other in self.others:
            take_turn(other, n)
        self.settling = bool(self.others)
        self.start = time.perf_counter()


def take_turn(contender, steps: int) -> None:
    """One untimed step, then `steps` timed ones."""
    contender.step()
    for _ in range(steps):
        timed_step(contender)


def timed_step(contender) -> None:
    start = time.perf_counter()
    contender.step()
    contender.result.step_s.append(time.perf_counter() - start)


def warm_up(contender, steps: int, held: int) -> None:
    """The first step (compile) and warm-up steps; their times are not in the median. The peak memory counts what
    the process holds above `held` bytes (ours' model and data)."""
    mx.reset_peak_memory()
    start = time.perf_counter()
    contender.step()
    contender.result.first_step_s = time.perf_counter() - start
    for _ in range(steps - 1):
        contender.step()
    if isinstance(contender, NanoGPTStep):
        contender.result.peak_memory_gb = contender.peak_memory_gb()
    else:
        contender.result.peak_memory_gb = (mx.get_peak_memory() - held) / 1e9


# ------------------------------------------------------------------------------------------------------- running
def compose(conf_dir: Path, overrides: list[str]):
    """The run config exactly as `python train.py <overrides>` composes it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from mlxgpt.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir.resolve()), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    validate(cfg)
    return cfg


def find_nanogpt(path: str | None) -> Path | None:
    """model.py of a nanoGPT checkout (--nanogpt or NANOGPT_DIR), or None."""
    path = path or os.environ.get("NANOGPT_DIR")
    if not path:
        return None
    model_py = Path(path).expanduser() / "model.py"
    if not model_py.is_file():
        raise UserError(f"{model_py} does not exist; point --nanogpt (or NANOGPT_DIR) at a clone of "
                        "https://github.com/karpathy/nanoGPT")
    return model_py


def run(cfg, contenders: list[str], steps: int, warmup: int, round_steps: int, nanogpt: Path | None,
        torch_compile: str = "auto", torch_threads: int | None = None) -> tuple[list[Result], list[str], object]:
    """Build and time the contenders; returns their results, notes on skipped ones, and the trainer."""
    from mlxgpt.task import build_trainer

    ours = Result("ours (Trainer.fit)", 0)
    total_iters = warmup + steps + (steps - 1) // round_steps  # one untimed step to start each later turn
    cfg.trainer.max_iters = total_iters
    cfg.trainer.eval_interval = total_iters + 1  # no evaluation inside the timed loop
    cfg.schedule.warmup_iters = min(cfg.schedule.warmup_iters, total_iters - 1)  # the lr does not change a step's time
    others, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="mlxgpt-bench-") as run_dir, contextlib.redirect_stdout(io.StringIO()):
        rounds = Rounds(warmup, round_steps, others, ours)
        trainer = build_trainer(cfg, Path(run_dir), extra_callbacks=(rounds,))
        ours.tokens_per_step = trainer.tokens_per_iter
        held = mx.get_active_memory()
        if "bare" in contenders:
            others.append(BareStep(trainer))
        if "nanogpt" in contenders:
            reason = _nanogpt_missing(nanogpt)
            if reason:
                skipped.append(f"nanoGPT PyTorch step skipped: {reason}")
            elif trainer.is_main:
                others.append(NanoGPTStep(trainer, nanogpt, torch_compile, torch_threads))
        for other in others:
            warm_up(other, warmup, held)
        rounds.others_bytes = mx.get_active_memory() - held
        if "ours" in contenders:
            trainer.fit()
        else:
            for other in others:
                take_turn(other, steps)
    results = ([ours] if "ours" in contenders else []) + [o.result for o in others]
    return results, skipped, trainer


def _nanogpt_missing(model_py: Path | None) -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install torch)"
    if model_py is None:
        return "no nanoGPT checkout (--nanogpt DIR or NANOGPT_DIR=DIR, a clone of github.com/karpathy/nanoGPT)"
    import torch

    backend = device.backend()
    if backend == "cuda" and not torch.cuda.is_available() or backend == "metal" and not torch.backends.mps.is_available():
        return f"this torch build cannot use the {backend} device MLX uses (install torch for that device)"
    return None


# ------------------------------------------------------------------------------------------------------ reporting
def report(results: list[Result], skipped: list[str], trainer, peak_flops: float | None, title: str,
           command: str) -> str:
    """A Markdown report: the setting, one row per contender, and the ratios."""
    c, t = trainer.model.config, trainer.cfg.trainer
    flops_per_token = trainer.model.flops_per_token(trainer.block_size)
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    lines = [f"# {title}", "",
             f"- command: `{command}`",
             f"- date: {datetime.now():%Y-%m-%d %H:%M}; device: {device.describe()}; {os.cpu_count()} cores; "
             f"load average at the end: {load}; mlx {mx.__version__}; python {platform.python_version()}",
             f"- model: {c.n_layer}L/{c.n_head}H/{c.n_embd}C, vocab {c.vocab_size}, dropout {c.dropout}, "
             f"{trainer.model.num_params() / 1e6:.2f}M parameters; T={trainer.block_size}, B={trainer.batch_size} x "
             f"accumulation {trainer.accum} x ranks {trainer.world} = {trainer.tokens_per_iter} tokens/step; "
             f"dtype {t.dtype}; grad_checkpoint {t.grad_checkpoint}; CPU streams {trainer.streams} (ours and bare)",
             f"- MFU: {flops_per_token / 1e6:.2f} MFLOP/token (6N + attention) against {trainer.world} x one rank's peak = "
             + (f"{peak_flops / 1e12:.3f} TFLOP/s peak" + (" (measured fp32 sgemm)" if device.backend() == "cpu" else "")
                if peak_flops else "an unknown peak"),
             f"- median of {len(results[0].step_s) if results else 0} steps each after warm-up; contenders take turns",
             "", "| contender | ms/step | tokens/s | MFU | peak memory | first step (compile) | notes |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        tok_s = r.tokens_per_step / r.median_s
        mfu = f"{100 * flops_per_token * tok_s / peak_flops:.1f}%" if peak_flops else "n/a"
        mem = f"{r.peak_memory_gb:.2f} GB" if r.peak_memory_gb is not None else "n/a"
        first = f"{r.first_step_s:.2f} s" if r.first_step_s is not None else "n/a"
        lines.append(f"| {r.name} | {1000 * r.median_s:.1f} | {tok_s:,.0f} | {mfu} | {mem} | {first} | {r.note} |")
    by_name = {r.name.split(" ")[0]: r for r in results}
    lines.append("")
    for a, b, goal in (("ours", "bare", ">= 0.97"), ("ours", "nanoGPT", ">= 1.0"), ("bare", "nanoGPT", "")):
        if a in by_name and b in by_name:
            ratio = by_name[b].median_s / by_name[a].median_s
            lines.append(f"- tokens/s {a} / {b}: **{ratio:.2f}x**" + (f" (goal {goal})" if goal else ""))
    lines += [f"- {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def table_name(base: str, overrides: list[str]) -> str:
    """`base` and the overrides as a file name: `cpu-cpu-trainer.batch_size=1`; a hash stands in for a long tail."""
    name = "-".join([base, *(re.sub(r"[^A-Za-z0-9._=+-]", "_", o) for o in overrides)])
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name


def check_args(args) -> list[str]:
    """The contenders to time; a UserError for the first bad flag."""
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    unknown = sorted(set(contenders) - {"ours", "bare", "nanogpt"})
    if not contenders or unknown:
        problem = f"unknown {', '.join(unknown)}" if unknown else "no contender"
        raise UserError(f"--contenders {args.contenders!r}: {problem}; "
                        "give any subset of ours,bare,nanogpt, e.g. --contenders ours,bare")
    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup), ("--round", args.round_steps),
                        ("--torch-threads", args.torch_threads)):
        if value is not None and value < 1:
            raise UserError(f"{flag} {value}: must be >= 1; give a positive number")
    if args.name and ("/" in args.name or args.name in (".", "..")):
        raise UserError(f"--name {args.name!r} is not a file name; put the directory in --out")
    return contenders


def main(argv: list[str] | None = None, conf_dir: Path | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides as for train.py (after the preset's)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="cpu: nanoGPT README's CPU config; "
                        "baby: nanoGPT shakespeare_char; gpt2: GPT-2 124M (default: cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per contender (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compile included (default 3)")
    parser.add_argument("--round", type=int, default=10, dest="round_steps", help="timed steps per turn (default 10)")
    parser.add_argument("--contenders", default="ours,bare,nanogpt", help="comma-separated subset of ours,bare,nanogpt")
    parser.add_argument("--nanogpt", help="a nanoGPT checkout (default: $NANOGPT_DIR); without it nanoGPT is skipped")
    parser.add_argument("--torch-compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the nanoGPT model (auto: on CUDA only, as nanoGPT's CPU recipe)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads for nanoGPT (default: torch's)")
    parser.add_argument("--out", default="experiments/bench", help="directory for the Markdown table")
    parser.add_argument("--name", help="file name of the table (default: <preset>-<backend>[-<ranks>ranks], the "
                        "--torch-* flags given and the overrides, so a run with other settings does not replace the "
                        "preset's table)")
    args = parser.parse_args(argv)
    contenders = check_args(args)
    conf_dir = conf_dir or Path.cwd() / "conf"
    cfg = compose(conf_dir, PRESETS[args.preset] + QUIET_RUN + list(args.overrides))
    out = Path(args.out)
    make_dir(out, "--out", "pick a writable directory")  # now, not after a long run
    results, skipped, trainer = run(cfg, contenders, args.steps, args.warmup, min(args.round_steps, args.steps),
                                    find_nanogpt(args.nanogpt), args.torch_compile, args.torch_threads)
    if not trainer.is_main:
        return 0
    if not results:
        raise UserError(f"nothing to time ({'; '.join(skipped)}); fix that, or add ours or bare to --contenders")
    peak = max(device.peak_flops(cfg.trainer.dtype) or 0 for _ in range(3)) * trainer.world or None  # CPU: best of 3
    env = [f"{k}={os.environ[k]}" for k in RUN_ENV if k in os.environ]
    launch = [f"mlx.launch -n {trainer.world} --backend ring --"] if trainer.world > 1 else []
    command = " ".join([*env, *launch, "python bench.py", *(argv if argv is not None else sys.argv[1:])])
    ranks = f"-{trainer.world}ranks" if trainer.world > 1 else ""
    torch_flags = ([f"torch-compile={args.torch_compile}"] if args.torch_compile != "auto" else []) + \
                  ([f"torch-threads={args.torch_threads}"] if args.torch_threads else [])
    name = args.name or table_name(f"{args.preset}-{device.backend()}{ranks}", torch_flags + args.overrides)
    text = report(results, skipped, trainer, peak, f"Training speed: {name}", command)
    print(text)
    (out / f"{name}.md").write_text(text)
    print(f"written: {out / (name + '.md')}")
    return 0
