"""The GPT model: causality, init, parameter counts, KV cache, sampling, and parity with a numpy GPT-2."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from omegaconf import OmegaConf

from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.pretrained import GPT2_SIZES, hf_to_mlxgpt

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32)

SHIPPED_MODELS = sorted((Path(__file__).parents[1] / "conf" / "model").glob("*.yaml"))  # model=<name> choices
GPT2_TOTAL_PARAMS = {
    "gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200,
}


def make_model(config: GPTConfig = TINY, seed: int = 0, scale: float | None = None) -> GPT:
    """A GPT in eval mode; `scale` redraws the weight matrices N(0, scale): a chaotic model whose greedy text varies."""
    mx.random.seed(seed)
    model = GPT(config)
    if scale is not None:
        redraw = lambda p: mx.random.normal(p.shape, scale=scale) if p.ndim == 2 else p  # noqa: E731
        model.update(tree_map(redraw, model.parameters()))
    model.eval()
    return model


def expected_params(n_layer, n_embd, vocab_size, block_size):
    """GPT-2 parameter count by hand: embeddings, 12C^2+13C per block, final LayerNorm."""
    return vocab_size * n_embd + block_size * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train-with-dropout"])
def test_changing_a_token_never_changes_earlier_logits(train):
    model = make_model(GPTConfig(**{**TINY.__dict__, "dropout": 0.2}))
    model.train(train)
    idx = mx.random.randint(0, TINY.vocab_size, (2, TINY.block_size))
    for t in (0, 5, TINY.block_size - 1):
        changed = idx.tolist()
        changed[0][t] = (changed[0][t] + 1) % TINY.vocab_size
        mx.random.seed(1)  # the same dropout masks in both passes
        before = model(idx)
        mx.random.seed(1)
        after = model(mx.array(changed))
        assert mx.array_equal(before[:, :t], after[:, :t])
        assert not mx.array_equal(before[0, t], after[0, t])


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(dropout):
    model = make_model(GPTConfig(**{**TINY.__dict__, "dropout": dropout}))
    model.train()
    idx, targets = (mx.random.randint(0, TINY.vocab_size, (3, TINY.block_size)) for _ in range(2))
    loss_and_grad = nn.value_and_grad(model, model.loss)
    results = []
    for grad_checkpoint in (False, True):
        model.grad_checkpoint = grad_checkpoint
        mx.random.seed(5)  # the same dropout masks: a recomputed block reuses its random key
        loss, grads = loss_and_grad(idx, targets)
        results.append((loss, dict(tree_flatten(grads))))
    (loss, grads), (loss_gc, grads_gc) = results
    assert loss.item() == loss_gc.item()
    assert all(mx.allclose(grads[name], grads_gc[name], atol=1e-6).item() for name in grads)


def test_explicit_attention_matches_the_fused_kernel_and_its_gradient():
    attn = make_model().h[0].attn
    q, k, v = (mx.random.normal((1, 2, 7, 16)) for _ in range(3))
    for n_queries in (7, 3, 1):  # 3 and 1: queries after cached keys
        qs = q[:, :, -n_queries:]
        fused = lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask="causal")  # noqa: E731
        explicit = lambda q, k, v: attn._explicit_attention(q, k, v, 0.25)  # noqa: E731
        assert mx.allclose(explicit(qs, k, v), fused(qs, k, v), atol=1e-6)
        cotangent = [mx.random.normal(qs.shape)]
        for ours, theirs in zip(mx.vjp(explicit, [qs, k, v], cotangent)[1], mx.vjp(fused, [qs, k, v], cotangent)[1]):
            assert mx.allclose(ours, theirs, atol=1e-5)


def test_initial_loss_is_log_vocab():
    config = GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=2, n_embd=64)
    model = make_model(config)
    idx, targets = (mx.random.randint(0, 512, (4, 32)) for _ in range(2))
    loss = model.loss(idx, targets)
    assert loss.dtype == mx.float32
    assert abs(loss.item() - math.log(512)) < 0.3


def test_loss_is_float32_for_bfloat16_params():
    model = make_model()
    model.set_dtype(mx.bfloat16)
    idx = mx.random.randint(0, TINY.vocab_size, (2, 8))
    assert model(idx).dtype == mx.bfloat16
    assert model.loss(idx, idx).dtype == mx.float32


def test_gpt2_124m_parameter_count_and_flops():
    model = GPT(GPTConfig(vocab_size=50257))  # parameters are lazy: never evaluated, so this costs nothing
    assert model.num_params(non_embedding=False) == 124_439_808
    assert model.num_params() == 123_653_376  # nanoGPT's "123.65M": minus wpe
    assert model.flops_per_token(1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_gpt2_family_parameter_counts(name):
    model = GPT(GPTConfig(vocab_size=50257, block_size=1024, **GPT2_SIZES[name]))  # lazy, never evaluated
    assert model.num_params(non_embedding=False) == GPT2_TOTAL_PARAMS[name]


def test_shipped_model_configs_are_found():
    assert {"nano", "baby", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl"} <= {p.stem for p in SHIPPED_MODELS}


@pytest.mark.parametrize("path", SHIPPED_MODELS, ids=lambda p: p.stem)
def test_shipped_sizes_shapes_and_counts(path):
    size = OmegaConf.load(path)
    C, L, T = size.n_embd, size.n_layer, size.block_size
    model = GPT(GPTConfig(vocab_size=50304, block_size=T, n_layer=L, n_head=size.n_head, n_embd=C))  # lazy
    params = dict(tree_flatten(model.parameters()))
    assert len(params) == 2 + 12 * L + 2
    assert params["wpe.weight"].shape == (T, C)
    assert params[f"h.{L - 1}.attn.c_attn.weight"].shape == (3 * C, C)
    assert params[f"h.{L - 1}.mlp.c_proj.weight"].shape == (C, 4 * C)
    assert model.num_params(False) == expected_params(L, C, 50304, T)
    assert model.num_params() == model.num_params(False) - T * C
    if model.num_params() < 20_000_000:  # small enough to run here
        model.eval()
        assert model(mx.zeros((2, 5), mx.int32)).shape == (2, 5, 50304)


def test_bias_false_has_no_biases():
    model = GPT(GPTConfig(**{**TINY.__dict__, "bias": False}))
    names = [name for name, _ in tree_flatten(model.parameters())]
    assert not [n for n in names if n.endswith("bias")]
    assert len(names) == 2 + 6 * TINY.n_layer + 1


def test_gpt2_init_statistics():
    mx.random.seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=1000, n_layer=12, n_head=4, n_embd=128))
    p = dict(tree_flatten(model.parameters()))
    residual_std = 0.02 / math.sqrt(2 * 12)
    for name, std in [("h.3.attn.c_proj.weight", residual_std), ("h.3.mlp.c_proj.weight", residual_std),
                      ("h.3.attn.c_attn.weight", 0.02), ("h.3.mlp.c_fc.weight", 0.02),
                      ("wte.weight", 0.02), ("wpe.weight", 0.02)]:
        assert abs(np.std(np.array(p[name])) / std - 1) < 0.05, name
        assert abs(np.mean(np.array(p[name]))) < std / 20, name
    for name in ("h.3.attn.c_attn.bias", "h.3.mlp.c_proj.bias", "h.3.ln_1.bias", "ln_f.bias"):
        assert mx.array_equal(p[name], mx.zeros_like(p[name])), name
    assert mx.array_equal(p["h.3.ln_2.weight"], mx.ones((128,)))


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError):
        make_model()(mx.zeros((1, TINY.block_size + 1), mx.int32))


def test_kv_cache_logits_match_full_forward():
    model = make_model(scale=0.5)
    idx = mx.random.randint(0, TINY.vocab_size, (1, TINY.block_size))
    full = model(idx)
    cache = model.make_cache()
    pieces = [model(idx[:, :5], cache)] + [model(idx[:, t : t + 1], cache) for t in range(5, TINY.block_size)]
    assert cache[0].offset == TINY.block_size
    assert mx.allclose(mx.concatenate(pieces, axis=1), full, atol=1e-5)


def greedy_reference(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding written out: argmax of the last logits of the last block_size tokens."""
    tokens = list(prompt)
    for _ in range(n):
        logits = model(mx.array([tokens[-model.config.block_size :]]))
        tokens.append(mx.argmax(logits[0, -1]).item())
    return tokens[len(prompt) :]


