"""A stand-in for verl's trainer worker on the CPU: its naive weight sync, as ActorRolloutRefWorker's
update_weights(mode="naive") runs it, over a tiny HF model (verl's FSDP trainer needs CUDA)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, register
from verl.workers.rollout.base import get_rollout_class


class StandInTrainer(Worker):
    """Holds the 'trained' model and the rollout adapter verl builds in each trainer worker."""

    def __init__(self, rollout_config, model_config, model_path: str):
        super().__init__()
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        rollout_cls = get_rollout_class(rollout_config.name, rollout_config.mode)
        self.rollout = rollout_cls(config=rollout_config, model_config=model_config, device_mesh=None)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def scale_weights(self, factor: float) -> None:
        """Change the model (as an optimizer step would): every weight matrix times `factor`."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if "proj" in name:
                    param.mul_(factor)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL, blocking=False)
    async def update_weights(self, global_steps: int | None = None, mode: str = "naive") -> None:
        await self.rollout.resume(tags=["weights"])
        weights = ((name, tensor) for name, tensor in self.model.state_dict().items())
        await self.rollout.update_weights(weights, global_steps=global_steps)
        await self.rollout.resume(tags=["kv_cache"])

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    async def send_bad_weights(self, name: str, shape: tuple[int, ...]) -> str:
        """Send the model's weights with one bad tensor; returns the error message."""
        named = list(self.model.state_dict().items()) + [(name, torch.zeros(shape))]
        try:
            await self.rollout.update_weights(iter(named))
        except Exception as error:
            return str(error)
        return ""
