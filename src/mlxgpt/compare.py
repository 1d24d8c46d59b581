"""Compare runs from their directories alone (metrics.jsonl, .hydra/, result.json): a table sorted by best val
loss (Markdown + CSV), the val-loss curves of all runs, and a best-val-loss heatmap when two parameters vary."""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mlxgpt.cli import print_result, shown_path
from mlxgpt.config import shown_value
from mlxgpt.errors import UserError, make_dir

# where a run is kept, not what it does
IGNORED_KEYS = ("hydra.", "paths.", "run_name", "logger.mode", "trainer.resume")
COLORS, MARKERS = 10, "os^Dv<>pX*"  # a curve's colour (matplotlib's C0-C9) and marker: 100 runs tell apart
GRID_MAX_VALUES = 5  # a numeric parameter taking more values than this, most runs their own, is drawn as a scatter


@dataclass
class Run:
    """One run directory as compare sees it."""

    path: Path
    name: str
    overrides: dict[str, str]  # key -> value as given on the command line, in order
    config: Any  # the composed config (.hydra/config.yaml), interpolations unresolved
    status: str  # ok | failed | incomplete (no result.json: killed, or still running)
    error: str = ""
    choices: dict[str, str] = field(default_factory=dict)  # config group -> the option the run used (default or not)
    result: dict = field(default_factory=dict)  # result.json
    evals: list[dict] = field(default_factory=list)  # metrics.jsonl records with event=eval
    logs: list[dict] = field(default_factory=list)  # ... with event=train

    @property
    def best_val_loss(self) -> float:
        losses = [e["val/loss"] for e in self.evals if _finite(e.get("val/loss"))]
        if not losses and _finite(self.result.get("best/val_loss")):  # trainer.eval_only logs no evaluation
            losses = [self.result["best/val_loss"]]
        return min(losses, default=math.nan)

    @property
    def final_train_loss(self) -> float:
        return self.logs[-1]["train/loss"] if self.logs else math.nan

    @property
    def tok_per_s(self) -> float:
        """Median over log intervals (the first interval includes compilation)."""
        rates = [r["tok_per_s"] for r in self.logs if _finite(r.get("tok_per_s"))]
        return statistics.median(rates) if rates else math.nan

    @property
    def best_iter(self) -> int | None:
        """The iteration of the best val loss (None when no evaluation has one)."""
        scored = [e for e in self.evals if _finite(e.get("val/loss"))]
        return min(scored, key=lambda e: e["val/loss"])["iter"] if scored else None

    @property
    def train_seconds(self) -> float:
        """Seconds spent in training steps (evaluations and checkpoints left out), summed over the log intervals."""
        seconds, previous = 0.0, 0
        for r in self.logs:
            seconds += r["dt_s"] * (r["iter"] - previous) if _finite(r.get("dt_s")) else 0.0
            previous = r["iter"]
        return seconds if self.logs else math.nan

    @property
    def iters(self) -> int:
        return max((r["iter"] for r in self.logs + self.evals), default=0)

    def value(self, key: str) -> Any:
        """The run's value of a key, overridden or not: typed from the config when it is a scalar there, its raw text
        when it interpolates what only the run could resolve (`${now:...}`, an unset variable), a config group's
        option (`model` -> `mini`, also where the default was kept), else as given."""
        if key in self.choices:
            return self.choices[key]
        try:
            typed = OmegaConf.select(self.config, key, default=None)
        except OmegaConfBaseException:
            typed = _raw(self.config, key)
        return typed if isinstance(typed, (int, float, str, bool)) else self.overrides.get(key)


