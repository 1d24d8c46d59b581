"""Memory preflight: a run that cannot fit on its device is refused in one line before anything is built or written,
one that may not fit is warned about; the estimate behind it is checked against MLX's measured peak."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import resource
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from hydra import compose, initialize_config_dir

from mlxgpt import device, memory
from mlxgpt.config import register_configs, validate
from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.task import build_trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=nano", "model.n_embd=32", "model.block_size=32", "trainer.batch_size=4", "trainer.device=cpu",
        "logger=none", "callbacks=[]"]


def config(*overrides: str, base: list[str] = TINY):
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [*base, *overrides])
    validate(cfg)
    return cfg


@pytest.fixture
def default_device():
    """Puts back the default device that build_trainer changes (trainer.device=cpu: the CPU on every machine)."""
    previous = mx.default_device()
    yield
    mx.set_default_device(previous)


@pytest.mark.parametrize("bias", [True, False])
def test_the_parameter_count_from_the_sizes_is_the_models(bias):
    sizes = dict(n_layer=3, n_embd=48, block_size=20, vocab_size=70)
    model = GPT(GPTConfig(n_head=4, bias=bias, **sizes))
    assert memory.num_params(bias=bias, **sizes) == model.num_params(non_embedding=False)


@pytest.mark.parametrize("extra", [[], ["model.n_layer=4", "trainer.grad_checkpoint=true"],
                                   ["model.vocab_size=50304", "model.block_size=128"],
                                   ["model.n_embd=256", "model.n_layer=4", "trainer.batch_size=2", "trainer.cpu_streams=2",
                                    "trainer.gradient_accumulation_steps=2"]],
                         ids=["plain", "grad_checkpoint", "gpt2_vocabulary", "streams_weights_dominate"])
def test_the_estimate_is_near_the_measured_peak_and_the_minimum_below_it(tmp_path, monkeypatch, default_device,
                                                                          extra):
    monkeypatch.setenv("MLXGPT_DATA_DIR", str(tmp_path / "data"))
    cfg = config("trainer.batch_size=16", "model.block_size=64", *extra)
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()  # what earlier tests in this process still hold
    trainer = build_trainer(cfg, tmp_path / "run")
    for iteration in range(3):
        trainer.iter = iteration
        trainer.train_step()
    peak = mx.get_peak_memory() - before
    cfg.model.vocab_size = trainer.model.config.vocab_size  # the corpus' characters: unknown before the data is read
    need = memory.memory_need(cfg, on_gpu=False)
    assert need.minimum < peak and 0.8 < need.estimate / peak < 1.6, (need, peak)


def on_a_16_gb_mac(monkeypatch) -> None:
    """check_fits as on a Mac with 16 GB of unified memory (Metal reports it all as the GPU's)."""
    monkeypatch.setattr(device, "memory_bytes", lambda chosen: 16 << 30)
    monkeypatch.setattr(device, "choose_device", lambda name: mx.gpu)


def test_gpt2_124m_with_the_readmes_batch_and_grad_checkpoint_fits_a_16_gb_mac_without_a_warning(monkeypatch):
    """README: B=8 x 1024 with trainer.grad_checkpoint=true peaked at 10.4 GB (experiments/bench)."""
    on_a_16_gb_mac(monkeypatch)
    cfg = config("model=gpt2_small", "data=openwebtext", "trainer.batch_size=8", "trainer.grad_checkpoint=true",
                 base=[])
    assert memory.check_fits(cfg) is None


def test_evaluating_init_from_weights_counts_no_optimizer_state(monkeypatch):
    """trainer.eval_only with init_from loads the weights alone (GPT-2 XL's 6.2 GB evaluates on a 16 GB Mac); with
    trainer.resume it loads the checkpoint's optimizer state too."""
    on_a_16_gb_mac(monkeypatch)
    evaluation = ["model=gpt2_xl", "data=shakespeare", "trainer.eval_only=true", "trainer.batch_size=1"]
    pretrained = config(*evaluation, "init_from=gpt2-xl", base=[])
    assert memory.check_fits(pretrained) is None
    resumed = config(*evaluation, "trainer.resume=logs/runs/xl", base=[])
    need = memory.memory_need(pretrained, on_gpu=True)
    assert need.model == 4 * need.params and memory.memory_need(resumed, on_gpu=True).model == 3 * need.model
    with pytest.raises(UserError, match=r"need at least 18.7 GB \(float32 weights, optimizer=adamw state\)"):
        memory.check_fits(resumed)


def test_gpt2_weights_too_large_to_fine_tune_name_the_largest_gpt2_that_fits(monkeypatch):
    """The README's fine-tune (gpt2-xl) on a 16 GB Mac: a smaller model.n_layer would not match the weights."""
    on_a_16_gb_mac(monkeypatch)
    with pytest.raises(UserError, match=r"need at least 31.2 GB .*; use smaller GPT-2 weights: init_from=gpt2-large "
                                        r"model=gpt2_large$"):
        memory.check_fits(config("experiment=finetune_shakespeare", base=[]))


def test_refused_only_when_sure_warned_when_it_may_not_fit(monkeypatch):
    cfg = config()
    need = memory.memory_need(cfg, on_gpu=False)

    def check(available: int, gpu: bool = False) -> str | None:
        monkeypatch.setattr(device, "memory_bytes", lambda chosen: available)
        monkeypatch.setattr(device, "choose_device", lambda name: mx.gpu if gpu else mx.cpu)
        return memory.check_fits(cfg)

    assert check(need.estimate) is None
    warning = check(need.estimate - 1)
    assert warning.startswith("mlxgpt: warning: this run may not fit in memory: about ") and "GB estimated" in warning
    assert "trainer.batch_size" in warning and "trainer.grad_checkpoint=true" in warning
    with pytest.raises(UserError, match=r"does not fit in memory: .* needs about .*, over 2x the CPU's"):
        check(need.estimate // 2 - 1)  # the CPU's estimate was measured: well over it is sure
    assert "may not fit" in check(need.estimate // 2 - 1, gpu=True)  # GPUs' kernels differ: a warning only
    with pytest.raises(UserError, match=r"does not fit in memory: .* needs? at least .*, more than the GPU's"):
        check(need.minimum - 1, gpu=True)


def _bounded_memory() -> None:
    """Run the child in 8 GB of address space on Linux: a check that let an absurd run through would fail fast there
    instead of filling this shared machine's memory."""
    if sys.platform == "linux":
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize("override, expected", [
    ("model.n_layer=100000000", "the model does not fit in memory: its 19,827,200.0M parameters need at least "),
    ("model.n_layer=1000000000000000", "the model does not fit in memory: its 198,272,000,000,000.0M parameters"),
    ("model.n_embd=1000000", "the model does not fit in memory: its 48,000,182.0M parameters need at least "),
    ("trainer.batch_size=100000000", "the batch does not fit in memory: a micro-batch of 100000000 x 128 tokens "
                                     "needs at least "),
])
def test_a_run_that_cannot_fit_is_refused_in_one_line_and_writes_nothing(tmp_path, override, expected):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), override, f"paths.log_dir={tmp_path}/logs",
                           "logger=none"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          preexec_fn=_bounded_memory)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), proc.stderr[-3000:]
    assert " GB " in lines[0] and "more than the " in lines[0] and "; " in lines[0]  # the need, the device's, the fix
    assert "Traceback" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []
