"""The CPU fast path's math: GELU, exp, softmax and cross-entropy equal MLX's (or float64) to float32 tolerance, with
their gradients; dropout's hash mask drops the right share, reproducibly, the same in backward; glibc keeps freed
memory for reuse."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import math
import platform
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxgpt import fastmath
from mlxgpt.blas import is_linux_cpu_wheel
from mlxgpt.fastmath import cross_entropy, dropout, exp_poly, gelu_tanh, softmax


def test_fast_gelu_and_its_gradient_match_gpt2_gelu_in_float64():
    x = np.linspace(-30, 30, 200_001).astype(np.float32)
    x64 = x.astype(np.float64)
    u = math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3)
    t = np.tanh(u)
    slope = 0.5 * (1 + t) + 0.5 * x64 * (1 - t * t) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x64**2)
    value, grad = mx.vjp(gelu_tanh, [mx.array(x)], [mx.ones(x.shape)])
    np.testing.assert_allclose(np.array(value[0]), 0.5 * x64 * (1 + t), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.array(grad[0]), slope, atol=1e-5, rtol=0)
    assert mx.allclose(gelu_tanh(mx.array(x)), nn.gelu_approx(mx.array(x)), atol=2e-6)
    saturated = mx.array([1e4, -1e4])  # tanh is exactly +-1 there: slopes exactly 1 and 0
    assert mx.vjp(gelu_tanh, [saturated], [mx.ones((2,))])[1][0].tolist() == [1.0, 0.0]


def test_exp_is_within_two_ulp_of_float64_and_flushes_below_float32_normals():
    x = np.linspace(-87.3, 88.0, 2_000_001).astype(np.float32)
    ours = np.array(exp_poly(mx.array(x))).astype(np.float64)
    np.testing.assert_allclose(ours, np.exp(x.astype(np.float64)), rtol=2.4e-7, atol=0)
    assert np.array(exp_poly(mx.array([-88.5, -1000.0, -np.inf]))).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("chunk", [2**20, 100], ids=["one-block", "blocks-of-3-rows"])
def test_softmax_and_its_gradient_match_mlx_with_masked_entries_exactly_zero(chunk, monkeypatch):
    monkeypatch.setattr(fastmath, "CHUNK_ELEMENTS", chunk)
    mx.random.seed(0)
    x = 8 * mx.random.normal((3, 2, 33, 33))
    x = mx.where(mx.triu(mx.ones((33, 33)), k=1) > 0, -mx.inf, x)  # a causal mask
    assert mx.allclose(softmax(x), mx.softmax(x, axis=-1), atol=1e-7, rtol=1e-6)
    assert mx.array_equal(softmax(x) == 0, mx.softmax(x, axis=-1) == 0)
    cotangent = [mx.random.normal(x.shape)]
    ours = mx.vjp(softmax, [x], cotangent)[1][0]
    theirs = mx.vjp(lambda t: mx.softmax(t, axis=-1), [x], cotangent)[1][0]
    assert mx.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("chunk", [2**20, 1000], ids=["one-block", "blocks-of-9-rows"])
def test_cross_entropy_and_its_gradient_match_mlx(chunk, monkeypatch):
    monkeypatch.setattr(fastmath, "CHUNK_ELEMENTS", chunk)
    mx.random.seed(0)
    logits, targets = 6 * mx.random.normal((4, 9, 101)), mx.random.randint(0, 101, (4, 9))
    reference = lambda z: nn.losses.cross_entropy(z, targets, reduction="mean")  # noqa: E731
    ours = lambda z: cross_entropy(z, targets).mean()  # noqa: E731
    assert mx.allclose(ours(logits), reference(logits), rtol=1e-6)
    assert mx.allclose(mx.grad(ours)(logits), mx.grad(reference)(logits), atol=1e-8, rtol=1e-5)


@pytest.fixture
def cpu_device():
    """The CPU as MLX's default device (where fastmath's own kernels apply), restored afterwards."""
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(previous)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_cpu_dropout_drops_p_of_the_elements_reproducibly_with_the_same_mask_in_backward(p, cpu_device):
    x = mx.random.normal((1000, 1000))
    mx.random.seed(7)
    out, grad = mx.vjp(lambda t: dropout(t, p), [x], [mx.ones(x.shape)])
    out, grad = out[0], grad[0]
    kept = out != 0
    assert abs(kept.mean().item() - (1 - p)) < 0.003  # 6 standard deviations of 1e6 draws
    assert mx.allclose(mx.where(kept, out, 0), mx.where(kept, x / (1 - p), 0)).item()
    assert mx.array_equal(grad, kept / (1 - p)).item()  # backward multiplies by the forward's mask
    neighbours = (kept[:, 1:] & kept[:, :-1]).mean().item()  # independent neighbours: (1 - p)^2
    assert abs(neighbours - (1 - p) ** 2) < 0.004
    mx.random.seed(7)
    assert mx.array_equal(dropout(x, p), out).item()  # the same random state gives the same mask
    assert abs((dropout(x, p) != 0).astype(mx.float32) - kept).mean().item() > 2 * p * (1 - p) - 0.01  # a new one


PAGE_FAULTS = """import mlxgpt, resource, mlx.core as mx
faults = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = mx.ones((64, 1024, 1024)); mx.eval(a); del a  # 256 MB, allocated and freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(faults[-1])
"""


@pytest.mark.skipif(not (is_linux_cpu_wheel() and platform.libc_ver()[0] == "glibc"),
                    reason="the malloc tuning applies to MLX's Linux CPU wheel with glibc only")
@pytest.mark.parametrize("setting", ["keep", "default"])
def test_a_freed_array_is_reused_without_page_faults(setting):
    env = {"MLXGPT_MALLOC": setting, "PATH": "/usr/bin:/bin"}
    faults = int(subprocess.run([sys.executable, "-c", PAGE_FAULTS], env=env, capture_output=True, text=True,
                                check=True).stdout)
    pages = 256 * 1024 * 1024 // 4096
    assert faults < pages // 20 if setting == "keep" else faults > pages // 2


def test_an_unknown_malloc_setting_is_named_on_stderr():
    env = {"MLXGPT_MALLOC": "kep", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", "import mlxgpt"], env=env, capture_output=True, text=True, check=True)
    assert out.stderr.strip() == ("mlxgpt: MLXGPT_MALLOC='kep' is neither keep nor default; using keep "
                                  "(unset it or fix the value)")
