"""NreftServer: the Ray actor verl's agent loop sends requests to, one per replica, over an AsyncEngine.

verl calls `generate` once per sample, each in its own coroutine: they all join one continuous batch. The
skip set is drawn once per global step (`set_global_steps`) and travels back with every sample as the
`nreft_skipped_layers` extra field (a non-tensor column of verl's batch). `sleep` releases the KV cache
while the trainer runs (the weights stay: verl's trainer updates them in place through the adapter).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import torch
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import HFModelConfig
from verl.workers.rollout.replica import TokenOutput

from nreft_engine.async_engine import AsyncEngine
from nreft_engine.engine import Engine
from nreft_engine.integrations.verl import options
from nreft_engine.integrations.verl.weights import WeightUpdate
from nreft_engine.models.loader import load_model

logger = logging.getLogger(__name__)

SKIPPED_FIELD = "nreft_skipped_layers"  # the extra field (verl batch column) with each sample's skip set


class NreftServer:
    """verl's rollout server contract (the methods its replica, manager and adapter call) over the engine."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int, cuda_visible_devices: str | None):
        if cuda_visible_devices:
            os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
        self.config = config = omega_conf_to_dataclass(config)
        model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.replica_rank = replica_rank
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer = load_model(model_config.local_path, dtype=options.model_dtype(config))
        self.engine = Engine(model.to(device), tokenizer, **options.engine_options(config))
        self.skip_policy = options.skip_spec(config)
        self.server = AsyncEngine(self.engine, skip=self.skip_policy, rank=replica_rank)
        self.global_steps: int | None = None
        self._update: WeightUpdate | None = None
        logger.info("nreft server %d: %s on %s, skip %s", replica_rank, model_config.local_path, device,
                    self.skip_policy)

    async def generate(
        self, prompt_ids: list[int], sampling_params: dict[str, Any], request_id: str,
        image_data: Any = None, video_data: Any = None, audio_data: Any = None,
        mm_processor_kwargs: dict | None = None, priority: int = 0, **kwargs: Any,
    ) -> TokenOutput:
        """One sample of `prompt_ids`: its tokens, behaviour log-probs (if `logprobs`) and skip set."""
        if image_data is not None or video_data is not None or audio_data is not None:
            raise ValueError("the nreft rollout runs text decoders only: no image, video or audio input")
        budget = self.engine.max_model_len - len(prompt_ids)
        default = min(self.config.response_length,
                      self.config.prompt_length + self.config.response_length - len(prompt_ids))
        params = options.sampling_params(dict(sampling_params), max(1, min(default, budget)))
        out = await self.server.generate(list(prompt_ids), params, request_id)
        completion = out.outputs[0]
        return TokenOutput(
            token_ids=completion.token_ids,
            log_probs=completion.logprobs if sampling_params.get("logprobs") else None,
            stop_reason="aborted" if completion.finish_reason == "abort" else "completed",
            extra_fields={"global_steps": self.global_steps, SKIPPED_FIELD: list(out.skipped_layers)},
        )

    async def set_global_steps(self, global_steps: int) -> None:
        """Record the weights' step and draw its skip set: requests from now on run with it."""
        self.global_steps = global_steps
        self.server.start_epoch(global_steps)

    async def sleep(self) -> None:
        """Release the KV cache (once the running batch ends) when verl frees the engine between steps."""
        if self.config.free_cache_engine:
            await self.server.sleep()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Reserve the KV cache again (tag "kv_cache", or no tags); the weights never left."""
        if tags is None or "kv_cache" in tags:
            await self.server.wake_up()

    async def release_kv_cache(self) -> None:
        await self.sleep()

    async def resume_kv_cache(self) -> None:
        await self.wake_up(["kv_cache"])

    async def clear_kv_cache(self) -> None:
        """Nothing to reset: the engine keeps no prefix cache between requests."""

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False) -> dict:
        """Abort every request in flight; each returns what it had sampled with stop_reason "aborted"."""
        count = self.server.abort_all()
        return {"aborted_count": count, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True) -> dict:
        return {"aborted": self.server.abort(request_id), "request_id": request_id}

    async def resume_generation(self) -> None:
        """Nothing paused: aborting never stops the engine from taking new requests."""

    async def wait_for_requests_to_drain(self) -> None:
        while self.server.num_in_flight:
            await asyncio.sleep(0.01)

    async def start_profile(self, **kwargs: Any) -> None:
        """Profiling is not wired to the engine; verl's call is accepted and ignored."""

    async def stop_profile(self) -> None:
        """See `start_profile`."""

    async def begin_weight_update(self) -> None:
        """Start a weight update: buckets follow through `stage_weights`, then `commit_weights`."""
        self._update = WeightUpdate(self.engine)

    async def stage_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Check and keep one bucket; a bad tensor raises (naming it) and drops the whole update."""
        if self._update is None:
            raise RuntimeError("stage_weights before begin_weight_update")
        try:
            self._update.stage(named_tensors)
        except Exception:
            self._update = None
            raise

    async def commit_weights(self, global_steps: int | None = None) -> int:
        """Load the staged weights into the engine; returns how many tensors were loaded."""
        if self._update is None:
            raise RuntimeError("commit_weights without a staged update (begin_weight_update, stage_weights)")
        update, self._update = self._update, None
        count = await asyncio.to_thread(update.commit)
        if global_steps is not None:
            await self.set_global_steps(global_steps)
        return count

    async def kv_cache_reserved_bytes(self) -> int:
        """Bytes the KV cache holds now (0 while asleep)."""
        return self.engine.kv_cache_reserved_bytes
