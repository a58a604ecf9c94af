"""The `nreft` rollout backend driven by verl's own managers on a local Ray cluster (CPU, tiny model).

verl's trainer needs CUDA, so a stand-in trainer worker (tests/verl_stand_in.py) does its naive weight sync;
the rest is verl's: LLMServerManager launches two `nreft` replicas, CheckpointEngineManager (naive) sleeps
them and syncs weights, AgentLoopManager generates, and rollout_corr_helper computes the IS weights.
These tests need verl, which has a venv of its own (`make test` runs them in .venv-verl).
"""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed here; `make test` runs these in .venv-verl")
ray = pytest.importorskip("ray")

from hydra import compose, initialize_config_dir  # noqa: E402
from tiny_models import make_tiny_model  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.checkpoint_engine.base import CheckpointEngineManager  # noqa: E402
from verl.experimental.agent_loop.agent_loop import AgentLoopManager  # noqa: E402
from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup  # noqa: E402
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch  # noqa: E402
from verl.utils.config import omega_conf_to_dataclass  # noqa: E402
from verl.workers.rollout.llm_server import LLMServerManager  # noqa: E402

from nreft_engine.integrations.verl.replica import SERVER_NAME  # noqa: E402
from nreft_engine.integrations.verl.server import SKIPPED_FIELD  # noqa: E402

TESTS = Path(__file__).resolve().parent
PROMPT_LENGTH, RESPONSE_LENGTH = 16, 8


def save_tiny_model_dir(path: Path) -> str:
    """A tiny llama with a word-level tokenizer ("t3" ... "t127") and a chat template, as an HF directory."""
    model = make_tiny_model("llama")
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, 128)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(path)
    return str(path)


def trainer_config(model_path: str):
    """verl's ppo_trainer config for two nreft replicas on the CPU (overrides as a user would set them)."""
    config_dir = str(Path(verl.__file__).parent / "trainer" / "config")
    overrides = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.rollout.name=nreft",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        f"actor_rollout_ref.rollout.prompt_length={PROMPT_LENGTH}",
        f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "actor_rollout_ref.rollout.n_gpus_per_node=2",
        "actor_rollout_ref.rollout.checkpoint_engine.backend=naive",
        "+actor_rollout_ref.rollout.engine_kwargs.nreft.skip_ratio=0.5",
        "+actor_rollout_ref.rollout.engine_kwargs.nreft.protect_first=0",
        "+actor_rollout_ref.rollout.engine_kwargs.nreft.protect_last=0",
        "+actor_rollout_ref.rollout.engine_kwargs.nreft.kv_cache_memory=4194304",
        "+actor_rollout_ref.rollout.engine_kwargs.nreft.dtype=float32",
        "trainer.n_gpus_per_node=2",
        "algorithm.rollout_correction.rollout_is=token",
        "algorithm.rollout_correction.rollout_is_threshold=2.0",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def verl_setup(tmp_path_factory):
    model_path = save_tiny_model_dir(tmp_path_factory.mktemp("tiny"))
    config = trainer_config(model_path)
    python_path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=8, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": python_path}})
    from verl_stand_in import StandInTrainer

    rollout = config.actor_rollout_ref.rollout
    pool = RayResourcePool([2], use_gpu=False, max_colocate_count=1)
    init = RayClassWithInitArgs(cls=ray.remote(StandInTrainer), rollout_config=rollout,
                                model_config=config.actor_rollout_ref.model, model_path=model_path)
    trainer = RayWorkerGroup(resource_pool=pool, ray_cls_with_init=init, use_gpu=False)
    servers = LLMServerManager.create(config, worker_group=trainer)
    checkpoints = CheckpointEngineManager(
        omega_conf_to_dataclass(rollout.checkpoint_engine), trainer, servers.get_replicas()
    )
    agents = AgentLoopManager.create(config, llm_client=servers.get_client())
    yield config, trainer, servers, checkpoints, agents, model_path
    ray.shutdown()


def prompts_batch(count: int) -> DataProto:
    gen = np.random.default_rng(0)
    messages = [[{"role": "user", "content": " ".join(f"t{t}" for t in gen.integers(3, 128, 5 + i % 6))}]
                for i in range(count)]
    return DataProto.from_dict(non_tensors={"raw_prompt": np.array(messages, dtype=object),
                                            "data_source": np.array(["tiny"] * count, dtype=object)})


