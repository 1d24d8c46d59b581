"""The GPT-2 / nanoGPT language model in MLX: config, layers, loss, FLOP count and sampling.

Parameter names follow the module tree and equal Hugging Face GPT-2 names without the
`transformer.` prefix (wte, wpe, h.{i}.attn.c_attn, ..., ln_f); the output head is tied to wte.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxgpt.device import on_cpu
from mlxgpt.errors import UserError
from mlxgpt.fastmath import cross_entropy, dropout, gelu_tanh, softmax


@dataclass
class GPTConfig:
    """Model sizes; the defaults are GPT-2 124M with the padded vocabulary."""

    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (eps 1e-5, as GPT-2)."""

    def __init__(self, dims: int, bias: bool):
        super().__init__()
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.layer_norm(x, self.weight, self.get("bias"), 1e-5)


class Dropout(nn.Module):
    """Zeroes elements with probability p in training, scaling the rest by 1 / (1 - p) (see fastmath.dropout); the
    mask is drawn from `key` when given (the same key, the same mask)."""

    def __init__(self, p: float):
        super().__init__()
        self._p = p

    def __call__(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        return dropout(x, self._p, key) if self.training and self._p > 0 else x


class KVCache:
    """Keys and values of the positions seen so far, for one attention layer."""

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    @property
    def offset(self) -> int:
        """Number of cached positions."""
        return 0 if self.keys is None else self.keys.shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, n_head, T, head_dim) keys/values; return all cached keys/values."""
        if self.keys is not None:
            keys = mx.concatenate([self.keys, keys], axis=2)
            values = mx.concatenate([self.values, values], axis=2)
        self.keys, self.values = keys, values
        return keys, values


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.n_embd % config.n_head != 0:
            raise UserError(f"n_embd={config.n_embd} is not divisible by n_head={config.n_head}; change one of them")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v together
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = Dropout(config.dropout)
        self.resid_dropout = Dropout(config.dropout)

    def __call__(self, x: mx.array, cache: KVCache | None = None, keys=(None, None)) -> mx.array:
        """keys: the random keys of the dropout on the attention weights and on the output (None: global state)."""
        B, T, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head).transpose(0, 2, 1, 3) for t in (q, k, v))
        if cache is not None:
            k, v = cache.update(k, v)
        scale = 1.0 / math.sqrt(C // self.n_head)
        if (self.training and self.dropout > 0) or on_cpu():
            y = self._explicit_attention(q, k, v, scale, keys[0])
        else:  # "causal" aligns the last query with the last key, so it also fits queries after a cache
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal" if T > 1 else None)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y), keys[1])

    def _explicit_attention(self, q: mx.array, k: mx.array, v: mx.array, scale: float,
                            key: mx.array | None = None) -> mx.array:
        """Scores, causal mask, softmax, dropout, values: for dropout on the weights (the fused kernel has none) and
        on the CPU, where the fused kernel is this same computation with MLX's scalar softmax."""
        T_q, T_k = q.shape[2], k.shape[2]
        scores = (q * scale) @ k.transpose(0, 1, 3, 2)
        future = mx.arange(T_k)[None, :] > mx.arange(T_k - T_q, T_k)[:, None]
        scores = mx.where(future, mx.array(-mx.inf, mx.float32), scores.astype(mx.float32))
        weights = softmax(scores).astype(v.dtype)
        return self.attn_dropout(weights, key) @ v


