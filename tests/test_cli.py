"""The `nreft` command line."""

import json

import pytest

from nreft_engine.cli import main


@pytest.mark.slow
def test_generate_prints_completions_skipped_layers_and_speed(capsys):
    code = main(["generate", "--prompt", "What is 2 + 2?", "-n", "2", "--skip-ratio", "0.25", "--max-tokens", "8",
                 "--kv-cache-memory", str(1 << 26)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- sample") == 2
    assert "skipped layers (8/30)" in out
    assert "tok/s" in out


@pytest.mark.slow
def test_generate_json(capsys):
    code = main(["generate", "--prompt", "Hi", "--max-tokens", "4", "--json", "--kv-cache-memory", str(1 << 26)])
    data = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(data[0]["completions"][0]["token_ids"]) == len(data[0]["completions"][0]["logprobs"]) <= 4


@pytest.mark.parametrize("model, message", [("no-such-model", "no-such-model"), ("/nonexistent/dir", "/nonexistent/dir")])
def test_unknown_model_is_a_clear_error(capsys, model, message):
    assert main(["generate", "--model", model, "--prompt", "x"]) == 2
    assert message in capsys.readouterr().err


def test_bad_skip_ratio_is_a_clear_error(capsys, tmp_path):
    from tiny_models import make_tiny_model, save_tiny_model

    path = save_tiny_model(make_tiny_model("llama"), str(tmp_path / "tiny"))
    assert main(["generate", "--model", path, "--prompt", "x", "--skip-ratio", "1.5", "--raw"]) == 2
    assert "skip ratio" in capsys.readouterr().err
