"""GELU, softmax, cross-entropy and dropout that avoid MLX's slow CPU kernels (`tanh`, `exp`, bernoulli's threefry).

On the CPU each is the same math as its MLX counterpart to float32 tolerance, built from multiplies, adds and bit
shifts that `mx.compile` turns into a few vectorized loops (shallow polynomials, chosen kernel cuts, no branches), with
a custom VJP where the default one would call the slow kernels.
On GPUs they are MLX's own fused kernels.
"""
from __future__ import annotations

import math
from functools import lru_cache

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
# The CPU dropout mask hashes (seed, element index): index * 2^32/golden ratio + seed, then C. Wellons' "lowbias32"
# integer mixer; the comparison with p is integer arithmetic too, so every loop vectorizes.
HASH_SPREAD, HASH_MIX = 0x9E3779B9, (0x7FEB352D, 0x846CA68B)


def fusion_break(*arrays: mx.array) -> tuple[mx.array, ...]:
    """The arrays as outputs of the kernels computing them (a reshape is never fused).

    mx.compile fuses element-wise ops at most 11 deep and cuts longer chains wherever the limit falls; a cut at a
    broadcast constant makes the next kernel a strided, unvectorized loop. These math functions cut in chosen places.
    """
    return tuple(a.reshape(-1).reshape(a.shape) for a in arrays)


def _poly(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """sum_i c_i x^i by Estrin's scheme: 2 log2(degree) ops deep instead of Horner's 2 degree (kernels stay whole)."""
    terms = [coefficients[i] + coefficients[i + 1] * x if i + 1 < len(coefficients) else coefficients[i]
             for i in range(0, len(coefficients), 2)]
    power = x * x
    while len(terms) > 1:
        terms = [terms[i] + power * terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
        power = power * power if len(terms) > 1 else power
    return terms[0]


def _tanh_arg(x: mx.array) -> mx.array:
    """u = sqrt(2/pi) (x + 0.044715 x^3) clipped to [-9, 9], beyond which tanh is +-1 in float32."""
    return mx.minimum(mx.maximum(x * (GELU_C + (GELU_C * 0.044715) * (x * x)), -9.0), 9.0)


def tanh_clipped(z: mx.array) -> mx.array:
    """tanh of z in [-9, 9] from multiplies, adds and one divide (see TANH_P)."""
    s = z * z
    return (z * _poly(s, TANH_P)) / _poly(s, TANH_Q)


def exp_poly(x: mx.array) -> mx.array:
    """exp of float32 x <= 88 (relative error ~1e-7), 0 below EXP_MIN; 2^n is built in the exponent bits."""
    x = mx.maximum(x, EXP_MIN)
    n = (x * (1 / math.log(2)) + ROUND_MAGIC) - ROUND_MAGIC
    r = (x - n * LN2_HI) - n * LN2_LO
    two_n = mx.view((n.astype(mx.int32) + 127) << 23, mx.float32)  # n = -127 gives the bits of 0.0
    return _poly(r, EXP_TAYLOR) * two_n


@mx.compile
def _gelu_tanh(x: mx.array) -> mx.array:
    (z,) = fusion_break(_tanh_arg(x))
    return x * (0.5 + 0.5 * tanh_clipped(z))


@mx.compile
def _gelu_tanh_grad(x: mx.array, cotangent: mx.array) -> mx.array:
    """cotangent * ((1 + t) / 2 + x (1 - t^2) u' / 2) for t = tanh(u); 1 - t^2 is 0 where tanh saturates (|u| >= 9)."""
    (z,) = fusion_break(_tanh_arg(x))
    (t,) = fusion_break(tanh_clipped(z))
    # 1 where |z| < 9 (iff |u| < 9; then 81 - z^2 >= 7.6e-6 absorbs 1e-30), 0 at +-9: branch-free, so the loop vectorizes
    margin = 81.0 - z * z
    unsaturated = margin / (margin + 1e-30)
    half_x_du = (0.5 * GELU_C) * x * (1 + (3 * 0.044715) * (x * x)) * unsaturated
    return cotangent * ((0.5 + 0.5 * t) + half_x_du * (1 - t * t))


@mx.custom_function
def _gelu_tanh_cpu(x: mx.array) -> mx.array:
    """Value and gradient are compiled functions of their own (a custom vjp is not fused into the surrounding graph)."""
    return _gelu_tanh(x)


@_gelu_tanh_cpu.vjp
def _gelu_tanh_vjp(x, cotangent, output):
    return _gelu_tanh_grad(x, cotangent)


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


def _keep_mask(seed: mx.array, shape: tuple[int, ...], p: float) -> mx.array:
    """1.0 for each element kept, 0.0 for each dropped (probability p): a hash of the seed and the element's index."""
    h = mx.arange(math.prod(shape), dtype=mx.uint32) * HASH_SPREAD + seed
    h = (h ^ (h >> 16)) * HASH_MIX[0]
    h = (h ^ (h >> 15)) * HASH_MIX[1]
    (h,) = fusion_break(h)
    bits = ((h ^ (h >> 16)) >> 1).astype(mx.int32)  # 31 uniform bits
    return (((bits - int(p * 2**31)) >> 31) + 1).astype(mx.float32).reshape(shape)  # sign of bits - p 2^31: 0 or -1


@lru_cache(maxsize=None)
def _hash_dropout(p: float):
    """Dropout with probability p as a function of (x, seed) whose backward recomputes the mask (nothing is saved)."""

    @mx.compile
    def apply(x: mx.array, seed: mx.array) -> mx.array:
        (seed,) = fusion_break(seed)  # one seed, not one per element
        return x * (_keep_mask(seed, x.shape, p) * (1 / (1 - p))).astype(x.dtype)

    @mx.custom_function
    def dropout_cpu(x: mx.array, seed: mx.array) -> mx.array:
        return apply(x, seed)

    @dropout_cpu.vjp
    def dropout_vjp(primals, cotangent, output):
        return apply(cotangent, primals[1]), mx.zeros_like(primals[1])

    return dropout_cpu


def dropout(x: mx.array, p: float, key: mx.array | None = None) -> mx.array:
    """Each element zeroed with probability p, the rest scaled by 1 / (1 - p) (= nn.Dropout in training).

    The mask comes from `key`, or from MLX's global random state (one draw per call); on the CPU it is a counter hash,
    ~3.5x faster than MLX's bernoulli there, on GPUs MLX's bernoulli.
    """
    if not on_cpu() or x.size >= 2**32:  # the hash counts elements in uint32
        return (mx.random.bernoulli(1 - p, x.shape, key=key) * x) * (1 / (1 - p))
    return _hash_dropout(p)(x, mx.random.randint(0, 2**31 - 1, (), key=key).astype(mx.uint32))
