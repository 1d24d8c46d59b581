"""GPT-2 weights in Hugging Face format: name/layout mapping, export, load, errors, offline hub cache."""
import mlxgpt  # noqa: F401  (first: fast BLAS before mlx.core)

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from omegaconf import OmegaConf

from mlxgpt.errors import UserError
from mlxgpt.model import GPT, GPTConfig
from mlxgpt.pretrained import GPT2_SIZES, MODEL_CONFIGS, export_hf, hf_to_mlxgpt, load_pretrained, mlxgpt_to_hf

CONFIG = GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=32)


def make_model(config: GPTConfig = CONFIG) -> GPT:
    mx.random.seed(0)
    model = GPT(config)
    model.eval()
    return model


def params_of(model: GPT) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))


def assert_same_arrays(a: dict[str, mx.array], b: dict[str, mx.array]):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and mx.array_equal(a[name], b[name]), name


def test_hf_mapping_transposes_conv1d_and_drops_buffers_and_head():
    params = params_of(make_model())
    hf = mlxgpt_to_hf(params)
    assert "transformer.h.1.attn.c_attn.weight" in hf and "transformer.ln_f.bias" in hf
    assert hf["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: (in, out)
    assert hf["transformer.h.0.mlp.c_proj.weight"].shape == (128, 32)
    assert hf["transformer.wte.weight"].shape == (96, 32)  # embeddings are not transposed
    with_extras = dict(hf)
    with_extras["lm_head.weight"] = hf["transformer.wte.weight"]
    with_extras["transformer.h.0.attn.bias"] = mx.ones((1, 1, 16, 16))
    with_extras["transformer.h.0.attn.masked_bias"] = mx.array(-1e4)
    assert_same_arrays(hf_to_mlxgpt(with_extras), params)
    unprefixed = {name.removeprefix("transformer."): value for name, value in hf.items()}  # as gpt2's own file
    assert_same_arrays(hf_to_mlxgpt(unprefixed), params)


def test_export_then_load_is_exact(tmp_path):
    model = make_model()
    out = export_hf(model, tmp_path / "hf")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["GPT2LMHeadModel"] and hf_config["activation_function"] == "gelu_new"
    assert (hf_config["n_layer"], hf_config["n_positions"], hf_config["vocab_size"]) == (2, 16, 96)
    with open(out / "model.safetensors", "rb") as f:  # safetensors header: 8-byte length, then JSON
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}
    config, params = load_pretrained(str(out))
    assert config == CONFIG
    assert_same_arrays(params, params_of(model))
    loaded = GPT(config)
    loaded.load_weights(list(params.items()))  # strict: every name and shape
    loaded.eval()
    idx = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(loaded(idx), model(idx))


def test_export_keeps_bfloat16(tmp_path):
    model = make_model()
    model.set_dtype(mx.bfloat16)
    config, params = load_pretrained(str(export_hf(model, tmp_path)))
    assert_same_arrays(params, params_of(model))


def test_bias_free_padded_vocab_model_exports_with_zero_biases(tmp_path):
    model = make_model(replace(CONFIG, bias=False, vocab_size=128))
    config, params = load_pretrained(str(export_hf(model, tmp_path)))
    assert config.vocab_size == 128 and config.bias
    assert mx.array_equal(params["h.0.attn.c_attn.bias"], mx.zeros((96,)))
    assert mx.array_equal(params["ln_f.bias"], mx.zeros((32,)))
    loaded = GPT(config)
    loaded.load_weights(list(params.items()))
    loaded.eval()
    idx = mx.array([[5, 6, 7]])
    assert mx.allclose(loaded(idx), model(idx), atol=1e-6)


def test_export_leaves_out_the_padded_rows_of_the_vocabulary(tmp_path):
    model = make_model(replace(CONFIG, vocab_size=128))
    export_hf(model, tmp_path, vocab_size=96)
    assert json.loads((tmp_path / "config.json").read_text())["vocab_size"] == 96
    config, params = load_pretrained(str(tmp_path))
    assert config == CONFIG and mx.array_equal(params["wte.weight"], model.wte.weight[:96])
    loaded = GPT(config)
    loaded.load_weights(list(params.items()))
    loaded.eval()
    idx = mx.array([[5, 6, 7]])
    assert mx.array_equal(loaded(idx), model(idx)[..., :96])
    assert list(loaded.generate(idx, 12, temperature=0)) == list(model.generate(idx, 12, temperature=0, vocab_size=96))


def test_export_refuses_to_overwrite(tmp_path):
    model = make_model()
    export_hf(model, tmp_path)
    with pytest.raises(UserError, match="overwrite=true"):
        export_hf(model, tmp_path)
    export_hf(model, tmp_path, overwrite=True)


