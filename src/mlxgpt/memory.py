"""The memory a training run needs, from its config alone, against the device's: a run that cannot fit is refused
before anything is built or written, one that may not fit is warned about."""
from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from omegaconf import DictConfig, OmegaConf

from mlxgpt import device
from mlxgpt.errors import UserError
from mlxgpt.pretrained import GPT2_SIZES, MODEL_CONFIGS

OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1}  # float32 arrays per parameter: Adam's moments, SGD's momentum
GPT2_VOCAB = 50304  # the gpt2 tokenizer's 50257 ids padded to a multiple of 64 (task._pad)
# Activations of one token in float32 values, fitted to MLX's peak memory on the CPU (a nano model to GPT-2 124M,
# char and GPT-2 vocabularies; estimate / peak 0.88-1.30, GPT-2 124M at B=8 x 1024 included): each block keeps
# ~30 x n_embd + 1.5 x n_head x T (attention scores) for the backward pass; with trainer.grad_checkpoint, 4 x n_embd,
# and at most 2 blocks at once in full; embeddings, the logits and the loss ~38 x n_embd + 4 x vocab_size (the
# logits, their gradient and the loss's temporaries).
BLOCK_PER_EMBD, BLOCK_PER_HEAD_POSITION, CHECKPOINTED_BLOCK_PER_EMBD, RECOMPUTED_BLOCKS = 30, 1.5, 4, 2
OUTSIDE_PER_EMBD, OUTSIDE_PER_VOCAB = 38, 4
SURE_OVER = 2  # on the CPU a run estimated above 2x its memory is refused (the estimate was at most 1.6x the peak)


@dataclass
class MemoryNeed:
    """Bytes a run needs for its model alone (`model`: weights, gradients, optimizer state), at least in all (`minimum`:
    also the activations it cannot do without) and about (`estimate`); its parameter count."""

    model: int
    minimum: int
    estimate: int
    params: int


def num_params(n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool) -> int:
    """GPT.num_params(non_embedding=False) from the sizes alone: embeddings, blocks, final LayerNorm."""
    per_block = 12 * n_embd * n_embd + (13 if bias else 2) * n_embd
    return (vocab_size + block_size) * n_embd + n_layer * per_block + (2 if bias else 1) * n_embd


def known_vocab_size(cfg: DictConfig) -> int:
    """model.vocab_size, else what the tokenizer will give: GPT-2's padded vocabulary, or data.chars; an unknown char
    vocabulary (read from the corpus later) counts as 0, so that the minimum stays a lower bound."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if cfg.data.tokenizer == "gpt2":
        return GPT2_VOCAB
    return len(cfg.data.chars or "")


def memory_need(cfg: DictConfig, on_gpu: bool) -> MemoryNeed:
    """What a training step of `cfg` holds at its peak: float32 weights, gradients (and their accumulation) and
    optimizer state, plus the activations of one micro-batch (trainer.batch_size x the context)."""
    m, t = cfg.model, cfg.trainer
    vocab, context = known_vocab_size(cfg), t.block_size or m.block_size
    tokens, params = t.batch_size * context, num_params(m.n_layer, m.n_embd, m.block_size, vocab, m.bias)
    states = OPTIMIZER_STATES[cfg.optimizer.name] if holds_optimizer_state(t) else 0
    weights = 4 * params * (1 + states)  # the weights and the optimizer's state
    grads = 4 * params * (2 if t.gradient_accumulation_steps > 1 else 1)  # a micro-step's, and their running sum
    half = on_gpu and t.dtype != "float32"  # the CPU computes in float32 whatever trainer.dtype says
    act_bytes = 2 if half else 4  # the scores' softmax, the logits and the loss are float32 in any case
    logits = 4 * tokens * vocab
    if t.eval_only:  # no gradients, no backward pass: an evaluation batch's last hidden states and logits at least
        forward = weights + tokens * m.n_embd * act_bytes + logits
        return MemoryNeed(weights, forward, forward, params)
    held = tokens * m.n_layer * m.n_embd * act_bytes + logits  # each block's input, kept for the backward pass
    full = min(m.n_layer, RECOMPUTED_BLOCKS) if t.grad_checkpoint else m.n_layer  # blocks whose activations are kept
    per_embd = (full * BLOCK_PER_EMBD + OUTSIDE_PER_EMBD
                + (m.n_layer * CHECKPOINTED_BLOCK_PER_EMBD if t.grad_checkpoint else 0))
    per_token = act_bytes * per_embd * m.n_embd + 4 * (full * BLOCK_PER_HEAD_POSITION * m.n_head * context
                                                       + OUTSIDE_PER_VOCAB * vocab)
    activations = int(tokens * per_token) + (2 * params if half else 0)  # + the weights' half-precision copies
    update = weights  # the optimizer writes new weights and state beside the old ones (cpu_streams' per-part
    # gradients are freed by then: measured, they leave the peak unchanged)
    return MemoryNeed(weights + grads, weights + max(grads, held), weights + grads + max(update, activations), params)


def holds_optimizer_state(t: DictConfig) -> bool:
    """Whether a run with trainer settings `t` holds optimizer state: training does, an evaluation (eval_only) only
    when it loads a checkpoint's with trainer.resume (init_from loads the weights alone)."""
    return not t.eval_only or t.resume not in (None, "auto")