class MLP(nn.Module):
    """Position-wise feed-forward: n_embd -> 4*n_embd -> GELU -> n_embd."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = Dropout(config.dropout)

    def __call__(self, x: mx.array, key: mx.array | None = None) -> mx.array:
        return self.dropout(self.c_proj(gelu_tanh(self.c_fc(x))), key)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def __call__(self, x: mx.array, cache: KVCache | None = None, key: mx.array | None = None) -> mx.array:
        """key: the random key of this block's dropout masks (None: drawn from MLX's global random state)."""
        keys = [None] * 3 if key is None else mx.random.split(mx.stop_gradient(key), 3)  # no gradient for a key
        x = x + self.attn(self.ln_1(x), cache, keys[:2])
        return x + self.mlp(self.ln_2(x), keys[2])


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer blocks, final LayerNorm, output head tied to wte."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = Dropout(config.dropout)
        self.h = [Block(config) for _ in range(config.n_layer)]
        self.ln_f = LayerNorm(config.n_embd, config.bias)
        self.grad_checkpoint = False  # recompute each block's activations in the backward pass: less memory
        self._init_gpt2()

    def _init_gpt2(self):
        """GPT-2 init: weights N(0, 0.02), residual projections N(0, 0.02/sqrt(2*n_layer)), zero biases."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith("c_proj") else 0.02
                module.weight = mx.random.normal(module.weight.shape, scale=std)
                if "bias" in module:
                    module.bias = mx.zeros_like(module.bias)

    def make_cache(self) -> list[KVCache]:
        """An empty KV cache, one entry per layer, to pass to __call__."""
        return [KVCache() for _ in self.h]

    def hidden_states(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Final-layernormed hidden states (B, T, n_embd) of token ids idx (B, T)."""
        offset = cache[0].offset if cache else 0
        T = idx.shape[1]
        if offset + T > self.config.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size {self.config.block_size}")
        keys = [None] * (len(self.h) + 1)
        if self.training and self.config.dropout > 0:  # one draw from the global state; a recomputed block reuses its key
            keys = mx.random.split(mx.random.randint(0, 2**31 - 1, (2,)).astype(mx.uint32), len(self.h) + 1)
        x = self.drop(self.wte(idx) + self.wpe(mx.arange(offset, offset + T)), keys[0])
        for block, layer_cache, key in zip(self.h, cache or [None] * len(self.h), keys[1:]):
            if self.grad_checkpoint and cache is None:
                x = nn.utils.checkpoint(block)(x, key=key)
            else:
                x = block(x, layer_cache, key)
        return self.ln_f(x)

    def __call__(self, idx: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits (B, T, vocab_size) for token ids idx (B, T); a cache holds the earlier positions."""
        return self.wte.as_linear(self.hidden_states(idx, cache))

    def loss(self, idx: mx.array, targets: mx.array) -> mx.array:
        """Mean next-token cross-entropy, computed in float32."""
        logits = self(idx).astype(mx.float32)
        return cross_entropy(logits, targets).mean()

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; non_embedding leaves out wpe (wte counts: it is also the output head)."""
        n = sum(p.size for _, p in tree_flatten(self.parameters()))
        return n - self.wpe.weight.size if non_embedding else n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, forward + backward (PaLM appendix B): 6N + 12*L*H*Q*T."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * seq_len

    def generate(
        self,
        idx: mx.array,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        vocab_size: int | None = None,
    ) -> Iterator[int]:
        """Yield max_new_tokens sampled token ids after the prompt idx (1, T); temperature 0 is greedy. Only ids below
        vocab_size (the tokenizer's) are drawn: a padded vocabulary's extra ids are no tokens.

        The context is the last block_size tokens. With the cache the prompt is processed once and
        then one token per step; once the window slides, every position changes, so each further
        step rebuilds the cache from the window (same tokens as without the cache, no speed-up).
        """
        if idx.ndim != 2 or idx.shape[0] != 1 or idx.shape[1] == 0:
            raise UserError(f"the prompt must be token ids of shape (1, T>=1), not {idx.shape}; pass a non-empty prompt")
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise UserError(
                f"bad sampling settings max_new_tokens={max_new_tokens} temperature={temperature} top_k={top_k}; "
                "use max_new_tokens >= 0, temperature >= 0 (0 = greedy), top_k >= 1 or None"
            )
        return self._generate(idx[0].tolist(), max_new_tokens, temperature, top_k, use_cache,
                              vocab_size or self.config.vocab_size)

    def _generate(self, tokens: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                  use_cache: bool, vocab_size: int) -> Iterator[int]:
        """The sampling loop of generate (in eval mode; the previous mode comes back at the end)."""
        block_size = self.config.block_size
        was_training = self.training
        self.eval()
        try:
            cache = None
            for _ in range(max_new_tokens):
                if not use_cache:
                    h = self.hidden_states(mx.array([tokens[-block_size:]]))
                elif cache is None or cache[0].offset == block_size:
                    cache = self.make_cache()
                    h = self.hidden_states(mx.array([tokens[-block_size:]]), cache)
                else:
                    h = self.hidden_states(mx.array([tokens[-1:]]), cache)
                logits = self.wte.as_linear(h[:, -1])[:, :vocab_size].astype(mx.float32)
                token = _sample(logits, temperature, top_k).item()
                tokens.append(token)
                yield token
        finally:
            self.train(was_training)


def cropped_prompt_warning(prompt_tokens: int, block_size: int) -> str | None:
    """The warning for a prompt longer than the context, which generate crops to its last block_size tokens (as nanoGPT
    does); None for one that fits."""
    if prompt_tokens <= block_size:
        return None
    return (f"mlxgpt: warning: the prompt ({prompt_tokens} tokens) is longer than the model's context ({block_size}): "
            f"it is cropped to its last {block_size} tokens")


def _sample(logits: mx.array, temperature: float, top_k: int | None) -> mx.array:
    """One token id per row of logits (B, vocab): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = mx.min(mx.topk(logits, top_k, axis=-1), axis=-1, keepdims=True)
        logits = mx.where(logits < kth_largest, -mx.inf, logits)
    return mx.random.categorical(logits)