@pytest.mark.parametrize("prompt_len", [3, TINY.block_size - 2, TINY.block_size + 5])
def test_greedy_is_identical_with_and_without_cache_across_the_window(prompt_len):
    model = make_model(scale=0.5)
    prompt = mx.random.randint(0, TINY.vocab_size, (1, prompt_len))
    n = 2 * TINY.block_size  # slides the window many times
    cached = list(model.generate(prompt, n, temperature=0))
    uncached = list(model.generate(prompt, n, temperature=0, use_cache=False))
    assert len(cached) == n
    assert cached == uncached == greedy_reference(model, prompt[0].tolist(), n)
    assert len(set(cached[TINY.block_size :])) > 3  # a real sequence after the window slid, not one token repeated


def test_generate_respects_max_new_tokens_and_restores_train_mode():
    model = make_model()
    model.train()
    prompt = mx.array([[1, 2, 3]])
    assert len(list(model.generate(prompt, 7))) == 7
    assert list(model.generate(prompt, 0)) == []
    assert model.training
    for bad in (dict(max_new_tokens=-1), dict(max_new_tokens=1, temperature=-1.0), dict(max_new_tokens=1, top_k=0)):
        with pytest.raises(UserError):
            model.generate(prompt, **bad)  # raised at the call, before any token is drawn
    with pytest.raises(UserError):
        model.generate(mx.zeros((1, 0), mx.int32), 1)