def _raw(config: Any, key: str) -> Any:
    """A config value as written, interpolations unresolved (None when the key is missing)."""
    node = OmegaConf.to_container(config, resolve=False)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run directories (those with .hydra/config.yaml) at or below each path, in natural order (2 before 10); none
    inside a hidden folder (a run's `.previous_attempt/` keeps copies of its records)."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"{p} is not a directory: pass run directories or a sweep directory")
        runs = (c.parent.parent for c in p.rglob(".hydra/config.yaml"))
        found += [r for r in runs if not any(part.startswith(".") for part in r.relative_to(p).parts)]
    return sorted(set(found), key=_natural)


def _natural(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def load_run(path: Path, root: Path) -> Run:
    """Read one run dir; `root` (the runs' common parent) makes its short name."""
    hydra_dir = path / ".hydra"
    overrides = {}
    if (hydra_dir / "overrides.yaml").is_file():
        for item in OmegaConf.to_container(OmegaConf.load(hydra_dir / "overrides.yaml")):  # as written
            key, _, value = str(item).lstrip("+~").partition("=")
            if not key.startswith(IGNORED_KEYS):
                overrides[key] = value
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").is_file() else {}
    records = []
    if (path / "metrics.jsonl").is_file():
        for line in (path / "metrics.jsonl").read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a kill
    name = str(path.relative_to(root)) if path != root else path.name
    return Run(path=path, name=name, overrides=overrides, config=OmegaConf.load(hydra_dir / "config.yaml"),
               status=result.get("status", "incomplete"), error=result.get("error") or "", choices=_choices(hydra_dir),
               result=result,
               evals=[r for r in records if r.get("event") == "eval"],
               logs=[r for r in records if r.get("event") == "train"])


def _choices(hydra_dir: Path) -> dict[str, str]:
    """The option of each config group the run composed (Hydra's runtime.choices in .hydra/hydra.yaml)."""
    if not (hydra_dir / "hydra.yaml").is_file():
        return {}
    choices = OmegaConf.select(OmegaConf.load(hydra_dir / "hydra.yaml"), "hydra.runtime.choices", default=None)
    return {k: v for k, v in OmegaConf.to_container(choices).items() if isinstance(v, str)} if choices else {}


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run at or below the given paths; UserError when there is none."""
    dirs = find_run_dirs(paths)
    if not dirs:
        raise UserError(f"no run directories (with .hydra/config.yaml) in {', '.join(map(str, paths))}; "
                        f"pass a sweep directory (logs/multiruns/<time>) or run directories (logs/runs/<name>)")
    root = Path(os.path.commonpath([d.resolve() for d in dirs]))
    return [load_run(d.resolve(), root) for d in dirs]


def _overridden(runs: list[Run]) -> list[str]:
    """The keys any of the runs overrides, in first-seen order."""
    return list(dict.fromkeys(k for r in runs for k in r.overrides))


def _given(runs: list[Run], key: str) -> str:
    """A key's value as the first run that overrides it wrote it."""
    return next(r.overrides[key] for r in runs if key in r.overrides)


def varying_keys(runs: list[Run]) -> list[str]:
    """Overridden keys whose typed value (3e-3 == 0.003) differs between runs (all of a lone run's), in first-seen
    order."""
    keys = _overridden(runs)
    if len(runs) == 1:
        return keys
    return [k for k in keys if len({r.value(k) for r in runs}) > 1]


def ranked(runs: list[Run]) -> list[Run]:
    """Completed runs by best val loss, then the others (failed, incomplete, no evaluation)."""
    def key(r: Run):
        ok = r.status == "ok" and _finite(r.best_val_loss)
        return (not ok, r.best_val_loss if ok else math.inf, r.name)

    return sorted(runs, key=key)


def best_run(runs: list[Run]) -> Run | None:
    """The completed run with the lowest val loss (None when no run completed an evaluation)."""
    top = ranked(runs)[:1]
    return top[0] if top and top[0].status == "ok" and _finite(top[0].best_val_loss) else None


def describe(run: Run, keys: list[str], exact: bool = False) -> str:
    """`optimizer.lr=3e-4,model.n_layer=6`: the run's values of the given keys (as given where overridden), floats to
    4 significant digits unless `exact`."""
    values = {k: run.overrides.get(k, run.value(k)) for k in keys}
    return ",".join(f"{k}={v if exact else shown_value(v)}" for k, v in values.items() if v is not None) or run.name


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "-"


def _duration(seconds: float) -> str:
    """`45 s`, `12.5 min`, `3.2 h` ('-' when unknown)."""
    if not _finite(seconds):
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _clip(text: str, width: int = 100) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def write_table(runs: list[Run], out_dir: Path, stem: str, note: str = "") -> tuple[Path, Path]:
    """`<stem>.md` and `<stem>.csv`: every run sorted by best val loss, the best one marked; `note`: a last line of the
    Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys, best = varying_keys(runs), best_run(runs)
    order = ranked(runs)
    md = ["| rank | run | overrides | best val loss | at iter | final train loss | tok/s | iters | params | train time "
          "| status |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for i, r in enumerate(order, 1):
        rank = f"{i} (best)" if r is best else str(i)
        status = f"failed: {_clip(r.error)}" if r.status == "failed" and r.error else r.status
        params = r.result.get("num_params")
        md.append(f"| {rank} | {r.name} | {describe(r, keys)} | {_fmt(r.best_val_loss)} | "
                  f"{'-' if r.best_iter is None else r.best_iter} | {_fmt(r.final_train_loss)} | "
                  f"{_fmt(r.tok_per_s, 0)} | {r.iters} | {'-' if params is None else f'{params / 1e6:.2f}M'} | "
                  f"{_duration(r.train_seconds)} | {status.replace('|', '/')} |")
        rows.append({"rank": i, "is_best": r is best, "run": r.name, "overrides": describe(r, keys, exact=True),
                     **{k: r.value(k) for k in keys}, "best_val_loss": r.best_val_loss, "best_iter": r.best_iter,
                     "final_train_loss": r.final_train_loss, "tok_per_s": r.tok_per_s, "iters": r.iters,
                     "num_params": params, "train_seconds": r.train_seconds, "status": r.status, "error": r.error,
                     "path": shown_path(r.path)})
    common = [f"{k}={shown_value(_given(runs, k))}" for k in _overridden(runs) if k not in keys]
    if common and len(runs) > 1:
        md += ["", f"Common to all runs: `{' '.join(common)}`"]
    if note:
        md += ["", note]
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    md_path, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
    _replace(md_path, "\n".join(md) + "\n")
    _replace(csv_path, table.getvalue())
    return md_path, csv_path


def _replace(path: Path, text: str) -> None:
    """Write a file whole (a reader, or a sweep's job writing it at the same time, never sees it half written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _wrap(label: str, width: int = 60) -> str:
    """A legend label on lines of about `width` characters, broken after the commas between its settings."""
    lines = [""]
    for part in re.split(r"(?<=,)", label):
        if lines[-1] and len(lines[-1] + part) > width:
            lines.append(part)
        else:
            lines[-1] += part
    return "\n".join(lines)


def _val_points(run: Run) -> list[tuple[int, float]]:
    """(iteration, val loss) of each of the run's evaluations."""
    return [(e["iter"], e["val/loss"]) for e in run.evals if _finite(e.get("val/loss"))]


def plot_val_curves(runs: list[Run], path: Path) -> Path:
    """Val loss against iterations, one line per run (failed runs dashed, the best one thick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    keys, best = varying_keys(runs), best_run(runs)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, r in enumerate(r for r in ranked(runs) if _val_points(r)):  # failed early: no val loss, no curve
        ax.plot(*zip(*_val_points(r)), color=f"C{i % COLORS}", marker=MARKERS[i // COLORS % len(MARKERS)], markersize=4,
                linestyle="-" if r.status == "ok" else "--", linewidth=2.8 if r is best else 1.2,
                label=_wrap(f"{describe(r, keys)} ({_fmt(r.best_val_loss)})"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations: 0, 5, 10, not 2.5
    ax.set_xlabel("iteration")
    ax.set_ylabel("val loss")
    ax.set_title(_wrap("validation loss" + (f" (best: {describe(best, keys)})" if best else ""), width=100))
    ax.grid(alpha=0.3)
    if ax.lines:  # else no run evaluated (all failed early): an empty plot, and no legend to draw
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run (best val loss)",
                  title_fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the image widens to the legend beside the plot, however long
    plt.close(fig)
    return path


def _values(runs: list[Run], key: str) -> list:
    """A parameter's distinct values over the runs that have one, sorted (numbers numerically)."""
    values = {r.value(key) for r in runs} - {None}
    try:
        return sorted(values)
    except TypeError:  # numbers and text mixed
        return sorted(values, key=str)


def is_continuous(runs: list[Run], key: str) -> bool:
    """Whether a parameter's values look drawn from a range (an Optuna search) rather than set on a grid: numbers,
    more than GRID_MAX_VALUES of them, most runs having their own. A grid of them would be mostly blank."""
    values = [v for v in (r.value(key) for r in runs) if v is not None]
    return _numeric(values) and len(set(values)) > max(GRID_MAX_VALUES, len(values) / 2)


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _log_scale(runs: list[Run], key: str) -> bool:
    """Positive numbers spanning more than 10x (a learning rate): an axis for them is logarithmic."""
    values = _values(runs, key)
    return bool(values) and all(isinstance(v, float) and v > 0 for v in values) and max(values) > 10 * min(values)


def _placed(run: Run | None, x_key: str, y_key: str) -> bool:
    """Whether a run has a value for both keys (a place on the plot)."""
    return run is not None and run.value(x_key) is not None and run.value(y_key) is not None


def _scatter_axis(runs: list[Run], key: str, axis: Any, set_scale: Any) -> None:
    """Numeric ticks to 4 significant digits: at 1, 2, 5 x 10^k on a log scale (a learning rate), at the values of a
    grid-like parameter (depth); text values are left as categories."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    values = _values(runs, key)
    if not _numeric(values):
        return
    if _log_scale(runs, key):
        set_scale("log")
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    elif not is_continuous(runs, key):
        axis.set_ticks(values)
    axis.set_major_formatter(FuncFormatter(lambda v, _: shown_value(float(v))))


def plot_heatmap(runs: list[Run], x_key: str, y_key: str, path: Path) -> Path:
    """Best val loss over a grid of two parameters; failed or missing cells are blank, the best cell boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs, ys, best = _values(runs, x_key), _values(runs, y_key), best_run(runs)
    grid = np.full((len(ys), len(xs)), np.nan)
    labels = [["" for _ in xs] for _ in ys]
    for r in runs:
        if _placed(r, x_key, y_key):
            i, j = ys.index(r.value(y_key)), xs.index(r.value(x_key))
            ok = r.status == "ok" and _finite(r.best_val_loss)
            grid[i, j] = r.best_val_loss if ok else np.nan
            labels[i][j] = _fmt(r.best_val_loss, 3) if ok else r.status
    fig, ax = plt.subplots(figsize=(1.6 * len(xs) + 2.5, 1.0 * len(ys) + 2))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn_r", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label="best val loss")
    for i in range(len(ys)):
        for j in range(len(xs)):
            dark = np.isfinite(grid[i, j]) and sum(image.to_rgba(grid[i, j])[:3]) < 1.2  # dark red or green ends
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=9, color="white" if dark else "black")
    if _placed(best, x_key, y_key):
        i, j = ys.index(best.value(y_key)), xs.index(best.value(x_key))
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.5))
    ax.set_xticks(range(len(xs)), [shown_value(x) for x in xs])
    ax.set_yticks(range(len(ys)), [shown_value(y) for y in ys])
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title("best val loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_scatter(runs: list[Run], x_key: str, y_key: str, path: Path) -> Path:
    """Best val loss as the colour of one point per run over two parameters (for values drawn from a range); runs
    without a val loss are grey crosses, the best one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placed = [r for r in runs if _placed(r, x_key, y_key)]
    done = [r for r in placed if r.status == "ok" and _finite(r.best_val_loss)]
    others = [r for r in placed if not (r.status == "ok" and _finite(r.best_val_loss))]
    best = best_run(runs)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    if done:
        points = ax.scatter([r.value(x_key) for r in done], [r.value(y_key) for r in done], s=60,
                            c=[r.best_val_loss for r in done], cmap="RdYlGn_r")
        fig.colorbar(points, ax=ax, label="best val loss")
        for r in done:
            ax.annotate(_fmt(r.best_val_loss, 3), (r.value(x_key), r.value(y_key)), textcoords="offset points",
                        xytext=(5, 5), fontsize=7)
    if others:
        ax.scatter([r.value(x_key) for r in others], [r.value(y_key) for r in others], marker="x", color="grey",
                   label="failed or incomplete")
        ax.legend(fontsize=8)
    if _placed(best, x_key, y_key):
        ax.scatter([best.value(x_key)], [best.value(y_key)], s=220, facecolors="none", edgecolors="black",
                   linewidths=2)
    for key, axis, set_scale in ((x_key, ax.xaxis, ax.set_xscale), (y_key, ax.yaxis, ax.set_yscale)):
        _scatter_axis(placed, key, axis, set_scale)
    ax.set_xlabel(x_key)
    ax.set_ylabel(y_key)
    ax.set_title("best val loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _output_dir(runs: list[Run], out_dir: str | Path | None) -> Path:
    """`out_dir`, else compare/ in the directory holding the runs (a sweep's: <sweep>/compare); UserError when it lies
    in a run directory (a run's record, which comparing it must leave as it was)."""
    out = Path(out_dir) if out_dir else Path(os.path.commonpath([r.path.parent for r in runs])) / "compare"
    run = next((d for d in (out.resolve(), *out.resolve().parents) if (d / ".hydra" / "config.yaml").is_file()), None)
    if run is not None:
        where = "is a run directory" if run == out.resolve() else f"is inside the run directory {shown_path(run)}"
        named = f"--out {out_dir}" if out_dir else f"the default output directory {shown_path(out)}"
        raise UserError(f"{named} {where} (a run's record, which compare leaves as it was); pick another --out")
    return out


def compare(paths: list[str | Path], out_dir: str | Path | None = None) -> list[Path]:
    """Write table.md, table.csv, val_loss.png (and heatmap.png for two varying parameters: a grid, or a scatter when
    one takes values from a range); returns the paths."""
    runs = load_runs(paths)
    out = _output_dir(runs, out_dir)
    make_dir(out, "--out", "pick a writable directory")
    written = [*write_table(runs, out, "table"), plot_val_curves(runs, out / "val_loss.png")]
    keys = varying_keys(runs)
    if len(runs) > 1 and len(keys) == 2:
        plot = plot_scatter if any(is_continuous(runs, k) for k in keys) else plot_heatmap
        written.append(plot(runs, keys[0], keys[1], out / "heatmap.png"))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare runs: table (Markdown + CSV) and plots from run dirs.")
    parser.add_argument("paths", nargs="+", help="a sweep directory, or run directories")
    parser.add_argument("--out", help="output directory, not in a run directory (default: compare/ in the directory "
                        "holding the runs: <sweep>/compare, logs/runs/compare)")
    args = parser.parse_args(argv)
    written = compare(args.paths, args.out)
    print_result(Path(written[0]).read_text() + "\nwrote " + ", ".join(map(str, written)))
