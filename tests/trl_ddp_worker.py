"""One rank of the two-process NestedGRPOTrainer test (run by torchrun from tests/test_integration_trl.py):
trains 2 steps on one repeated prompt and writes the rows this rank generated to <out>/rank<r>.json."""

import json
import os
import sys

import torch
from datasets import Dataset
from test_train_support import char_tokenizer, tiny_policy, token_reward
from trl import GRPOConfig

from nreft_engine import SkipPolicy
from nreft_engine.integrations.trl import NestedGRPOTrainer


def main(out_dir: str) -> None:
    model = tiny_policy()[0].train()
    args = GRPOConfig(
        output_dir=os.path.join(out_dir, "run"), max_steps=2, per_device_train_batch_size=2,
        num_generations=4,
        max_completion_length=6, use_cpu=True, bf16=False, report_to="none", logging_steps=1,
        save_strategy="no", gradient_checkpointing=False, seed=0,
    )
    trainer = NestedGRPOTrainer(
        model=model, reward_funcs=token_reward, args=args, processing_class=char_tokenizer(),
        train_dataset=Dataset.from_dict({"prompt": ["1 + 2 = ?"] * 16}), skip=SkipPolicy(0.25, seed=0),
        engine_kwargs={"kv_cache_memory": 1 << 22},
    )
    rows, prompts = [], []
    generate = trainer.nreft_generation.generate

    def recording(**kwargs):  # TRL passes everything by keyword
        out = generate(**kwargs)
        prompts.extend(kwargs["prompts"])
        rows.extend(out[1])
        return out

    trainer.nreft_generation.generate = recording
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"steps": trainer.state.global_step, "rows": rows, "prompts": prompts}, f)
    torch.distributed.destroy_process_group()  # gloo's threads, left running at exit, abort the process


if __name__ == "__main__":
    main(sys.argv[1])