def check_fits(cfg: DictConfig) -> str | None:
    """UserError when the run cannot fit in its device's memory (a rank: in its share); the warning to print when it may
    not (else None). A collective under mlx.launch: every rank calls it."""
    chosen = device.choose_device(cfg.trainer.device)
    available, ranks = device.memory_bytes(chosen), device.ranks_sharing_memory(chosen)
    if available is None:
        return None
    on_gpu, t = chosen == mx.gpu, cfg.trainer
    need = memory_need(cfg, on_gpu)
    where = f"the {'GPU' if on_gpu else 'CPU'}'s {available / 1e9:,.1f} GB"
    if ranks > 1:
        where = f"{where} / {ranks} (the ranks on this machine share it)"
        available //= ranks
    held = ("float32 weights" + ("" if t.eval_only else ", gradients")
            + (f", optimizer={cfg.optimizer.name} state" if holds_optimizer_state(t) else ""))
    if need.model > available:
        raise UserError(f"the model does not fit in memory: its {need.params / 1e6:,.1f}M parameters need at least "
                        f"{need.model / 1e9:,.1f} GB ({held}), more than {where}; "
                        f"{_smaller_model(cfg, on_gpu, available)}")
    micro_batch = f"a micro-batch of {t.batch_size} x {t.block_size or cfg.model.block_size} tokens"
    smaller_batch = "lower trainer.batch_size" + (
        "" if t.eval_only else " (more trainer.gradient_accumulation_steps keep the tokens per step)")
    if need.minimum > available:
        raise UserError(f"the batch does not fit in memory: {micro_batch} needs at least {need.minimum / 1e9:,.1f} GB "
                        f"(weights, optimizer state and the activations it must hold), more than {where}; "
                        f"{smaller_batch} or trainer.block_size")
    checkpointing = "" if t.grad_checkpoint else ", set trainer.grad_checkpoint=true"
    fixes = f"{smaller_batch}{checkpointing} or use a smaller model"
    if not on_gpu and need.estimate > SURE_OVER * available:
        raise UserError(f"the batch does not fit in memory: {micro_batch} needs about {need.estimate / 1e9:,.1f} GB "
                        f"(weights, gradients, optimizer state, activations), over {SURE_OVER}x {where}; {fixes}")
    if need.estimate > available:
        return (f"mlxgpt: warning: this run may not fit in memory: about {need.estimate / 1e9:,.1f} GB estimated for "
                f"{micro_batch} (weights, gradients, optimizer state, activations), more than {where}; if it fails "
                f"or swaps: {fixes}")
    return None


def _smaller_model(cfg: DictConfig, on_gpu: bool, available: int) -> str:
    """How to use a model that fits: fewer layers or a narrower one; with GPT-2 weights (whose sizes are fixed),
    the largest smaller GPT-2 whose model fits."""
    if cfg.init_from not in GPT2_SIZES:
        return "use a smaller model (model.n_layer, model.n_embd)"
    for name in reversed(list(GPT2_SIZES)[:list(GPT2_SIZES).index(cfg.init_from)]):
        if memory_need(OmegaConf.merge(cfg, {"model": GPT2_SIZES[name]}), on_gpu).model <= available:
            return f"use smaller GPT-2 weights: init_from={name} model={MODEL_CONFIGS[name]}"
    return "even GPT-2 124M's weights (init_from=gpt2) do not fit"
