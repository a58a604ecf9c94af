"""NestedGRPOTrainer with the real TRL on the CPU: rollouts from the engine, TRL's importance-sampling
correction on the engine's behaviour log-probs, weights seen after each step, ranks, and bad setups."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from test_engine import without_layers  # noqa: E402
from test_train_support import char_tokenizer, tiny_policy, token_reward  # noqa: E402
from trl import GRPOConfig  # noqa: E402

from nreft_engine import SkipPolicy  # noqa: E402
from nreft_engine.integrations.trl import NestedGRPOTrainer  # noqa: E402

PROMPTS = ["1 + 2 = ?", "3 + 4 = ?", "5 + 6 = ?", "7 + 8 = ?"]
MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
TEMPERATURE = 0.7


def grpo_config(out_dir, **overrides) -> GRPOConfig:
    """The smallest GRPOConfig that trains on a CPU (bf16 and gradient checkpointing off)."""
    settings = dict(
        output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=6, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, temperature=TEMPERATURE, learning_rate=1e-2,
        vllm_importance_sampling_clip_max=1e9, seed=0,
    )
    return GRPOConfig(**{**settings, **overrides})


def run_trainer(out_dir, skip=None, model=None, engine_kwargs=None, **config):
    """Train 2 steps; returns the trainer and every batch TRL scored, with the model's weights at the time."""
    model = model if model is not None else tiny_policy()[0]
    model.train()

    def no_generate(*args, **kwargs):
        raise AssertionError("model.generate must not be called")

    model.generate = no_generate
    trainer = NestedGRPOTrainer(
        model=model, reward_funcs=token_reward, args=grpo_config(out_dir, **config),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}), processing_class=char_tokenizer(),
        skip=skip, engine_kwargs={"kv_cache_memory": 1 << 22, **(engine_kwargs or {})},
    )
    batches = []
    score = trainer._generate_and_score_completions

    def recording(inputs):
        out = score(inputs)
        batches.append((out, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
        return out

    trainer._generate_and_score_completions = recording
    trainer.train()
    return trainer, batches


def masked(batch: dict, key: str) -> torch.Tensor:
    return batch[key][batch["completion_mask"].bool()]


@pytest.mark.parametrize("mode", MODES)
def test_full_model_rollouts_give_ratios_of_one_in_every_mode(tmp_path, mode):
    trainer, batches = run_trainer(tmp_path, vllm_importance_sampling_mode=mode)
    assert len(batches) == 2
    for batch, _ in batches:
        ratio = batch["importance_sampling_ratio"]
        assert ratio.shape[1] == (batch["completion_ids"].shape[1] if mode.startswith("token") else 1)
        values = ratio[batch["completion_mask"].bool()] if mode.startswith("token") else ratio
        torch.testing.assert_close(values, torch.ones_like(values), rtol=0, atol=1e-5)
    logged = [r for r in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in r]
    assert len(logged) == 2 and all(r["nreft/num_skipped_layers"] == 0 for r in logged)
    assert all("sampling/sampling_logp_difference/max" in r for r in logged)
    assert all(r["nreft/rollout_tokens_per_s"] > 0 for r in logged)


@pytest.mark.parametrize("prepack", [False, True])
def test_rollouts_after_an_optimizer_step_run_the_updated_weights(tmp_path, prepack):
    """The engine on the model's own weights (the CPU default), and on packed copies re-packed per step."""
    trainer, batches = run_trainer(tmp_path, engine_kwargs={"prepack_weights": True} if prepack else None)
    assert trainer.engine.runner.prepack_weights is prepack
    (first, weights_1), (second, weights_2) = batches
    assert any(not torch.equal(weights_1[k], weights_2[k]) for k in weights_1)  # the step changed the model
    torch.testing.assert_close(
        masked(second, "sampling_per_token_logps"), masked(second, "old_per_token_logps"), rtol=0, atol=1e-5
    )


def test_fixed_skip_set_log_ratios_are_full_minus_layer_deleted_log_probs(tmp_path):
    skipped = [1, 2]
    trainer, batches = run_trainer(tmp_path, skip=skipped, vllm_importance_sampling_mode="token_truncate")
    for batch, weights in batches:
        model = tiny_policy()[0]
        model.load_state_dict(weights)
        full, behaviour = model.eval(), without_layers(model, skipped).eval()
        expected = []
        for p_ids, p_mask, c_ids, c_mask in zip(
            batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
        ):
            prompt, completion = p_ids[p_mask.bool()].tolist(), c_ids[c_mask.bool()].tolist()
            expected.append(_logprobs(full, prompt, completion) - _logprobs(behaviour, prompt, completion))
        log_ratio = torch.log(masked(batch, "importance_sampling_ratio"))
        torch.testing.assert_close(log_ratio, torch.cat(expected), rtol=0, atol=1e-4)
    assert all(r["nreft/skipped_layers"] == "1 2" for r in trainer.state.log_history if "loss" in r)


def _logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion]), use_cache=False).logits[0, len(prompt) - 1 : -1]
    return (logits / TEMPERATURE).log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