def gpt2_sized_dir(tmp_path):
    """A directory whose config.json has GPT-2 124M sizes (the size checks run before the weights are read)."""
    config = dict(model_type="gpt2", n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab_size=50257)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    return str(tmp_path)


def test_size_mismatch_names_both_sizes_and_the_fix(tmp_path):
    with pytest.raises(UserError) as error:
        load_pretrained(gpt2_sized_dir(tmp_path), CONFIG)
    message = str(error.value)
    assert "n_layer=2 n_head=2 n_embd=32" in message and "n_layer=12 n_head=12 n_embd=768" in message
    assert "model=gpt2_small" in message


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_the_model_config_named_in_the_hint_has_the_checkpoint_sizes(name):
    conf = OmegaConf.load(Path(__file__).parents[1] / "conf" / "model" / f"{MODEL_CONFIGS[name]}.yaml")
    assert dict(n_layer=conf.n_layer, n_head=conf.n_head, n_embd=conf.n_embd) == GPT2_SIZES[name]


def test_block_size_beyond_the_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="block_size=2048"):
        load_pretrained(gpt2_sized_dir(tmp_path), GPTConfig(block_size=2048))


def test_smaller_block_size_and_dropout_come_from_the_model_config(tmp_path):
    model = make_model()
    export_hf(model, tmp_path)
    config, params = load_pretrained(str(tmp_path), replace(CONFIG, block_size=8, dropout=0.1, vocab_size=50304))
    assert (config.block_size, config.dropout, config.vocab_size) == (8, 0.1, 96)
    assert mx.array_equal(params["wpe.weight"], model.wpe.weight[:8])


def test_missing_files_and_unknown_names_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="hf download"):
        load_pretrained("gpt3")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="model.safetensors"):
        load_pretrained(str(tmp_path))


@pytest.mark.parametrize("key, value", [("tie_word_embeddings", False), ("scale_attn_weights", False),
                                        ("scale_attn_by_inverse_layer_idx", True), ("layer_norm_epsilon", 1e-6)])
def test_a_config_with_other_gpt2_math_is_refused(tmp_path, key, value):
    """With these, transformers computes other logits than our GPT would (an untied head's weights were dropped)."""
    export_hf(make_model(), tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), key: value}))
    with pytest.raises(UserError, match=f"has {key}={json.dumps(value)};"):
        load_pretrained(str(tmp_path))


def test_corrupt_weights_file_is_a_user_error(tmp_path):
    export_hf(make_model(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="model.safetensors"):
        load_pretrained(str(tmp_path))


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache with the hub in offline mode."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_as_gpt2(cache: Path, model: GPT) -> None:
    """Put the model in the hub cache as `gpt2` (the cache's layout: refs/main names a snapshot directory)."""
    commit = "0" * 40
    export_hf(model, cache / "models--gpt2" / "snapshots" / commit)
    (cache / "models--gpt2" / "refs").mkdir()
    (cache / "models--gpt2" / "refs" / "main").write_text(commit)


def test_hub_name_without_network_or_cache_explains_the_offline_route(offline_hub_cache):
    with pytest.raises(UserError, match="hf download gpt2 config.json model.safetensors --local-dir"):
        load_pretrained("gpt2")


def test_sample_py_offline_advice_names_its_own_option(offline_hub_cache):
    from mlxgpt.config import SampleConfig
    from mlxgpt.sampling import sample

    options = OmegaConf.structured(SampleConfig(checkpoint="gpt2", num_samples=1, max_new_tokens=2, device="cpu"))
    with pytest.raises(UserError, match="set checkpoint=DIR$"):  # sample.py has no init_from
        next(sample(options))
    with pytest.raises(UserError, match="set init_from=DIR$"):
        load_pretrained("gpt2")


def test_hub_name_loads_from_the_cache_offline(offline_hub_cache, tmp_path):
    model = make_model()
    cache_as_gpt2(offline_hub_cache, model)
    config, params = load_pretrained("gpt2")
    assert config == CONFIG
    assert_same_arrays(params, params_of(model))


def test_sample_py_takes_a_gpt2_hub_name_and_its_bpe(offline_hub_cache, tiktoken_cache):
    from mlxgpt.config import SampleConfig
    from mlxgpt.sampling import sample
    from test_sampling import joined
    from mlxgpt.tokenizer import GPT2Tokenizer

    model = make_model()
    cache_as_gpt2(offline_hub_cache, model)
    bpe = GPT2Tokenizer()
    ids = bpe.encode("!#")  # ids below the test model's 96
    expected = "!#" + bpe.decode(list(model.generate(mx.array([ids]), 6, temperature=0, use_cache=False)))
    options = OmegaConf.structured(SampleConfig(checkpoint="gpt2", prompt="!#", num_samples=1, max_new_tokens=6,
                                                temperature=0.0, device="cpu"))
    assert joined(sample(options)) == [expected]


def test_transformers_loads_the_export_with_the_same_logits_and_greedy_tokens(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = make_model(replace(CONFIG, bias=False, vocab_size=128))  # padded: transformers sees the 96 tokens only
    export_hf(model, tmp_path, vocab_size=96)
    hf_model, loading = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading.values())  # no missing, unexpected or mismatched weights
    idx = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = hf_model.eval()(torch.tensor(idx)).logits.numpy()
        greedy = hf_model.generate(torch.tensor(idx), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                   attention_mask=torch.ones(idx.shape, dtype=torch.long))[0, idx.shape[1]:].tolist()
    np.testing.assert_allclose(np.array(model(mx.array(idx)))[..., :96], expected, atol=1e-5, rtol=0)
    for use_cache in (True, False):
        assert list(model.generate(mx.array(idx), 8, temperature=0, use_cache=use_cache, vocab_size=96)) == greedy


def test_a_checkpoint_saved_by_transformers_loads_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=16, vocab_size=96)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random biases and LayerNorm parameters too, so every mapping matters
        for parameter in hf_model.parameters():
            parameter.normal_(0.0, 0.2)
    hf_model.save_pretrained(tmp_path)
    config, params = load_pretrained(str(tmp_path))
    model = GPT(config)
    model.load_weights(list(params.items()))
    model.eval()
    idx = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        expected = hf_model(torch.tensor(idx)).logits.numpy()
    np.testing.assert_allclose(np.array(model(mx.array(idx))), expected, atol=1e-5, rtol=0)