def test_top_k_samples_only_the_k_most_likely_tokens():
    model = make_model(scale=0.5)
    prompt = mx.array([[4, 8, 15, 16]])
    top3 = set(np.argsort(np.array(model(prompt)[0, -1]))[-3:].tolist())
    drawn = set()
    for seed in range(40):
        mx.random.seed(seed)
        drawn.update(model.generate(prompt, 1, temperature=2.0, top_k=3))
    assert drawn <= top3 and len(drawn) > 1
    mx.random.seed(0)
    assert list(model.generate(prompt, 10, top_k=1)) == list(model.generate(prompt, 10, temperature=0))


# ---- parity with an independent numpy GPT-2 that reads HF-format weights (Conv1D layout) ----


def random_hf_gpt2(n_layer=2, n_head=4, n_embd=32, vocab_size=61, n_positions=24, seed=0) -> dict[str, np.ndarray]:
    """Random GPT-2 weights with Hugging Face names and layout, including the tied lm_head and mask buffers."""
    rng = np.random.default_rng(seed)
    C = n_embd

    def normal(*shape, std=0.2):
        return rng.normal(0.0, std, shape).astype(np.float32)

    w = {"transformer.wte.weight": normal(vocab_size, C), "transformer.wpe.weight": normal(n_positions, C)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        w |= {
            p + "ln_1.weight": 1 + normal(C), p + "ln_1.bias": normal(C),
            p + "attn.c_attn.weight": normal(C, 3 * C), p + "attn.c_attn.bias": normal(3 * C),
            p + "attn.c_proj.weight": normal(C, C), p + "attn.c_proj.bias": normal(C),
            p + "ln_2.weight": 1 + normal(C), p + "ln_2.bias": normal(C),
            p + "mlp.c_fc.weight": normal(C, 4 * C), p + "mlp.c_fc.bias": normal(4 * C),
            p + "mlp.c_proj.weight": normal(4 * C, C), p + "mlp.c_proj.bias": normal(C),
            p + "attn.bias": np.tril(np.ones((n_positions, n_positions), np.float32))[None, None],
            p + "attn.masked_bias": np.array(-1e4, np.float32),
        }
    w |= {"transformer.ln_f.weight": 1 + normal(C), "transformer.ln_f.bias": normal(C)}
    w["lm_head.weight"] = w["transformer.wte.weight"]
    return w


def numpy_gpt2_logits(w: dict[str, np.ndarray], ids: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-2 forward pass in float64 numpy, straight from the HF weights."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    T = ids.shape[1]

    def layer_norm(x, prefix):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * w[prefix + ".weight"] + w[prefix + ".bias"]

    def conv1d(x, prefix):
        return x @ w[prefix + ".weight"] + w[prefix + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][:T]
    n_layer = len({k.split(".")[2] for k in w if k.startswith("transformer.h.")})
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        q, k, v = np.split(conv1d(layer_norm(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
        heads = lambda t: t.reshape(*t.shape[:2], n_head, -1).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = heads(q), heads(k), heads(v)
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(x.shape)
        x = x + conv1d(y, p + "attn.c_proj")
        x = x + conv1d(gelu_tanh(conv1d(layer_norm(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return layer_norm(x, "transformer.ln_f") @ w["lm_head.weight"].T


def test_forward_matches_numpy_gpt2_on_hf_weights():
    hf = random_hf_gpt2()
    model = GPT(GPTConfig(block_size=24, vocab_size=61, n_layer=2, n_head=4, n_embd=32))
    model.load_weights(list(hf_to_mlxgpt({k: mx.array(v) for k, v in hf.items()}).items()))  # strict: all names
    model.eval()
    ids = np.random.default_rng(1).integers(0, 61, (2, 24))
    expected = numpy_gpt2_logits(hf, ids, n_head=4)
    assert np.abs(expected).max() > 1  # logits of a real size, so the tolerance means something
    np.testing.assert_allclose(np.array(model(mx.array(ids))), expected, atol=1e-4, rtol=0)


def test_bench_sample_prints_a_table_for_a_tiny_model(capsys):
    from mlxgpt.bench_sample import main

    args = "--n-layer 1 --n-head 2 --n-embd 32 --block-size 16 --vocab-size 50 --prompt-tokens 4 --tokens 20"
    assert main(args.split()) == 0
    out = capsys.readouterr().out
    assert "| on |" in out and "| off |" in out and "speed-up:" in out


@pytest.mark.parametrize("args, message", [("--tokens 0", "error: --tokens 0: must be >= 1;"),
                                           ("--n-head 5", "error: n_embd=32 is not divisible by n_head=5;")])
def test_bench_sample_bad_arguments_are_one_line(capsys, args, message):
    from mlxgpt.bench_sample import main

    with pytest.raises(SystemExit) as e:
        main(f"--n-layer 1 --n-head 2 --n-embd 32 {args}".split())
    assert e.value.code == 2 and capsys.readouterr().err.startswith(message)
