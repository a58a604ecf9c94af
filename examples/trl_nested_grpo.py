"""Nested-ReFT with TRL: GRPOTrainer's one-class change, on the embedded SmolLM2-135M and the arithmetic task.

Runs a few steps on a CPU (about half a minute per step): TRL does everything it usually does (dataset,
chat template, rewards, logging); the completions come from the nreft engine with a fresh layer-skip set
per optimizer step, and TRL's importance-sampling correction uses the engine's behaviour log-probs.

    python examples/trl_nested_grpo.py [--steps 3] [--skip-ratio 0.034]
"""

import argparse

import torch
from datasets import Dataset
from trl import GRPOConfig

from nreft_engine import SkipPolicy
from nreft_engine.integrations.trl import NestedGRPOTrainer
from nreft_engine.models.loader import DEFAULT_MODEL, load_model
from nreft_engine.train.data import INSTRUCTION, arithmetic_task
from nreft_engine.train.rewards import numeric_match


def reward(prompts, completions, completion_ids, answer, **kwargs):
    """1 when the completion's last number is the answer (TRL passes conversational completions)."""
    texts = [c[-1]["content"] for c in completions]
    return numeric_match(prompts=prompts, completions=texts, completion_ids=completion_ids, answer=answer)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--skip-ratio", type=float, default=0.034, help="1 of SmolLM2-135M's 30 layers")
    args = parser.parse_args()

    model, tokenizer = load_model(DEFAULT_MODEL, dtype=torch.float32)
    task = arithmetic_task(seed=0)
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": p.question}]
                   for p in task.train],
        "answer": [p.answer for p in task.train],
    })
    config = GRPOConfig(
        output_dir="runs/trl-nested-grpo", max_steps=args.steps, per_device_train_batch_size=64,
        num_generations=8, max_completion_length=12, temperature=0.7, learning_rate=3e-5, loss_type="dapo",
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False, report_to="none",
        logging_steps=1, save_strategy="no",
        # TRL's own IS correction, on the engine's behaviour log-probs: per-token ratios truncated at 2
        vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=2.0,
    )
    trainer = NestedGRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        skip=SkipPolicy(ratio=args.skip_ratio, protect_first=4, protect_last=4, seed=0),
    )
    trainer.train()
    for record in trainer.state.log_history:
        if "reward" in record:
            tokens_per_s = record["nreft/rollout_tokens_per_s"]
            print(f"step {record['step']}: reward {record['reward']:.2f}, skipped layers "
                  f"[{record['nreft/skipped_layers']}], rollout {tokens_per_s:.0f} tok/s, "
                  f"IS ratio mean {record['sampling/importance_sampling_ratio/mean']:.3f}")


if __name__ == "__main__":
    main()