# sha256 of the BPE export's files as first written (from tiktoken's private ranks table): byte-identical since.
BPE_FILES_SHA256 = {"vocab.json": "141c90441406d2a71a00089fa4f021bd9bd17c16ae9aec33681c1f3661c2ae69",
                    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
WORDS = ["Hello", " world", " language", " tokenization", " 東京", " 🤖", "\n\n", " Ünïcödé", "1234567"]


def test_a_bpe_export_has_gpt2s_tokenizer_files(tmp_path, tiktoken_cache):
    """vocab.json + merges.txt: BPE by their merges (one pre-token at a time) gives tiktoken's ids."""
    from mlxgpt.tokenizer import GPT2Tokenizer, _byte_characters

    export_hf(make_model(), tmp_path, tokenizer_meta={"name": "gpt2"})
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and len(merges) == 50000
    rank = {tuple(line.split(" ")): i for i, line in enumerate(merges)}
    show = _byte_characters()
    bpe = GPT2Tokenizer()
    for word in WORDS:
        parts = [show[b] for b in word.encode()]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), len(rank)))
            if (parts[best], parts[best + 1]) not in rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        assert [vocab[p] for p in parts] == bpe.encode(word), word
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == CONFIG.block_size
    assert {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in BPE_FILES_SHA256} == \
        BPE_FILES_SHA256


def test_overwriting_a_bpe_export_with_a_char_model_leaves_no_bpe_tokenizer_files(tmp_path, tiktoken_cache):
    """AutoTokenizer.from_pretrained would read the old files: GPT-2's BPE for a model of characters."""
    export_hf(make_model(), tmp_path, tokenizer_meta={"name": "gpt2"})
    (tmp_path / "tokenizer.json").write_text("{}")  # as transformers' save_pretrained writes beside them
    chars = "".join(chr(32 + i) for i in range(CONFIG.vocab_size))
    export_hf(make_model(), tmp_path, overwrite=True, tokenizer_meta={"name": "char", "chars": chars})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["mlxgpt_tokenizer"]["chars"] == chars


def test_transformers_tokenizes_a_bpe_export_as_tiktoken(tmp_path, tiktoken_cache):
    transformers = pytest.importorskip("transformers")
    from mlxgpt.tokenizer import GPT2Tokenizer

    export_hf(make_model(), tmp_path, tokenizer_meta={"name": "gpt2"})
    theirs, ours = transformers.AutoTokenizer.from_pretrained(tmp_path), GPT2Tokenizer()
    text = "".join(WORDS) + " def f(x):\n    return x**2  # “quoted” – dash\t tab"
    assert theirs.encode(text) == ours.encode(text) and theirs.eos_token_id == 50256
