"""Config composition: every group composes, typos and bad values are rejected with one line."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mlxgpt.config import TYPED_GROUPS, Config, SampleConfig, register_configs, validate, validate_sample
from mlxgpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
register_configs()


def make(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "optimizer", "schedule", "logger", "experiment"])
def test_every_option_composes_and_validates(group):
    for option in options(group):
        extra = ["data.path=x.txt"] if option == "text" else ["data.hf_path=parquet"] if option == "hf" else []
        cfg = make(f"{group}={option}", *extra)
        validate(cfg)


def test_defaults_are_the_embedded_offline_job():
    cfg = make()
    assert cfg.data.source == "pydoc" and cfg.model.name == "mini" and cfg.logger.mode == "auto"
    assert set(cfg.callbacks) >= {"checkpoint", "evaluation", "metrics", "progress", "throughput", "sample"}


def test_schema_defaults_are_the_composed_defaults():
    """The schema's defaults describe `python train.py`: no key of a typed group has another default there."""
    composed = OmegaConf.to_container(make(), resolve=False)
    schema = OmegaConf.to_container(OmegaConf.structured(Config), resolve=False)
    for group in TYPED_GROUPS:
        assert schema[group] == composed[group], group


def test_experiment_shakespeare_char_cpu_is_nanogpt_readme_cpu_config():
    cfg = make("experiment=shakespeare_char_cpu")
    m, t = cfg.model, cfg.trainer
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (t.batch_size, t.max_iters, cfg.schedule.decay_iters, t.eval_iters) == (12, 2000, 2000, 20)


def test_experiment_shakespeare_char_is_nanogpt_train_shakespeare_char():
    cfg = make("experiment=shakespeare_char")
    m, t, o, s = cfg.model, cfg.trainer, cfg.optimizer, cfg.schedule
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (6, 6, 384, 256, 0.2, False)
    assert (t.batch_size, t.gradient_accumulation_steps, t.max_iters, t.eval_interval, t.eval_iters) == (64, 1, 5000,
                                                                                                         250, 200)
    assert (o.name, o.lr, list(o.betas), o.weight_decay) == ("adamw", 1e-3, [0.9, 0.99], 0.1)
    assert (s.name, s.warmup_iters, s.decay_iters, s.min_lr_ratio) == ("cosine", 100, 5000, 0.1)  # min_lr 1e-4
    assert (cfg.data.name, cfg.data.tokenizer) == ("shakespeare_char", "char")


def test_experiment_finetune_shakespeare_is_nanogpt_finetune_shakespeare():
    cfg = make("experiment=finetune_shakespeare")
    t = cfg.trainer
    assert cfg.init_from == "gpt2-xl" and cfg.model.name == "gpt2_xl" and cfg.data.tokenizer == "gpt2"
    assert (t.batch_size, t.gradient_accumulation_steps, t.max_iters, t.eval_interval, t.eval_iters) == (1, 32, 20, 5,
                                                                                                         40)
    assert (cfg.optimizer.lr, cfg.schedule.name, cfg.schedule.warmup_iters) == (3e-5, "constant", 0)  # no lr decay
    assert cfg.callbacks.checkpoint.save_last is False  # always_save_checkpoint = False


def test_default_optimizer_is_nanogpt_adamw():
    o = make().optimizer
    assert (o.name, o.lr, list(o.betas), o.eps, o.weight_decay) == ("adamw", 6e-4, [0.9, 0.95], 1e-8, 0.1)


def test_gpt2_small_openwebtext_composes():
    cfg = make("model=gpt2_small", "data=openwebtext")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (12, 768, 1024)
    assert cfg.data.tokenizer == "gpt2" and cfg.data.val_size == 0.0005 and cfg.data.split_seed == 2357


