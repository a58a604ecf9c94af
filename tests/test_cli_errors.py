"""Every expected failure of `nreft` is one line, `nreft: error: ...`, exit code 2, naming the file or value,
and comes before the model loads where it can; `--debug` shows the traceback, and a bug always does."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
from test_train_support import char_tokenizer
from tiny_models import make_tiny_model, save_tiny_model

from nreft_engine import cli
from nreft_engine.models.loader import DEFAULT_MODEL, embedded_gguf_path
from nreft_engine.train import checkpoint, command
from nreft_engine.train.loop import Trainer
from nreft_engine.train.metrics import read_metrics
from nreft_engine.train.rewards import resolve_reward


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny Llama with the character tokenizer (and its chat template), saved as a model directory."""
    path = save_tiny_model(make_tiny_model("llama"), str(tmp_path_factory.mktemp("tiny") / "model"))
    char_tokenizer().save_pretrained(path)
    return path


def tiny_train(model: str, out, *extra: str) -> list[str]:
    """`nreft train` argv of a run of the tiny model that takes about a second (1 step, 4 held-out)."""
    return ["train", "--model", model, "--output-dir", str(out), "--steps", "1", "--prompts-per-step", "2",
            "--group-size", "2", "--max-tokens", "3", "--eval-max-tokens", "3", "--num-heldout", "4",
            "--kv-cache-memory", "16MiB", "--protect-first", "1", "--protect-last", "1",
            "--skip-ratio", "0.25", "--no-skip-importance", *extra]


def assert_one_line_error(capsys, *parts: str) -> None:
    """stderr ends with one line `nreft: error: ...` holding each of `parts`, with no traceback (progress bars
    of what ran before may precede it)."""
    err = capsys.readouterr().err
    *before, line, end = err.split("\n")
    assert line.startswith("nreft: error: ") and end == "" and "Traceback" not in err, err
    assert not any("nreft: error:" in b for b in before) and all(part in line for part in parts), err


def _damaged_copy(tiny_dir: str, target, damage: str) -> str:
    path = str(shutil.copytree(tiny_dir, target))
    weights = os.path.join(path, "model.safetensors")
    if damage == "config.json not JSON":
        with open(os.path.join(path, "config.json"), "w") as f:
            f.write('{"model_type": "llama",')
    elif damage == "weights missing":
        os.remove(weights)
    else:
        with open(weights, "r+b") as f:
            f.truncate(os.path.getsize(weights) // 2)
    return path


@pytest.mark.parametrize("damage, shown", [
    ("config.json not JSON", "config.json"), ("weights missing", "no file named model.safetensors"),
    ("weights truncated", "Error while deserializing header"),
])
def test_an_unreadable_model_directory_names_it(capsys, tmp_path, tiny_dir, damage, shown):
    path = _damaged_copy(tiny_dir, tmp_path / "model", damage)
    assert cli.main(["generate", "--model", path, "--prompt", "x", "--raw"]) == 2
    assert_one_line_error(capsys, f"cannot read the {'config of' if 'config' in damage else 'weights in'} "
                                  f"{path}", shown)


@pytest.mark.parametrize("size", [1000, 3_000_000])  # inside the header, inside the tensors
def test_a_truncated_gguf_names_the_file_and_caches_nothing(capsys, tmp_path, monkeypatch, size):
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(DEFAULT_MODEL), "rb") as f:
        path.write_bytes(f.read(size))
    monkeypatch.setenv("NREFT_CACHE_DIR", str(tmp_path / "cache"))
    assert cli.main(["generate", "--model", str(path), "--prompt", "x"]) == 2
    assert_one_line_error(capsys, f"cannot read the GGUF file {path}")
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


