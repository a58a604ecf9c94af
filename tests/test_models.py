"""Model loading, specs, weight views and RoPE tables (nreft_engine.models)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch
from tiny_models import TINY_FAMILIES, make_tiny_model, save_tiny_model
from transformers import AutoConfig

from nreft_engine.models import (
    DEFAULT_MODEL,
    SUPPORTED_MODEL_TYPES,
    DecoderWeights,
    ModelSpec,
    UnsupportedModelError,
    load_model,
    loader,
    model_spec,
    rope_tables,
)
from nreft_engine.models.loader import embedded_gguf_path

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(
    "family, head_dim", [("llama", 16), ("qwen2", 16), ("qwen3", 32), ("llama-untied", 16)]
)
def test_spec_per_family(family, head_dim):
    spec = model_spec(make_tiny_model(family))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 4, 2, head_dim)
    assert (spec.vocab_size, spec.eos_token_ids) == (128, (2,))


def test_spec_mistral_is_supported_and_eos_lists_merge():
    config = AutoConfig.for_model("mistral", num_hidden_layers=2, eos_token_id=[2, 7])
    generation_config = type("GenerationConfig", (), {"eos_token_id": [7, 9]})()
    spec = ModelSpec.from_config(config, generation_config)
    assert spec.num_layers == 2 and spec.eos_token_ids == (2, 7, 9)


def test_llama_attention_bias_includes_o_proj():
    weights = DecoderWeights.from_model(make_tiny_model("llama", attention_bias=True))
    layer = weights.layers[0]
    assert all(b is not None for b in (layer.q_bias, layer.k_bias, layer.v_bias, layer.o_bias))


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_weight_views_share_storage(family):
    model = make_tiny_model(family)
    weights = DecoderWeights.from_model(model)
    layer, hf_layer = weights.layers[1], model.model.layers[1]
    assert len(weights.layers) == 4
    assert layer.q.data_ptr() == hf_layer.self_attn.q_proj.weight.data_ptr()
    assert layer.down.data_ptr() == hf_layer.mlp.down_proj.weight.data_ptr()
    assert (weights.lm_head is weights.embed) == model.config.tie_word_embeddings
    assert (layer.q_bias is not None) == (family == "qwen2")
    assert (layer.q_norm is not None) == (family == "qwen3")
    with torch.no_grad():
        hf_layer.mlp.gate_proj.weight.add_(1.0)
        model.lm_head.weight.mul_(2.0)
    assert torch.equal(layer.gate, hf_layer.mlp.gate_proj.weight)
    assert torch.equal(weights.lm_head, model.lm_head.weight)
    assert not layer.q.requires_grad


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {}),
        ("qwen3", {}),
        ("llama3-rope", {}),
        ("llama", {"rope_scaling": YARN}),
    ],
)
def test_rope_tables_match_hf_rotary_embedding(family, overrides):
    model = make_tiny_model(family, **overrides)
    cos, sin = rope_tables(model, 200, "cpu")
    half = model_spec(model).head_dim // 2
    assert cos.shape == sin.shape == (200, half) and cos.dtype == torch.float32
    x = torch.zeros(1, dtype=torch.float32)
    hf_cos, hf_sin = model.model.rotary_emb(x, torch.arange(200)[None])
    for ours, theirs in ((cos, hf_cos[0]), (sin, hf_sin[0])):
        assert torch.equal(ours, theirs[:, :half]) and torch.equal(ours, theirs[:, half:])
    if "rope_scaling" in overrides:
        assert model.model.rotary_emb.attention_scaling != 1.0  # yarn scales cos/sin


def test_load_saved_tiny_model_dir(tmp_path):
    model = make_tiny_model("qwen2", seed=3)
    loaded, tokenizer = load_model(save_tiny_model(model, str(tmp_path / "tiny")), dtype=torch.bfloat16)
    assert tokenizer is None and not loaded.training and loaded.dtype == torch.bfloat16
    assert model_spec(loaded) == model_spec(model)
    for (name, ours), theirs in zip(loaded.state_dict().items(), model.state_dict().values()):
        assert torch.equal(ours, theirs.to(torch.bfloat16)), name


def test_unsupported_architecture_is_rejected_before_loading_weights(tmp_path):
    AutoConfig.for_model("gpt2", n_layer=1, architectures=["GPT2LMHeadModel"]).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        load_model(str(tmp_path))  # no weight file: failing later would be an OSError
    assert all(name in str(info.value) for name in SUPPORTED_MODEL_TYPES)


def test_length_dependent_rope_is_rejected():
    config = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelSpec.from_config(config)


def test_model_spec_rejects_non_models():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        model_spec(torch.nn.Linear(2, 2))


def test_missing_path_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match=DEFAULT_MODEL):
        load_model(str(tmp_path / "nothing" / "here"))
    with pytest.raises(ValueError, match=f"'no-such-model'.*{DEFAULT_MODEL}"):
        load_model("no-such-model")


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="neither a local path nor reachable on the Hugging Face hub"):
        load_model("nreft-test/no-such-model")


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    """The embedded model loaded once into an empty cache: (cache dir, model, tokenizer, seconds taken).

    The cache (over 500 MB) is removed afterwards rather than left among pytest's kept temp folders.
    """
    cache_dir = tmp_path_factory.mktemp("gguf-cache")
    start = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, cache_dir=str(cache_dir))
    yield cache_dir, model, tokenizer, time.perf_counter() - start
    shutil.rmtree(cache_dir)


def assert_same_model(model, tokenizer, other, other_tokenizer):
    for (name, ours), theirs in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    ids = tokenizer("What is 2 + 3?").input_ids
    assert ids == other_tokenizer("What is 2 + 3?").input_ids and tokenizer.decode(ids) == "What is 2 + 3?"
    assert tokenizer.chat_template == other_tokenizer.chat_template is not None


@pytest.mark.slow
def test_embedded_gguf_loads_then_comes_from_cache(embedded_cache):
    cache_dir, model, tokenizer, first = embedded_cache
    (cached_dir,) = [p for p in cache_dir.iterdir() if not p.name.startswith(".")]
    assert (cached_dir / "model.safetensors").is_file()
    assert json.loads((cached_dir / "config.json").read_text())["model_type"] == "llama"

    start = time.perf_counter()
    again, tokenizer_again = load_model(DEFAULT_MODEL, cache_dir=str(cache_dir))
    second = time.perf_counter() - start
    print(f"\nGGUF first load (convert + cache) {first:.1f}s, cached load {second:.1f}s")
    assert second < first

    spec = model_spec(model)
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (30, 9, 3)
    assert model.config.model_type == "llama"
    assert model.config.tie_word_embeddings and spec.eos_token_ids == (2,)
    assert_same_model(model, tokenizer, again, tokenizer_again)


@pytest.mark.slow
def test_a_reinstalled_gguf_file_reuses_the_cache(embedded_cache, tmp_path, monkeypatch):
    """The cache is keyed by content: the same file at a new path with a new mtime is not converted again."""
    cache_dir, model, tokenizer, _ = embedded_cache
    original = embedded_gguf_path(DEFAULT_MODEL)
    copy = tmp_path / os.path.basename(original)
    shutil.copyfile(original, copy)
    os.utime(copy, ns=(1, 1))
    entries = sorted(cache_dir.iterdir())

    def no_conversion(path):
        raise AssertionError(f"{path} was converted again")

    monkeypatch.setattr(loader, "_convert_gguf", no_conversion)
    loaded, loaded_tokenizer = load_model(str(copy), cache_dir=str(cache_dir))
    copy.unlink()
    assert sorted(cache_dir.iterdir()) == entries
    assert_same_model(model, tokenizer, loaded, loaded_tokenizer)


@pytest.mark.slow
def test_a_full_disk_loads_the_gguf_from_memory_with_a_warning(embedded_cache, tmp_path, monkeypatch, caplog):
    _, model, tokenizer, _ = embedded_cache
    monkeypatch.setattr(loader.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        loaded, loaded_tokenizer = load_model(DEFAULT_MODEL, torch.bfloat16, cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []
    assert "1 MiB free" in caplog.text and "NREFT_CACHE_DIR" in caplog.text
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert model_spec(loaded) == model_spec(model)
    assert_same_model(model.to(torch.bfloat16), tokenizer, loaded, loaded_tokenizer)


@pytest.mark.parametrize("damage", ["truncate model.safetensors", "remove the manifest"])
def test_a_damaged_cached_conversion_is_rebuilt_with_a_warning(tmp_path, monkeypatch, caplog, damage):
    from test_train_support import char_tokenizer

    gguf = tmp_path / "tiny.gguf"  # only its bytes matter: they key the cache
    gguf.write_bytes(b"GGUF tiny stand-in")
    conversions = []

    def convert(path):
        conversions.append(path)
        return make_tiny_model("llama", seed=5), char_tokenizer()

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    model, _ = load_model(str(gguf), cache_dir=str(cache))
    (cached,) = cache.iterdir()
    if damage == "remove the manifest":
        (cached / "nreft-manifest.json").unlink()
        named = cached / "nreft-manifest.json"
    else:
        named = cached / "model.safetensors"
        cut = tmp_path / "cut"  # a new file: the loaded model may still map the old one's pages
        cut.write_bytes(named.read_bytes()[:100])
        os.replace(cut, named)
    with caplog.at_level(logging.WARNING, logger=loader.__name__):
        again, _ = load_model(str(gguf), cache_dir=str(cache))
    assert len(conversions) == 2 and f"({named} " in caplog.text and "converting it again" in caplog.text
    assert [p.name for p in cache.iterdir()] == [cached.name]
    for (name, ours), theirs in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    caplog.clear()
    load_model(str(gguf), cache_dir=str(cache))
    assert len(conversions) == 2 and not caplog.text  # intact again: loaded from the cache
