"""`nreft generate | train | bench`: the command line.

An expected failure (a bad option, an unreadable file, a folder in use) is one line on stderr,
`nreft: error: ...`, and exit code 2; `--debug` shows its traceback. Anything else is a bug and shows one.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from nreft_engine import Engine, SamplingParams, SkipPolicy
from nreft_engine.bench import chat_workload, measure_engine
from nreft_engine.chat import chat_text, has_chat_template
from nreft_engine.cli_args import DTYPES, add_model_arguments
from nreft_engine.train.command import add_train_arguments, run_train


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are ValueErrors, reported by `main` as one line like the rest."""

    def error(self, message: str):
        raise ValueError(f"{message} (see `{self.prog} --help`)")


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--block-size", type=int, default=16)


def _check_at_least_1(args: argparse.Namespace, *names: str) -> None:
    """A ValueError naming the first of these integer options below 1."""
    for name in names:
        if (value := getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {value}: must be at least 1")


def _make_engine(args: argparse.Namespace) -> Engine:
    _check_at_least_1(args, "block_size")
    return Engine.from_pretrained(
        args.model, dtype=DTYPES[args.dtype], kv_cache_memory=args.kv_cache_memory, block_size=args.block_size
    )


def _generate(args: argparse.Namespace) -> int:
    params = SamplingParams(  # checked before the model loads, like the skip policy
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, seed=args.seed,
    )
    skip = SkipPolicy(args.skip_ratio, args.protect_first, args.protect_last, seed=args.seed)
    engine = _make_engine(args)
    # without a chat template (or with --raw) the message goes to the model as it is
    templated = not args.raw and has_chat_template(engine.tokenizer)
    prompts = [chat_text(engine.tokenizer, p) if templated else p for p in args.prompt]
    outputs = engine.generate(prompts, params, skip=skip, use_tqdm=True)
    stats = engine.last_stats
    if args.json:
        print(json.dumps([
            {"prompt": text, "skipped_layers": list(out.skipped_layers),
             "completions": [{"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                              "finish_reason": c.finish_reason} for c in out.outputs]}
            for text, out in zip(args.prompt, outputs)
        ], indent=2))
        return 0
    for text, out in zip(args.prompt, outputs):
        print(f"=== prompt: {text}")
        for c in out.outputs:
            print(f"--- sample {c.index} ({len(c.token_ids)} tokens, {c.finish_reason}, "
                  f"logprob {c.cumulative_logprob:.2f})\n{c.text}")
    print(f"\nskipped layers ({len(stats.skipped_layers)}/{engine.num_layers}): {list(stats.skipped_layers)}")
    print(f"generated {stats.generated_tokens} tokens in {stats.seconds:.2f} s: "
          f"{stats.tokens_per_second:.1f} tok/s; "
          f"KV cache {stats.kv_cache_bytes / 2**20:.1f} MiB ({stats.num_blocks} blocks)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    _check_at_least_1(args, "num_prompts")
    SamplingParams(n=args.n, max_tokens=args.max_tokens)  # the options measure_engine samples with: checked
    for ratio in args.skip_ratios:
        SkipPolicy(ratio)
    engine = _make_engine(args)
    prompts = chat_workload(engine.tokenizer, args.num_prompts)
    for ratio in args.skip_ratios:
        result = measure_engine(engine, prompts, n=args.n, max_tokens=args.max_tokens, skip_ratio=ratio)
        print(f"skip {ratio:.2f}: {result['tokens_per_second']:.1f} tok/s, "
              f"KV {result['kv_cache_bytes'] / 2**20:.1f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nreft", description="Nested-ReFT rollouts and training")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # --debug also after the subcommand: there it only overrides the top-level value when given
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="sample completions with a layer-skipped behaviour model",
                         parents=[debug])
    _add_engine_arguments(gen)
    gen.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    gen.add_argument("-n", type=int, default=1, help="samples per prompt")
    gen.add_argument("--skip-ratio", type=float, default=0.0)
    gen.add_argument("--protect-first", type=int, default=1)
    gen.add_argument("--protect-last", type=int, default=1)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--json", action="store_true", help="print outputs as JSON")
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="engine rollout tokens/s at several skip ratios", parents=[debug])
    _add_engine_arguments(bench)
    bench.add_argument("--num-prompts", type=int, default=16)
    bench.add_argument("-n", type=int, default=4)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--skip-ratios", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    bench.set_defaults(func=_bench)

    train = sub.add_parser("train", help="Nested-ReFT training (RL with verifiable rewards)", parents=[debug])
    add_train_arguments(train)
    train.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `nreft` with `argv` (default: sys.argv); returns the exit code (2 for an error)."""
    args = None
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        return args.func(args)
    except (ValueError, TypeError, OSError) as err:  # the expected failures; OSError: FileNotFoundError too
        if args is not None and args.debug:
            raise
        print(f"nreft: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
