"""NreftReplica: verl's RolloutReplica for the nreft engine, one server actor per replica.

Placed like verl's vLLM replica: on the node of the replica's trainer worker, with that worker's GPU made
visible to it and no GPU requested from Ray (it shares the trainer's), or on the CPU where there is none.
"""

from __future__ import annotations

import logging

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from verl.workers.rollout.replica import RolloutReplica

from nreft_engine.integrations.verl.server import NreftServer

logger = logging.getLogger(__name__)

SERVER_NAME = "nreft_server_{replica}{suffix}"  # the Ray actor name the trainer-side adapter looks up


def _placement(worker_self) -> tuple[str, str | None]:
    """(node id, first GPU id or None) of the Ray actor this runs in."""
    context = ray.get_runtime_context()
    gpus = context.get_accelerator_ids().get("GPU") or []
    return context.get_node_id(), (str(gpus[0]) if gpus else None)


class NreftReplica(RolloutReplica):
    """One engine per replica: `rollout.tensor_model_parallel_size` (and data/pipeline parallel) must be 1."""

    def __init__(self, replica_rank: int, config, model_config, gpus_per_node: int = 8, **kwargs):
        super().__init__(replica_rank, config, model_config, gpus_per_node, **kwargs)
        if self.world_size != 1:
            raise ValueError(
                f"the nreft rollout runs one engine per GPU, but the rollout asks for {self.world_size} GPUs "
                f"per replica (tensor/data/pipeline parallel sizes "
                f"{self.config.tensor_model_parallel_size}/{self.config.data_parallel_size}/"
                f"{self.config.pipeline_model_parallel_size}): set "
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1"
            )

    async def launch_servers(self) -> None:
        """Start this replica's server actor next to its trainer worker (or alone, on the CPU)."""
        node_id, gpu = None, None
        if self.workers:
            node_id, gpu = await self.workers[0].__ray_call__.remote(_placement)
        name = SERVER_NAME.format(replica=self.replica_rank, suffix=self.name_suffix)
        strategy = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False) if node_id else "DEFAULT"
        server = ray.remote(NreftServer).options(
            name=name, scheduling_strategy=strategy, max_concurrency=self.max_concurrency, num_cpus=0,
            num_gpus=0,
        ).remote(self.config, self.model_config, self.replica_rank, gpu)
        await server.kv_cache_reserved_bytes.remote()  # raises here if the engine failed to start
        self.servers = [server]
        self._server_handle = server
        self._server_address = name
        logger.info("nreft replica %d: server %s on node %s, GPU %s", self.replica_rank, name, node_id, gpu)
