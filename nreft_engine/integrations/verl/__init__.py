"""verl integration: the nreft engine as verl's rollout backend (actor_rollout_ref.rollout.name=nreft).

Importing this package registers the backend in verl's two registries: the adapter each trainer worker
builds, and the replica that launches the server actors. verl imports it in every process through the
`verl.plugins` entry point (or VERL_USE_EXTERNAL_MODULES=nreft_engine.integrations.verl).
"""

from __future__ import annotations

from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry

ROLLOUT_NAME = "nreft"


def _load_replica() -> type:
    from nreft_engine.integrations.verl.replica import NreftReplica

    return NreftReplica


_ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "nreft_engine.integrations.verl.adapter.NreftServerAdapter"
RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