def recompute(model, batch: DataProto, skipped_per_row) -> torch.Tensor:
    """Per-token log-probs of each response under `model` with the row's layers deleted (temperature 1)."""
    out = torch.zeros_like(batch.batch["rollout_log_probs"])
    layers = model.model.layers
    for row, skipped in enumerate(skipped_per_row):
        model.model.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i not in set(skipped)])
        ids = batch.batch["input_ids"][row][batch.batch["attention_mask"][row].bool()]
        n = int(batch.batch["response_mask"][row].sum())
        with torch.no_grad():
            logits = model(ids[None], use_cache=False).logits[0, -n - 1 : -1]
        out[row, :n] = logits.log_softmax(-1).gather(1, ids[-n:, None]).squeeze(1)
    model.model.layers = layers
    return out


def sync_and_generate(checkpoints, agents, step: int, count: int = 8) -> DataProto:
    checkpoints.sleep_replicas()
    checkpoints.update_weights(global_steps=step)
    batch = prompts_batch(count)
    batch.meta_info["global_steps"] = step
    return agents.generate_sequences(batch)


def test_generate_sequences_shapes_log_probs_and_skip_sets(verl_setup):
    config, trainer, servers, checkpoints, agents, model_path = verl_setup
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    out = sync_and_generate(checkpoints, agents, step=1)
    b = out.batch
    assert b["prompts"].shape == (8, PROMPT_LENGTH) and b["responses"].shape == (8, RESPONSE_LENGTH)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert b[key].shape == (8, PROMPT_LENGTH + RESPONSE_LENGTH), key
    assert b["response_mask"].shape == b["rollout_log_probs"].shape == (8, RESPONSE_LENGTH)
    skipped = [tuple(s) for s in out.non_tensor_batch[SKIPPED_FIELD]]
    assert all(len(s) == 2 for s in skipped)
    expected = recompute(model, out, skipped)
    mask = b["response_mask"].bool()
    torch.testing.assert_close(b["rollout_log_probs"][mask], expected[mask], atol=1e-4, rtol=0)
    again = sync_and_generate(checkpoints, agents, step=2)
    assert {tuple(s) for s in again.non_tensor_batch[SKIPPED_FIELD]} != set(skipped)


def test_rollout_is_weights_are_one_on_the_full_model(verl_setup):
    config, trainer, servers, checkpoints, agents, model_path = verl_setup
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    for i in range(2):
        ray.get(ray.get_actor(SERVER_NAME.format(replica=i, suffix="")).__ray_call__.remote(
            lambda server: server.server.set_skip(None)))
    try:
        batch = sync_and_generate(checkpoints, agents, step=3)
    finally:
        for i in range(2):
            ray.get(ray.get_actor(SERVER_NAME.format(replica=i, suffix="")).__ray_call__.remote(
                lambda server: server.server.set_skip(server.skip_policy, server.global_steps)))
    assert all(len(s) == 0 for s in batch.non_tensor_batch[SKIPPED_FIELD])
    batch.batch["old_log_probs"] = recompute(model, batch, [()] * len(batch))
    corrected, _ = compute_rollout_correction_and_add_to_batch(batch, config.algorithm.rollout_correction)
    weights = corrected.batch["rollout_is_weights"][corrected.batch["response_mask"].bool()]
    torch.testing.assert_close(weights, torch.ones_like(weights), atol=1e-5, rtol=0)


def test_update_weights_changes_the_rollout_and_bad_weights_change_nothing(verl_setup):
    config, trainer, servers, checkpoints, agents, model_path = verl_setup
    original = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trainer.scale_weights(1.5)  # the trainer's model moves on; a bad update must not carry it over
    for name, shape in (("model.layers.0.mlp.nonsense.weight", (4,)), ("model.norm.weight", (3, 3))):
        errors = trainer.send_bad_weights(name, shape)
        assert all(name in e for e in errors), errors
    unchanged = agents.generate_sequences(prompts_batch(4))
    scaled = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        for name, param in scaled.named_parameters():
            if "proj" in name:
                param.mul_(1.5)
    updated = sync_and_generate(checkpoints, agents, step=4)
    for out, model in ((unchanged, original), (updated, scaled)):
        expected = recompute(model, out, [tuple(s) for s in out.non_tensor_batch[SKIPPED_FIELD]])
        mask = out.batch["response_mask"].bool()
        torch.testing.assert_close(out.batch["rollout_log_probs"][mask], expected[mask], atol=1e-4, rtol=0)


