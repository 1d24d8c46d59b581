"""GELU, softmax and cross-entropy that avoid MLX's CPU transcendentals (`tanh`, `exp`: slow scalar loops).

On the CPU each is the same math as its MLX counterpart to float32 tolerance, built from multiplies, adds and bit
shifts that `mx.compile` turns into one loop, with a custom VJP where the default one would call the slow kernels.
On GPUs they are MLX's own fused kernels.
"""
from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from mlxgpt.device import on_cpu

# tanh(z) = z * P(z^2) / Q(z^2) on [-9, 9], beyond which tanh is +-1 in float32: a rational least-squares fit
# (float32 error < 4e-7).
TANH_P = (0.9999999795, 0.1338102043, 0.003495581624, 2.060896469e-05, 1.335448551e-08)
TANH_Q = (1.0, 0.4671433603, 0.02587695827, 0.0003285623687, 7.776488612e-07)
GELU_C = math.sqrt(2 / math.pi)
# exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two for an exact
# reduction); exp(r) by its Taylor series to r^7 (truncation < 6e-9 relative).
LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06
EXP_TAYLOR = tuple(1 / math.factorial(i) for i in range(8))
CHUNK_ELEMENTS = 2**20  # per block of the CPU softmax and cross-entropy (4 MB): few temporaries for large inputs
EXP_MIN = -88.0  # exp below this is under float32's smallest normal: flushed to 0, as exp(-inf)
ROUND_MAGIC = 1.5 * 2**23  # (t + M) - M rounds |t| < 2^22 to an integer: float adds instead of a libm floor call


def tanh_rational(z: mx.array) -> mx.array:
    """tanh from multiplies, adds and one divide (see TANH_P)."""
    z = mx.clip(z, -9.0, 9.0)
    s = z * z
    p, q = TANH_P[-1], TANH_Q[-1]
    for c in TANH_P[-2::-1]:
        p = p * s + c
    for c in TANH_Q[-2::-1]:
        q = q * s + c
    return z * p / q


def exp_poly(x: mx.array) -> mx.array:
    """exp of float32 x <= 88 (relative error ~1e-7), 0 below EXP_MIN; 2^n is built in the exponent bits."""
    x = mx.maximum(x, EXP_MIN)
    n = (x * (1 / math.log(2)) + ROUND_MAGIC) - ROUND_MAGIC
    r = x - n * LN2_HI - n * LN2_LO
    p = EXP_TAYLOR[-1]
    for c in EXP_TAYLOR[-2::-1]:
        p = p * r + c
    two_n = mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)  # n = -127 gives the bits of 0.0
    return p * two_n


@partial(mx.compile, shapeless=True)
def _gelu_tanh(x: mx.array) -> mx.array:
    return 0.5 * x * (1 + tanh_rational(GELU_C * (x + 0.044715 * x * x * x)))


@partial(mx.compile, shapeless=True)
def _gelu_tanh_slope(x: mx.array) -> mx.array:
    """d/dx = (1 + t) / 2 + x (1 - t^2) u' / 2 for t = tanh(u), with 1 - t^2 = 0 where tanh saturates (|u| >= 9)."""
    u = GELU_C * (x + 0.044715 * x * x * x)
    t = tanh_rational(u)
    du = GELU_C * (1 + 3 * 0.044715 * x * x)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du * (mx.abs(u) < 9.0)


@mx.custom_function
def _gelu_tanh_cpu(x: mx.array) -> mx.array:
    """Value and slope are each one compiled kernel (a custom vjp is not fused into the surrounding graph)."""
    return _gelu_tanh(x)


@_gelu_tanh_cpu.vjp
def _gelu_tanh_vjp(x, cotangent, output):
    return cotangent * _gelu_tanh_slope(x)


def gelu_tanh(x: mx.array) -> mx.array:
    """GELU, tanh approximation: GPT-2's "gelu_new" (= nn.gelu_approx)."""
    return _gelu_tanh_cpu(x) if on_cpu() else nn.gelu_approx(x)


def _by_rows(fn, *arrays: mx.array) -> mx.array:
    """fn over blocks of about CHUNK_ELEMENTS elements of rows (arrays (N, V)), concatenated."""
    rows = max(1, CHUNK_ELEMENTS // arrays[0].shape[-1])
    n = arrays[0].shape[0]
    if n <= rows:
        return fn(*arrays)
    return mx.concatenate([fn(*(a[i:i + rows] for a in arrays)) for i in range(0, n, rows)])


@mx.compile
def _softmax(x: mx.array) -> mx.array:
    e = exp_poly(x - mx.max(x, axis=-1, keepdims=True))
    return e / mx.sum(e, axis=-1, keepdims=True)


@mx.compile
def _softmax_vjp(p: mx.array, cotangent: mx.array) -> mx.array:
    return p * (cotangent - mx.sum(cotangent * p, axis=-1, keepdims=True))


@mx.custom_function
def _softmax_cpu(x: mx.array) -> mx.array:
    return _by_rows(_softmax, x)


@_softmax_cpu.vjp
def _softmax_backward(x, cotangent, output):
    return _by_rows(_softmax_vjp, output, cotangent)


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis of float32 x (= mx.softmax); -inf entries get exactly 0."""
    return _softmax_cpu(x.reshape(-1, x.shape[-1])).reshape(x.shape) if on_cpu() else mx.softmax(x, axis=-1)


def _logsumexp(x: mx.array) -> mx.array:
    m = mx.max(x, axis=-1, keepdims=True)
    return m + mx.log(mx.sum(exp_poly(x - m), axis=-1, keepdims=True))


@mx.compile
def _cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    return (_logsumexp(logits) - mx.take_along_axis(logits, targets[..., None], axis=-1))[..., 0]


@mx.compile
def _cross_entropy_grad(logits: mx.array, targets: mx.array, cotangent: mx.array) -> mx.array:
    """cotangent * (softmax(logits) - one_hot(targets))."""
    target_mask = mx.arange(logits.shape[-1]) == targets[..., None]
    return cotangent[..., None] * (exp_poly(logits - _logsumexp(logits)) - target_mask)


@mx.custom_function
def _cross_entropy_cpu(logits: mx.array, targets: mx.array) -> mx.array:
    return _by_rows(_cross_entropy, logits, targets)


@_cross_entropy_cpu.vjp
def _cross_entropy_backward(primals, cotangent, output):
    logits, targets = primals
    return _by_rows(_cross_entropy_grad, logits, targets, cotangent), mx.zeros_like(targets)


def cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """-log softmax(logits)[target] per position of float32 logits (..., V) and integer targets (...)."""
    if not on_cpu():
        return nn.losses.cross_entropy(logits, targets)
    return _cross_entropy_cpu(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).reshape(targets.shape)
