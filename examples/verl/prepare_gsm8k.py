"""GSM8K as verl's GRPO examples read it: train.parquet / test.parquet with data_source "openai/gsm8k", a
one-message chat `prompt` asking for the answer after "####", and the number as `reward_model.ground_truth`
(the columns verl's GSM8K reward function and agent loop expect). Reads the local JSONL files (one
{"question", "answer"} object a line, as in GSM8K's own release), so it needs no network.

    python examples/verl/prepare_gsm8k.py --input-dir ../shared/data/gsm8k --output-dir ~/data/gsm8k
"""

from __future__ import annotations

import argparse
import json
import os
import re

import pandas as pd

DATA_SOURCE = "openai/gsm8k"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'
ANSWER = re.compile(r"#### (-?[0-9.,]+)")


def final_answer(solution: str) -> str:
    """The number after "####" in a GSM8K solution, without thousands separators."""
    match = ANSWER.search(solution)
    if match is None:
        raise ValueError(f"GSM8K solution without a '#### <number>' line: {solution[-80:]!r}")
    return match.group(1).replace(",", "")


def rows(path: str, split: str) -> list[dict]:
    with open(path) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    return [
        {
            "data_source": DATA_SOURCE,
            "prompt": [{"role": "user", "content": f"{ex['question']} {INSTRUCTION}"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": final_answer(ex["answer"])},
            "extra_info": {"split": split, "index": i, "answer": ex["answer"], "question": ex["question"]},
        }
        for i, ex in enumerate(examples)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input-dir", default="../shared/data/gsm8k", help="has train.jsonl, test.jsonl")
    parser.add_argument("--output-dir", default="~/data/gsm8k", help="where train/test.parquet are written")
    args = parser.parse_args()
    out = os.path.expanduser(args.output_dir)
    os.makedirs(out, exist_ok=True)
    for split in ("train", "test"):
        frame = pd.DataFrame(rows(os.path.join(args.input_dir, f"{split}.jsonl"), split))
        frame.to_parquet(os.path.join(out, f"{split}.parquet"))
        print(f"{split}: {len(frame)} rows -> {os.path.join(out, f'{split}.parquet')}")


if __name__ == "__main__":
    main()