class Wrapped(torch.nn.Module):
    """A stand-in for DDP's wrapper: the model inside, called through its forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_logprobs_with_each_prompt_run_once_equal_trls_per_row_forward(tmp_path, monkeypatch):
    """On a scored batch (2 prompts x 2 rows): the log-probs, entropies and gradients equal GRPOTrainer's
    own per-row computation (1e-5, 1e-5, 1e-4 relative), from one row per prompt; a wrapped model (DDP)
    with gradients takes TRL's path."""
    from nreft_engine.integrations import trl as integration

    trainer, batches = run_trainer(tmp_path, max_steps=1)
    batch, _ = batches[-1]
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    keep, model = batch["completion_ids"].shape[1], trainer.model
    packed_rows = []
    real = integration.completion_hidden
    monkeypatch.setattr(integration, "completion_hidden",
                        lambda m, groups: packed_rows.append(len(groups)) or real(m, groups))

    def scores(compute, module):
        model.zero_grad()
        logps, entropy, _ = compute(module, ids, mask, keep, compute_entropy=True)
        (logps * batch["completion_mask"]).sum().backward()
        return logps.detach(), entropy, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours = scores(trainer._get_per_token_logps_and_entropies, model)
    assert packed_rows == [2] and ids.shape[0] == 4
    stock = trl.GRPOTrainer._get_per_token_logps_and_entropies
    theirs = scores(lambda *args, **kwargs: stock(trainer, *args, **kwargs), model)
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=1e-5)
    assert len(ours[2]) == len(theirs[2])
    for a, b in zip(ours[2], theirs[2]):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    wrapped = scores(trainer._get_per_token_logps_and_entropies, Wrapped(model))
    assert packed_rows == [2]  # not called again: TRL's own forward
    torch.testing.assert_close(wrapped[0], theirs[0], rtol=0, atol=0)


def test_skip_policy_draws_one_set_per_optimizer_step_reproducibly(tmp_path):
    policy = SkipPolicy(0.25, seed=3)
    model = tiny_policy(num_hidden_layers=8)[0]
    trainer, _ = run_trainer(tmp_path, skip=policy, model=model, max_steps=3)
    sets = [r["nreft/skipped_layers"] for r in trainer.state.log_history if "loss" in r]
    assert sets == [" ".join(map(str, policy.plan_for(8, step, 0).skipped)) for step in range(3)]
    assert len(set(sets)) > 1


def test_micro_batches_of_one_step_share_its_skip_set_but_not_their_samples(tmp_path):
    """Gradient accumulation: two rollouts per optimizer step, the same prompts, one skip set."""
    calls = []
    trainer, _ = run_trainer(
        tmp_path, skip=SkipPolicy(0.5, seed=3), max_steps=1, gradient_accumulation_steps=2,
        per_device_train_batch_size=2, num_generations=2,
    )
    assert trainer.state.global_step == 1
    generation = trainer.nreft_generation
    plan = generation.plan

    def recording(step, rank, training):
        calls.append(plan(step, rank, training))
        return calls[-1]

    generation.plan = recording
    first = generation.generate(prompts=[[4, 5, 6]] * 2)
    second = generation.generate(prompts=[[4, 5, 6]] * 2)
    assert calls[0] == calls[1] and calls[0].skipped
    assert first[1] != second[1]


@pytest.mark.parametrize(
    "setup, message",
    [
        (dict(config=dict(top_p=0.9)), "top_p=0.9.*allow_inexact_ratios"),
        (dict(config=dict(top_k=5)), "top_k=5.*recomputes log-probs under temperature only"),
        (dict(config=dict(min_p=0.1)), "min_p=0.1"),
        (dict(skip=SkipPolicy(0.9)), "only 2 are eligible"),
        (dict(model="gpt2"), "this architecture is not supported"),
        (dict(peft_config=object()), "PEFT"),
        (dict(config=dict(repetition_penalty=1.2)), "repetition_penalty"),
        (dict(config=dict(fsdp="full_shard")), "FSDP and DeepSpeed ZeRO-3"),
        (dict(config=dict(use_vllm=True)), "use_vllm=False"),
    ],
)
def test_bad_setups_fail_before_training_with_nothing_written(tmp_path, setup, message):
    out = tmp_path / "out"
    model = tiny_policy()[0]
    if setup.get("model") == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128))
    extra = {"peft_config": setup["peft_config"]} if "peft_config" in setup else {}
    with pytest.raises(ValueError, match=message):
        NestedGRPOTrainer(
            model=model, reward_funcs=token_reward, args=grpo_config(out, **setup.get("config", {})),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=char_tokenizer(),
            skip=setup.get("skip"), **extra,
        )
    assert not out.exists()


def test_inexact_ratios_run_when_opted_in(tmp_path):
    model = tiny_policy()[0]
    trainer = NestedGRPOTrainer(
        model=model, reward_funcs=token_reward, args=grpo_config(tmp_path, top_p=0.9, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=char_tokenizer(),
        allow_inexact_ratios=True, engine_kwargs={"kv_cache_memory": 1 << 22},
    )
    trainer.train()
    assert trainer.state.global_step == 1


WORKER = os.path.join(os.path.dirname(__file__), "trl_ddp_worker.py")


@pytest.mark.slow
def test_two_ranks_under_torchrun_each_generate_their_own_rows(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(__file__)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           WORKER, str(tmp_path)]
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=300)
    finally:
        if run.poll() is None:  # timed out: stop torchrun and both ranks
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["steps"] == 2 and len(rank["rows"]) == 2 * 2  # 2 steps x its 2 of the step's 4 rows
    assert ranks[0]["prompts"] == ranks[1]["prompts"]  # one prompt's group, split over the two ranks
    assert ranks[0]["rows"] != ranks[1]["rows"]  # rank-specific seeds: no duplicated samples


def test_unsupported_model_given_by_name_is_refused_after_loading(tmp_path):
    path = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(path)
    with pytest.raises(ValueError, match="this architecture is not supported"):
        NestedGRPOTrainer(
            model=str(path), reward_funcs=token_reward, args=grpo_config(tmp_path / "out"),
            train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=char_tokenizer(),
        )
