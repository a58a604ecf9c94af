#!/usr/bin/env bash
# Nested-ReFT GRPO on GSM8K with verl: rollouts from the nreft engine with a quarter of the decoder layers
# skipped (a fresh set per global step), behaviour log-probs fed to verl's token-level rollout correction.
# Needs GPUs, verl 0.9.1 and this package with its extra: pip install -e ".[verl]"
# Data first: python examples/verl/prepare_gsm8k.py --output-dir ~/data/gsm8k
# Any key can be overridden on the command line, e.g. trainer.n_gpus_per_node=1 data.train_batch_size=64.
set -euo pipefail

MODEL=${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}   # an HF hub id or a local HF directory
DATA=${DATA:-$HOME/data/gsm8k}
GPUS=${GPUS:-8}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    algorithm.use_kl_in_reward=False \
    algorithm.rollout_correction.rollout_is=token \
    algorithm.rollout_correction.rollout_is_threshold=2.0 \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=256 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    data.filter_overlong_prompts=True \
    data.truncation=error \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=64 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.rollout.name=nreft \
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.calculate_log_probs=True \
    actor_rollout_ref.rollout.n=8 \
    actor_rollout_ref.rollout.temperature=1.0 \
    actor_rollout_ref.rollout.top_p=1.0 \
    actor_rollout_ref.rollout.top_k=-1 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16 \
    +actor_rollout_ref.rollout.engine_kwargs.nreft.skip_ratio=0.25 \
    +actor_rollout_ref.rollout.engine_kwargs.nreft.protect_first=1 \
    +actor_rollout_ref.rollout.engine_kwargs.nreft.protect_last=1 \
    +actor_rollout_ref.rollout.engine_kwargs.nreft.kv_cache_memory=0.3 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name=nreft_verl_gsm8k \
    trainer.experiment_name=nested_grpo_skip0.25 \
    trainer.n_gpus_per_node="$GPUS" \
    trainer.nnodes=1 \
    trainer.save_freq=-1 \
    trainer.test_freq=10 \
    trainer.total_epochs=1 "$@"
