"""The `nreft` command line."""

import json

import pytest

from nreft_engine.cli import build_parser, main
from nreft_engine.models.loader import DEFAULT_MODEL
from nreft_engine.train.command import train_config
from nreft_engine.train.config import TrainConfig


@pytest.mark.slow
def test_generate_prints_completions_skipped_layers_and_speed(capsys):
    code = main(["generate", "--prompt", "What is 2 + 2?", "-n", "2", "--skip-ratio", "0.25",
                 "--max-tokens", "8", "--kv-cache-memory", str(1 << 26)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- sample") == 2
    assert "skipped layers (8/30)" in out
    assert "tok/s" in out


@pytest.mark.slow
def test_generate_json(capsys):
    code = main(["generate", "--prompt", "Hi", "--max-tokens", "4", "--json",
                 "--kv-cache-memory", str(1 << 26)])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(data[0]["completions"][0]["token_ids"]) == len(data[0]["completions"][0]["logprobs"]) <= 4


@pytest.mark.parametrize("model, message", [
    ("no-such-model", "no-such-model"), ("/nonexistent/dir", "/nonexistent/dir"),
])
def test_unknown_model_is_a_clear_error(capsys, model, message):
    assert main(["generate", "--model", model, "--prompt", "x"]) == 2
    assert message in capsys.readouterr().err


def test_bad_skip_ratio_is_a_clear_error(capsys, tmp_path):
    from tiny_models import make_tiny_model, save_tiny_model

    path = save_tiny_model(make_tiny_model("llama"), str(tmp_path / "tiny"))
    assert main(["generate", "--model", path, "--prompt", "x", "--skip-ratio", "1.5", "--raw"]) == 2
    assert "skip ratio" in capsys.readouterr().err


def test_train_defaults_are_train_config_defaults_and_the_main_job():
    args = build_parser().parse_args(["train"])
    assert train_config(args) == TrainConfig()
    assert args.model == DEFAULT_MODEL and args.kv_cache_memory == 0.1
    # the README's main job: changing these changes its trajectory and published numbers
    main_job = {"steps": 20, "prompts_per_step": 8, "group_size": 8, "max_tokens": 12, "temperature": 0.7,
                "skip_ratio": "auto", "target_ess": None, "skip_importance": True, "skip_temperature": None,
                "protect_first": 4, "protect_last": 4, "lr": 3e-5, "eval_max_tokens": 12}
    assert {k: getattr(TrainConfig(), k) for k in main_job} == main_job
    assert TrainConfig().correction.name == "tis" and TrainConfig().objective.scale_std


def test_train_options_reach_the_config():
    args = build_parser().parse_args(["train", "--no-std", "--correction", "mask", "--is-clip", "3",
                                      "--steps", "2", "--kv-cache-memory", str(1 << 26)])
    config = train_config(args)
    assert not config.objective.scale_std
    assert config.correction.name == "mask" and config.correction.clip == 3.0
    assert config.steps == 2 and args.kv_cache_memory == 1 << 26 and isinstance(args.kv_cache_memory, int)


@pytest.mark.parametrize("text, value", [
    ("0.1", 0.1), ("1.0", 1.0), (".5", 0.5), ("67108864", 1 << 26), ("512MiB", 512 << 20),
    ("64MB", 64 * 10**6), ("0.5 GiB", 1 << 29), ("4096KiB", 1 << 22),
])
def test_kv_cache_memory_is_a_fraction_with_a_decimal_point_or_a_size(text, value):
    parsed = build_parser().parse_args(["bench", "--kv-cache-memory", text]).kv_cache_memory
    assert parsed == value and type(parsed) is type(value)  # float: a fraction; int: bytes (as in the API)
