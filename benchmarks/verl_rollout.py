"""The verl backend's server path against the engine called directly: the same 64 requests, tokens/s.

Direct: one `Engine.generate` of the 64 prompts in this process. Server: the `nreft` server actors (Ray, on
the CPU here) fed one request per coroutine, as verl's agent loop sends them: first one replica taking all
64, then two replicas taking 32 each. Same engine settings; random weights of SmolLM2-135M's shape (fp32),
32 new tokens per request (ignore_eos), temperature 1, `--threads` torch threads in each engine (default 1:
two replicas on a 2-core machine get a core each). Needs verl (run it in .venv-verl); writes JSON.

    .venv-verl/bin/python benchmarks/verl_rollout.py [--threads 1] [--output results/verl_rollout.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
from types import SimpleNamespace

import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from verl.workers.config import RolloutConfig

from nreft_engine import Engine, SamplingParams
from nreft_engine.integrations.verl.server import NreftServer

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
                     tie_word_embeddings=True)
REQUESTS, PROMPT_TOKENS, NEW_TOKENS, KV_BYTES = 64, 48, 32, 1 << 28


def save_random_model(path: str) -> str:
    config = AutoConfig.for_model("llama", **SMOLLM2_SHAPE, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 49152, (PROMPT_TOKENS,), generator=gen).tolist() for _ in range(REQUESTS)]


def direct(path: str) -> dict:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    engine = Engine(model, kv_cache_memory=KV_BYTES, max_model_len=PROMPT_TOKENS + NEW_TOKENS)  # as served
    params = [SamplingParams(temperature=1.0, max_tokens=NEW_TOKENS, ignore_eos=True, seed=i)
              for i in range(REQUESTS)]
    engine.generate(prompts()[:4], params[:4])  # warm-up: packing, first-call costs
    start = time.perf_counter()
    outs = engine.generate(prompts(), params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


async def through_servers(servers: list, seconds_out: list) -> int:
    params = {"temperature": 1.0, "max_tokens": NEW_TOKENS, "ignore_eos": True, "logprobs": True}
    await asyncio.gather(*(s.generate.remote(p[:4], params, f"warm-{i}-{k}")
                           for i, s in enumerate(servers) for k, p in enumerate(prompts()[:4])))
    start = time.perf_counter()
    outs = await asyncio.gather(*(servers[i % len(servers)].generate.remote(p, params, f"r{i}")
                                  for i, p in enumerate(prompts())))
    seconds_out.append(time.perf_counter() - start)
    return sum(len(o.token_ids) for o in outs)


def served(path: str, replicas: int) -> dict:
    config = RolloutConfig(name="nreft", prompt_length=PROMPT_TOKENS, response_length=NEW_TOKENS,
                           dtype="float32", engine_kwargs={"nreft": {"kv_cache_memory": KV_BYTES}})
    servers = [ray.remote(NreftServer).options(max_concurrency=1000).remote(
        config, SimpleNamespace(local_path=path), rank, None) for rank in range(replicas)]
    seconds: list[float] = []
    tokens = asyncio.run(through_servers(servers, seconds))
    for server in servers:
        ray.kill(server)
    rate = tokens / seconds[0]
    return {"replicas": replicas, "tokens": tokens, "seconds": seconds[0], "tokens_per_s": rate,
            "tokens_per_s_per_replica": rate / replicas}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="benchmarks/results/verl_rollout.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_model(os.path.join(tmp, "model"))
        torch.set_num_threads(args.threads)
        result = {"direct": direct(path)}
        threads = {"OMP_NUM_THREADS": str(args.threads)}
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": threads})
        result["server_1"] = served(path, 1)
        result["server_2"] = served(path, 2)
        ray.shutdown()
    base = result["direct"]["tokens_per_s"]
    for key in ("server_1", "server_2"):
        result[key]["ratio_per_replica"] = result[key]["tokens_per_s_per_replica"] / base
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                         "torch": torch.__version__, "threads_per_engine": args.threads,
                         "load_average_at_end": os.getloadavg()[0]}
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