def test_the_backend_registers_through_verl_use_external_modules_too():
    code = ("import verl; from verl.workers.rollout.base import _ROLLOUT_REGISTRY; "
            "from verl.workers.rollout.replica import RolloutReplicaRegistry; "
            "print(_ROLLOUT_REGISTRY[('nreft', 'async')], RolloutReplicaRegistry.get('nreft').__name__)")
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": "none",
           "VERL_USE_EXTERNAL_MODULES": "nreft_engine.integrations.verl"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["nreft_engine.integrations.verl.adapter.NreftServerAdapter", "NreftReplica"]
    from importlib.metadata import entry_points

    assert [ep.value for ep in entry_points(group="verl.plugins") if ep.name == "nreft"] == [
        "nreft_engine.integrations.verl"
    ]


def test_sleep_releases_the_kv_cache_and_wake_up_restores_it(verl_setup):
    config, trainer, servers, checkpoints, agents, model_path = verl_setup
    server = ray.get_actor(SERVER_NAME.format(replica=0, suffix=""))
    before = ray.get(server.kv_cache_reserved_bytes.remote())
    assert before == 4194304
    checkpoints.sleep_replicas()
    assert ray.get(server.kv_cache_reserved_bytes.remote()) == 0
    checkpoints.update_weights(global_steps=5)  # the worker resumes the kv cache at its end
    assert ray.get(server.kv_cache_reserved_bytes.remote()) == before
    out = agents.generate_sequences(prompts_batch(4))
    assert out.batch["responses"].shape == (4, RESPONSE_LENGTH)


def test_bad_sampling_params_name_the_value_and_the_server_keeps_serving(verl_setup):
    server = ray.get_actor(SERVER_NAME.format(replica=1, suffix=""))
    bad = [({"top_p": 1.5}, "top_p"), ({"temperature": 1.0, "beam_width": 2}, "beam_width"),
           ({"repetition_penalty": 1.2}, "repetition_penalty")]
    for params, name in bad:
        with pytest.raises(ray.exceptions.RayTaskError, match=name):
            ray.get(server.generate.remote([5, 6, 7], params, f"bad-{name}"))
    with pytest.raises(ray.exceptions.RayTaskError, match="context"):
        ray.get(server.generate.remote([5] * 100, {"temperature": 1.0}, "too-long"))

    async def both():
        good = server.generate.remote([5, 6, 7], {"temperature": 1.0, "logprobs": True}, "good")
        return await good

    out = asyncio.run(both())
    assert out.stop_reason == "completed" and len(out.token_ids) == len(out.log_probs) > 0


def test_rollout_config_keys_are_checked():
    from types import SimpleNamespace

    from nreft_engine.integrations.verl import options

    def rollout(**nreft):
        return SimpleNamespace(engine_kwargs={"nreft": nreft}, max_model_len=None, prompt_length=16,
                               response_length=8, max_num_seqs=64, max_num_batched_tokens=512,
                               enforce_eager=False, dtype="bfloat16")

    assert options.engine_options(rollout(kv_cache_memory=0.2)) == {
        "max_num_seqs": 64, "max_num_batched_tokens": 512, "max_model_len": 24, "enforce_eager": False,
        "kv_cache_memory": 0.2,
    }
    assert options.model_dtype(rollout()) is torch.bfloat16
    policy = options.skip_spec(rollout(skip_ratio=0.25, skip_seed=3))
    assert (policy.ratio, policy.protect_first, policy.seed) == (0.25, 1, 3)
    assert options.skip_spec(rollout(skip_layers=[1, 2])) == [1, 2] and options.skip_spec(rollout()) is None
    with pytest.raises(ValueError, match="skip_rate"):
        options.engine_options(rollout(skip_rate=0.25))
    with pytest.raises(ValueError, match="not both"):
        options.skip_spec(rollout(skip_ratio=0.25, skip_layers=[1]))
    with pytest.raises(ValueError, match="'fp33'"):
        options.model_dtype(rollout(dtype="fp33"))
    params = options.sampling_params({"temperature": 0.7, "top_k": -1, "logprobs": True}, 8)
    assert (params.temperature, params.top_k, params.max_tokens, params.n) == (0.7, -1, 8, 1)