@pytest.mark.parametrize("value, message", [
    ("1e15", "'1e15' is neither a fraction of the free memory"),
    ("1000TB", "1000TB asks for 909.5 TiB of memory but"),
    ("1", "1 reads as bytes, too few for a KV cache; write a fraction with a decimal point (1.0 = all"),
    ("1.5", "a fraction of the free memory must be in (0, 1]"),
])
def test_a_bad_kv_cache_memory_fails_before_loading(capsys, value, message):
    argv = ["generate", "--model", "no-such-model", "--prompt", "x", "--kv-cache-memory", value]
    assert cli.main(argv) == 2
    assert_one_line_error(capsys, "argument --kv-cache-memory: ", message)


@pytest.mark.parametrize("argv, message", [
    (["bench", "--num-prompts", "0"], "--num-prompts 0: must be at least 1"),
    (["bench", "-n", "0"], "n must be an integer >= 1, got 0"),
    (["bench", "--skip-ratios", "0", "1.5"], "skip ratio must be in [0, 1), got 1.5"),
    (["generate", "--prompt", "x", "--max-tokens", "0"], "max_tokens must be an integer >= 1, got 0"),
    (["generate", "--prompt", "x", "--block-size", "0"], "--block-size 0: must be at least 1"),
    (["train", "--steps", "x"], "argument --steps: invalid int value: 'x' (see `nreft train --help`)"),
])
def test_bench_and_generate_options_fail_before_loading(capsys, argv, message):
    assert cli.main([argv[0], "--model", "no-such-model", *argv[1:]]) == 2
    assert_one_line_error(capsys, message)


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-1"], "--steps -1: must be an integer >= 1"),
    (["--prompts-per-step", "0"], "--prompts-per-step 0: must be an integer >= 1"),
    (["--group-size", "1"], "--group-size 1: must be an integer >= 2: GRPO learns from the reward"),
    (["--group-size", "0"], "--group-size 0: must be an integer >= 2"),
    (["--ppo-epochs", "0"], "--ppo-epochs 0: must be an integer >= 1 (0 epochs train nothing)"),
    (["--max-tokens", "0"], "--max-tokens 0: must be an integer >= 1"),
    (["--chunk-size", "0"], "--chunk-size 0: must be an integer >= 1"),
    (["--skip-ratio", "1.2"], "--skip-ratio 1.2: must be in [0, 1)"),
    (["--lr", "nan"], "--lr nan: must be > 0"),
    (["--temperature", "0"], "--temperature 0.0: must be > 0"),
    (["--num-heldout", "0"], "--num-heldout 0: must be an integer >= 1"),
    (["--throughput-skip-ratio", "1"], "--throughput-skip-ratio 1.0: must be in [0, 1)"),
    (["--dataset", "gsm8k", "--data-path", "{empty}"], "dataset file {empty} is empty"),
    (["--dataset", "gsm8k", "--data-path", "{broken}"], "dataset file {broken} line 2 is not JSON"),
    (["--reward", "no_such_module:fn"], "reward 'no_such_module:fn': no module named 'no_such_module' in"),
])
def test_train_options_fail_before_loading_with_nothing_written(capsys, tmp_path, argv, message):
    files = {"empty": tmp_path / "empty.jsonl", "broken": tmp_path / "broken.jsonl"}
    files["empty"].write_text("")
    files["broken"].write_text('{"question": "1 + 1", "answer": "#### 2"}\n{"question": "2 + 2",\n')
    argv, message = [a.format(**files) for a in argv], message.format(**files)
    out = tmp_path / "out"
    assert cli.main(["train", "--model", "no-such-model", "--output-dir", str(out), *argv]) == 2
    assert_one_line_error(capsys, message)
    assert not out.exists()


@pytest.mark.parametrize("option", ["--skip-ratio", "--throughput-skip-ratio"])
def test_a_skip_ratio_the_model_cannot_take_fails_before_any_evaluation(capsys, tmp_path, monkeypatch,
                                                                        tiny_dir, option):
    def no_evaluation(self, problems=None):
        raise AssertionError("evaluated before checking the skip ratio")

    monkeypatch.setattr(Trainer, "evaluate", no_evaluation)
    out = tmp_path / "out"
    assert cli.main(tiny_train(tiny_dir, out, option, "0.9")) == 2
    assert_one_line_error(capsys, "skip ratio 0.9 asks for 4 of 4 layers but only 2 are eligible")
    assert not out.exists()