@pytest.mark.parametrize("override, needle", [
    ("optimizer.lr=-1", "optimizer.lr"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("model.n_embd=130", "model.n_embd"),
    ("trainer.batch_size=0", "trainer.batch_size"),
    ("trainer.block_size=1000", "trainer.block_size"),
    ("trainer.eval_iters=0", "trainer.eval_iters"),
    ("model.dropout=1.5", "model.dropout"),
    ("schedule.name=exp", "schedule.name"),
    ("trainer.device=tpu", "trainer.device"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.seed=18446744073709551616", "trainer.seed"),
    ("data.split_seed=-1", "data.split_seed"),
    ("optimizer.lr=inf", "optimizer.lr"),
    ("data.chars=abca", "data.chars"),
    ("data.chars=", "data.chars"),
    ("optimizer.betas=${model.n_layer}", "optimizer.betas"),  # an interpolation the list type does not check
    ("optimizer.weight_decay=inf", "optimizer.weight_decay"),  # was a NaN loss at iteration 1
    ("optimizer.eps=inf", "optimizer.eps"),
    ("schedule.warmup_iters=99999999999999999999999", "schedule.warmup_iters"),  # was a traceback inside MLX
    ("trainer.max_iters=99999999999999999999999", "trainer.max_iters"),
    ("optimizer=sgd optimizer.momentum=nan", "optimizer.momentum"),
    ("optimizer=sgd optimizer.nesterov=true optimizer.momentum=0", "optimizer.nesterov"),  # was MLX's ValueError
    ("data.max_documents=0", "data.max_documents"),
    ("run_name=../other", "run_name"),  # was a run outside paths.log_dir/runs/
    ("run_name=", "run_name"),  # was a run in paths.log_dir/runs/ itself
    ("run_name=a/../..", "run_name"),
    (f"run_name={'x' * 256}", "run_name"),  # was an OSError traceback (and the checks skipped)
    ("paths.log_dir=", "MLXGPT_LOG_DIR"),  # MLXGPT_LOG_DIR= was a run in /runs/
    ("paths.data_dir=", "MLXGPT_DATA_DIR"),
    ("+init_fromm=x", "unknown config key 'init_fromm' (added with +)"),  # a top-level typo was ignored
])
def test_out_of_range_values_raise_one_line_user_error(override, needle):
    with pytest.raises(UserError) as err:
        validate(make(*override.split()))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("option", ["num_samples=0", "max_new_tokens=-1", "temperature=-0.5", "top_k=0",
                                    "seed=-1", "device=tpu", "which=worst"])
def test_sample_options_out_of_range_raise_one_line_user_error(option):
    key, _, value = option.partition("=")
    cfg = OmegaConf.structured(SampleConfig(checkpoint="run"))
    cfg[key] = value
    with pytest.raises(UserError) as err:
        validate_sample(cfg)
    assert str(err.value).startswith(f"invalid {option}: ") and "python sample.py" in str(err.value)
    assert "\n" not in str(err.value)


def test_schema_is_typed():
    cfg = make("optimizer.lr=3e-4", "model.n_layer=3")
    assert isinstance(cfg.optimizer.lr, float) and isinstance(cfg.model.n_layer, int)



def test_text_data_without_path_says_how_to_fix():
    with pytest.raises(UserError, match="data.path="):
        validate(make("data=text"))


@pytest.mark.slow
@pytest.mark.parametrize("override, expected", [
    ("model=gpt2_smal", "no option 'gpt2_smal' in config group 'model'; available: baby"),
    ("optimizer.lr=-1", "invalid optimizer.lr=-1.0: must be > 0"),
    ("optimizer.lrr=1", "unknown config key 'optimizer.lrr'"),
    ("trainer.batch_size=big", "invalid value for 'trainer.batch_size'"),
    ("+trainer.max_iter=5", "unknown config key 'trainer.max_iter' (added with +)"),
    ("sweep=lr_depth", "sweep=lr_depth declares a sweep: run it with -m"),
    ("-m --cfg=job", "drop one of them"),
    ("data.path=~/x/*.txt", "cannot parse the override 'data.path=~/x/*.txt'"),
    ("callbacks=[default,early_stop]", "no option 'early_stop' in config group 'callbacks'; available: checkpoint,"),
    ("callbacks.early_stopping.patience=2", "the callback 'early_stopping' is not in this run's callbacks, so "
     "'callbacks.early_stopping' cannot be set; add it: callbacks=[default,early_stopping]"),
    ("callbacks.early_stoping.patience=2", "unknown config key 'callbacks.early_stoping'"),
    ("~callbacks.progres", "cannot delete 'callbacks.progres': no such key; check the spelling"),
    ("run_name=../escape", "invalid run_name=../escape: must be a relative path without empty, '.' or '..' parts"),
    # was a run on the embedded text, the file never read
    ("data.path=notes.txt", "data.path=notes.txt is not read by data=pydoc (the embedded text); for your own text use "
     "data=text data.path=notes.txt"),
    # nanoGPT's flags: were argparse's usage and 'unrecognized arguments'
    ("--max_iters=20", "unknown option --max_iters=20: settings are key=value overrides without dashes, e.g. "
     "`python train.py trainer.max_iters=20`; `--help` lists them"),
    ("--batch_size 4", "unknown option --batch_size: settings are key=value overrides without dashes, e.g. "
     "`python train.py trainer.batch_size=...`"),
    ("--learning_rate=1e-3", "unknown option --learning_rate=1e-3: settings are key=value overrides without dashes; "
     "`--help` lists them"),
    ("model nano", "'model' is not an override: write key=value with no spaces around '=', e.g. model=..."),  # was
    # advice to quote special characters
    ("trainer.resume=true", "invalid trainer.resume=true: must be auto (continue this run), a run or checkpoint "
     "directory, or null"),  # was 'checkpoint True does not exist'
    ("optimizer.lr=1e-4,1e-3", "optimizer.lr=1e-4,1e-3 is read as several values: add -m to run one job for each "
     "(python train.py -m optimizer.lr=1e-4,1e-3)"),  # was Hydra's numbered list, run together on one line
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, override, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *override.split(), f"paths.log_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expected", [
    ("sample.py", "checkpoint=run temprature=0.5", "unknown config key 'temprature'"),
    ("sample.py", "checkpoint=run num_samples=1.5", "invalid value for 'num_samples'"),
    ("sample.py", "checkpoint=run top_k=0", "invalid top_k=0: must be >= 1 or null"),
    ("export.py", "checkpoint=run out=hf formt=hf", "unknown config key 'formt'"),
    ("export.py", "checkpoint=run out=hf format=onnx", "invalid format=onnx: the supported format is hf"),
    ("export.py", "checkpoint=run out=hf which=worst", "invalid which=worst: must be best or last"),
    ("export.py", "out=hf", "checkpoint= is required"),
    ("sample.py", "checkpoint=run +temprature=0.5", "unknown config key 'temprature' (added with +)"),  # was ignored
    ("export.py", "checkpoint=run out=hf +overwrit=true", "unknown config key 'overwrit' (added with +)"),
    ("sample.py", "checkpoint=run model=nano", "sample.py has no config group 'model'; `--help` lists its options"),
    ("sample.py", "checkpoint=run --num_samples=2", "unknown option --num_samples=2: settings are key=value "
     "overrides without dashes, e.g. `python sample.py num_samples=2`"),
    ("sample.py", "checkpoint=run prompt=Hello,world", "prompt=Hello,world is read as several values: quote one value "
     "that holds commas: 'prompt=\"Hello,world\"'"),  # was advice to add --multirun
])
def test_sample_and_export_reject_bad_options_in_one_line(tmp_path, script, args, expected):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args.split()], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], \
        proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("script, shown, not_shown", [
    ("train.py", ["train.py: train a GPT", "model: baby, gpt2_large", "optimizer:\n  name: adamw"], ["checkpoint: ???"]),
    ("sample.py", ["sample.py: generate text", "checkpoint: ???", "top_k: 200"], ["model: baby", "optimizer"]),
    ("export.py", ["export.py: write a run's weights", "out: ???", "overwrite: false"], ["model: baby", "optimizer"]),
])
def test_help_shows_each_scripts_own_options(script, shown, not_shown):
    """--help: what the script is for, an example, and its own options (train.py: also its config groups)."""
    proc = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(s in proc.stdout for s in shown) and not any(s in proc.stdout for s in not_shown), proc.stdout


@pytest.mark.parametrize("script", ["train.py", "sample.py", "export.py"])
def test_version_names_mlxgpt_and_the_packages_results_depend_on(script):
    proc = subprocess.run([sys.executable, str(ROOT / script), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # Hydra's own printed "Hydra 1.3.x" only
    assert re.fullmatch(r"mlxgpt \S+ \(mlx \S+, hydra-core \S+, numpy \S+, python \S+\)\n", proc.stdout), proc.stdout


@pytest.mark.parametrize("flag", ["--help", "--cfg=job"])
def test_a_reader_that_stops_early_ends_help_quietly(flag):
    """`train.py --help | head`: no error when the reader closes the pipe (was 'invalid override (BrokenPipeError)')."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), flag], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    assert proc.stderr.read() == "" and proc.wait(timeout=120) == 1


@pytest.mark.slow
def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job", "model=nano", "optimizer.lr=3e-4"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = OmegaConf.create(proc.stdout)
    assert (printed.model.name, printed.model.n_embd, printed.optimizer.lr, printed.data.source) == ("nano", 64, 3e-4,
                                                                                                     "pydoc")
    assert list(tmp_path.iterdir()) == []  # no run directory, no prepared data


def test_make_help_lists_every_documented_target():
    """`make` / `make help`: each target with a `## ` comment in the Makefile, and what it does."""
    make = (ROOT / "Makefile").read_text()
    documented = [line.split(":")[0] for line in make.splitlines() if "## " in line and not line.startswith("\t")]
    proc = subprocess.run(["make", "-s", "-C", str(ROOT)], capture_output=True, text=True, timeout=60)
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert proc.returncode == 0 and listed == documented and "install" in listed and "test" in listed, proc.stdout
