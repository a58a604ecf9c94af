"""NreftServerAdapter: verl's BaseRollout in each trainer worker, the trainer's side of the weight sync.

`update_weights` drains verl's generator of (HF name, full tensor) on every rank (it all-gathers shards, so
each rank must take part); the rank that owns the replica's server sends the tensors to it in buckets of
`checkpoint_engine.update_weights_bucket_megabytes`, and the server loads them once all have arrived.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import ray
import torch
from verl.workers.rollout.base import BaseRollout

from nreft_engine.integrations.verl.replica import SERVER_NAME

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_MB = 512


class NreftServerAdapter(BaseRollout):
    """Finds its replica's server by Ray actor name; with TP 1 every trainer rank owns one replica."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1):
        super().__init__(config, model_config, device_mesh)
        self.replica_rank = int(os.environ.get("RANK", 0)) if replica_rank == -1 else replica_rank
        self.is_leader_rank = True  # one rank per replica (tensor_model_parallel_size=1)
        self._server: ray.actor.ActorHandle | None = None

    @property
    def server(self) -> ray.actor.ActorHandle:
        if self._server is None:
            self._server = ray.get_actor(SERVER_NAME.format(replica=self.replica_rank, suffix=""))
        return self._server

    async def resume(self, tags: list[str]) -> None:
        """Reserve the server's KV cache again ("kv_cache"); the weights never leave the device."""
        if self.config.free_cache_engine:
            await self.server.wake_up.remote(tags=tags)

    async def release(self) -> None:
        """Release the server's KV cache while the trainer runs."""
        if self.config.free_cache_engine:
            await self.server.sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], wire_format: str = "named_tensors",
        global_steps: int | None = None, **kwargs: Any,
    ) -> None:
        """Send every (HF name, tensor) to the server in buckets, then load them all there; an unknown name
        or a wrong shape raises (naming the weight) and leaves the engine's weights as they were."""
        if wire_format != "named_tensors":
            raise ValueError(f"the nreft rollout takes wire_format='named_tensors', got {wire_format!r}")
        if kwargs.get("peft_config") is not None:
            raise ValueError(
                "the nreft rollout loads full weights: set actor_rollout_ref.model.lora.merge=True"
            )
        limit = (getattr(self.config.checkpoint_engine, "update_weights_bucket_megabytes", None)
                 or DEFAULT_BUCKET_MB) << 20
        server = self.server
        await server.begin_weight_update.remote()
        weights = iter(weights)
        try:
            bucket: list[tuple[str, torch.Tensor]] = []
            size = 0
            for name, tensor in weights:
                tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                bucket.append((name, tensor.detach().cpu()))
                size += tensor.numel() * tensor.element_size()
                if size >= limit:
                    await server.stage_weights.remote(bucket)
                    bucket, size = [], 0
            await server.stage_weights.remote(bucket)
        except Exception:
            for _ in weights:  # the other ranks all-gather with this one: drain the generator, then raise
                pass
            raise
        count = await server.commit_weights.remote(global_steps)
        logger.info("nreft replica %d: loaded %d weights, step %s", self.replica_rank, count, global_steps)