def test_a_reward_module_in_the_current_folder_is_found(tmp_path, monkeypatch):
    (tmp_path / "my_reward_module.py").write_text("def fn(prompts, completions, **kw):\n    return [1.0]\n")
    monkeypatch.chdir(tmp_path)
    assert importlib.util.find_spec("my_reward_module") is None  # as for `nreft`: sys.path lacks the folder
    path = list(sys.path)
    assert resolve_reward("my_reward_module:fn").__module__ == "my_reward_module"
    assert sys.path == path
    del sys.modules["my_reward_module"]


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_an_output_dir_that_cannot_be_written_fails_at_once(capsys, tmp_path, kind):
    out = tmp_path / "file"
    out.write_text("")
    # /sys refuses new folders even to root (where permission bits would not)
    target = str(out) if kind == "a file" else "/sys/nreft-test-run"
    assert cli.main(["train", "--model", "no-such-model", "--output-dir", target]) == 2
    assert_one_line_error(capsys, f"output dir {target} ", "not a folder" if kind == "a file" else
                          "cannot be written")


@pytest.mark.parametrize("failure", ["no room", "write fails"])
def test_a_full_disk_while_saving_names_the_checkpoint_and_leaves_no_partial_one(
    capsys, tmp_path, monkeypatch, tiny_dir, failure
):
    if failure == "no room":
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(free=2**20))
    else:  # torch.save reports a full disk as a RuntimeError
        def full(*args, **kwargs):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

        monkeypatch.setattr(checkpoint.torch, "save", full)
    out = tmp_path / "out"
    assert cli.main(tiny_train(tiny_dir, out)) == 2
    root = out / "checkpoints"
    assert_one_line_error(capsys, f"cannot write checkpoint {root / 'step-000001'}",
                          "has 1 MiB free and it needs" if failure == "no room" else "unexpected pos")
    assert os.listdir(root) == []
    assert [r["type"] for r in read_metrics(str(out / "metrics.jsonl"))] == ["eval", "train"]


def test_a_changed_dataset_or_lr_is_refused_before_loading_and_steps_extend_when_allowed(
    capsys, tmp_path, monkeypatch, tiny_dir
):
    out = tmp_path / "out"
    assert cli.main(tiny_train(tiny_dir, out)) == 0
    capsys.readouterr()
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(f'{{"question": "{i} + 1", "answer": "#### {i + 1}"}}\n' for i in range(8)))
    load_model = command.load_model
    monkeypatch.setattr(command, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(tiny_train(tiny_dir, out, "--dataset", "gsm8k", "--data-path", str(data),
                               "--lr", "1e-4")) == 2
    assert_one_line_error(capsys, "dataset: 'arithmetic' -> 'gsm8k'", "lr: 3e-05 -> 0.0001",
                          f"data_path: None -> '{data}'")
    assert cli.main(tiny_train(tiny_dir, out, "--steps", "2")) == 2
    assert_one_line_error(capsys, "(steps: 1 -> 2)", "--allow-config-change")
    monkeypatch.setattr(command, "load_model", load_model)
    assert cli.main(tiny_train(tiny_dir, out, "--steps", "2", "--allow-config-change")) == 0
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [(r["type"], r["step"]) for r in records] == [("eval", 0), ("train", 1), ("eval", 1), ("train", 2),
                                                         ("eval", 2)]


def test_debug_shows_the_traceback_and_a_bug_always_does(monkeypatch):
    for argv in (["--debug", "bench", "--num-prompts", "0"], ["bench", "--num-prompts", "0", "--debug"]):
        with pytest.raises(ValueError, match="--num-prompts 0"):
            cli.main(argv)

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_bench", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["bench"])
