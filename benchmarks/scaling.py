"""Scaling: the engine vs HF transformers `generate` as the prompt, the completion and the batch grow.

Three axes, each row measured for both systems by the same run (ratios are within the run):

- prompt: one prompt of 128 / 1k / 4k / 8k tokens (8k = 8192 - 16: the model's context less the completion),
  n=1 and n=8 samples x 16 new tokens. tok/s is end to end (prefill included); prefill s is the engine's
  prefill steps (`GenerationStats.prefill_seconds`) and HF `generate`'s time to its first token (a streamer
  stamps each step). At n=1 HF's plain forward of the prompt, `model(ids, logits_to_keep=1)` under
  inference_mode, is timed too (the faster of two runs): the yardstick of the prefill target.
- completion: 64 sequences decoding at context 128 / 1k / 4k (EOS ignored), engine with and without skip
  0.25. A full 64 x 4k-token generate takes hours for HF on a 2-core CPU, so both systems are timed on the
  same 6 decode steps (3 with --quick) at the same context, the last one at exactly L tokens: a prefix of
  Q = L - steps - 1 random tokens is prefilled once (untimed) and its KV copied into 64 separate caches
  (HF: `DynamicCache.batch_repeat_interleave(64)`; engine, stepped through `Engine.open_session`: a prompt
  with n=64, whose forked blocks are then copied into blocks of each sample's own through the scheduler's
  block manager, as 64 separate prefills of that prompt would leave them, so no sample reads another's KV;
  the copies change no sampled token). HF then runs `generate(cache=cache, max_new_tokens=steps + 1)` on
  the prefix plus one token, the engine its decode steps; each system's first decode step (context Q + 1) is
  a warm-up and the next `steps` (context Q + 2 .. L) are timed: tok/s = 64 x steps / their seconds. These
  rows measure the decode rate at that context, not a whole rollout; peak RSS holds the 64 caches and the
  decode steps, not the prefill of 64 different prompts (which would add HF's batched-prefill activations).
- sequences: 16 / 64 / 256 sequences (16 chat prompts x n = 1 / 4 / 16) x 128 new tokens, a whole
  `generate` each, tok/s end to end (HF: the rows left-padded into one batch, as in rollout_throughput.py).

Each row and system runs in a fresh subprocess (nothing one system leaves behind, e.g. memory the allocator
keeps, is seen by another): the model is loaded, the system warmed up on a small case, then the kernel's
peak-RSS mark (VmHWM) is reset (/proc/self/clear_refs) and the row measured. Peak RSS is that mark; "over
model" is the peak less the process's RSS with just the model loaded and read once (its own memory), so the
engine's packed weight copies, its KV cache and its activations all count. The engine's KV cache
(`kv_cache_memory`, bytes) is sized per row from the row's needs (pages never touched are never resident);
skip 0.25 gets the same bytes, so more blocks. KV blocks = the peak the call used / the blocks it held.

Targets (printed PASS/MISS, from the same run): the 8k prompt's engine prefill <= 1.5x HF's forward of it,
and its peak RSS over the model's own <= 2 GB; at 1k and 4k context, engine >= 2x HF's decode tok/s; at 256
sequences the engine's tok/s >= its tok/s at 64.

The 4k-context rows need about 14 GB free in fp32 (64 caches of 4k tokens: 12 GB, each system in turn);
a row that would not fit fails first with the numbers.

    python benchmarks/scaling.py [--quick] [--dtype float32|bfloat16] [--axes prompt completion sequences]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

SEED = 0
BLOCK_SIZE = 16  # the engine's default

FULL = {
    "prompt_lengths": [128, 1024, 4096, 8192 - 16], "prompt_n": [1, 8], "prompt_tokens": 16,
    "contexts": [128, 1024, 4096], "completion_seqs": 64, "steps": 6,
    "sequences_n": [1, 4, 16], "sequences_tokens": 128,
}
QUICK = {
    "prompt_lengths": [128, 512], "prompt_n": [1, 8], "prompt_tokens": 4,
    "contexts": [128, 512], "completion_seqs": 16, "steps": 3,
    "sequences_n": [1, 4], "sequences_tokens": 16,
}
SKIP_RATIO = 0.25
PREFILL_TARGET = 1.5  # engine prefill / HF forward, 8k prompt
MEMORY_TARGET = 2e9  # bytes of peak RSS over the model's own, 8k prompt
DECODE_TARGET = 2.0  # engine / HF tok/s at 1k-4k context
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---- memory ---------------------------------------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def release_memory() -> None:
    """Free what the previous system left: Python garbage, then glibc's free heap back to the kernel."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """The process's peak RSS from now on: the kernel's VmHWM, reset at start (Linux >= 4.0)."""

    def __enter__(self) -> PeakRSS:
        release_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        self.peak = _status_kb("VmHWM") * 1024

    def fields(self) -> dict:
        return {"peak_rss_bytes": self.peak, "start_rss_bytes": self.start}


# ---- workloads ------------------------------------------------------------------------------------------

def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """`count` prompts of `length` random token ids (ids below 100, the special tokens, left out)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab, (length,), generator=gen).tolist() for _ in range(count)]


def kv_bytes_per_token(model) -> int:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    itemsize = next(model.parameters()).element_size()
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * itemsize


def kv_budget(model, tokens: int, seqs: int) -> int:
    """`kv_cache_memory` bytes for `tokens` cached tokens, a spare block per sequence and 5%."""
    return int(1.05 * (tokens + seqs * BLOCK_SIZE) * kv_bytes_per_token(model)) + (1 << 20)


class StepClock:
    """A `generate` streamer that stamps each put: the prompt, then each step's new tokens."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def hf_generate(model, rows: list[list[int]], max_tokens: int, pad: int, past=None) -> dict:
    """HF `generate` (sampling, EOS ignored) on `rows` left-padded into one batch; with `past` (a cache of
    all but the last token of each row) only the rest is fed. Returns seconds, first-token time, stamps."""
    from nreft_engine.bench import left_padded

    input_ids, mask = left_padded(rows, pad)
    width = input_ids.shape[1]
    torch.manual_seed(SEED)
    clock = StepClock()
    start = time.perf_counter()
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=pad, streamer=clock,
        **({} if past is None else {"cache": past}),
    )
    seconds = time.perf_counter() - start
    assert out.shape[1] - width == max_tokens, (out.shape, width, max_tokens)
    steps = clock.stamps[1:]  # stamps[0]: generate's put of the prompt
    return {"seconds": seconds, "first_token_seconds": steps[0] - start, "step_stamps": steps,
            "tokens": max_tokens * len(rows)}


def engine_generate(engine, prompts: list[list[int]], n: int, max_tokens: int, skip=None) -> dict:
    from nreft_engine import SamplingParams

    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=SEED)
    start = time.perf_counter()
    engine.generate(prompts, params, skip=skip)
    seconds = time.perf_counter() - start
    s = engine.last_stats
    assert s.generated_tokens == len(prompts) * n * max_tokens, s
    return {"seconds": seconds, "tokens": s.generated_tokens, "prefill_seconds": s.prefill_seconds,
            "decode_seconds": s.decode_seconds, "prefill_tokens": s.prefill_tokens,
            "kv_blocks_used": s.peak_used_blocks, "kv_blocks": s.num_blocks,
            "kv_cache_bytes": s.kv_cache_bytes, "peak_kv_bytes": s.peak_kv_cache_bytes,
            "peak_running": s.peak_running, "preemptions": s.num_preemptions,
            "skipped_layers": list(s.skipped_layers)}


def make_engine(model, tokenizer, kv_bytes: int):
    from nreft_engine import Engine

    return Engine(model, tokenizer, kv_cache_memory=kv_bytes)


def warm_engine(engine, vocab: int, n: int) -> None:
    """One-time costs (weight packing, first calls of each kernel) paid before anything is timed."""
    engine_generate(engine, random_prompts(2, 40, vocab, SEED + 99), n, 3)


def warm_hf(model, vocab: int, rows: int, pad: int) -> None:
    hf_generate(model, random_prompts(rows, 40, vocab, SEED + 99), 3, pad)


# ---- rows -----------------------------------------------------------------------------------------------

def prompt_row(model, tokenizer, case: dict) -> dict:
    """One prompt of `length` tokens, n samples of `tokens` new tokens each."""
    length, n, tokens = case["length"], case["n"], case["tokens"]
    vocab, pad = model.config.vocab_size, 0
    prompt = random_prompts(1, length, vocab, SEED + length)[0]
    if case["system"] == "engine":
        engine = make_engine(model, tokenizer, kv_budget(model, length + n * tokens, n + 1))
        warm_engine(engine, vocab, n)
        with PeakRSS() as mem:
            row = engine_generate(engine, [prompt], n, tokens)
    else:
        warm_hf(model, vocab, n, pad)
        forward = {}
        if n == 1:  # the prefill target's yardstick: HF's forward of the prompt (the faster of two), its peak
            ids = torch.tensor([prompt])
            times = []
            with PeakRSS() as mem, torch.inference_mode():
                for _ in range(2):
                    start = time.perf_counter()
                    model(ids, logits_to_keep=1)
                    times.append(time.perf_counter() - start)
            forward = {"hf_forward_seconds": min(times), "hf_forward_runs": times,
                       "hf_forward_peak_rss_bytes": mem.peak}
        with PeakRSS() as mem:
            row = hf_generate(model, [prompt] * n, tokens, pad)
        row["prefill_seconds"] = row.pop("first_token_seconds")
        del row["step_stamps"]
        row.update(forward)
    row.update(mem.fields(), label=f"prompt {length} n={n}", x=length, sequences=n, max_tokens=tokens)
    return row


def engine_decode_at_context(engine, prefix: list[int], seqs: int, steps: int, skip, unshare=True) -> dict:
    """The engine's decode steps at context len(prefix) + 2 .. + steps + 1 with `seqs` sequences, each over
    KV blocks of its own (see the module docstring; `unshare=False` leaves the prompt's blocks shared, to
    check that the copies change no token); times the steps after the first."""
    import itertools

    from nreft_engine import SamplingParams
    from nreft_engine.session import make_group
    from nreft_engine.skip import resolve_plan

    params = SamplingParams(n=seqs, temperature=1.0, max_tokens=steps + 2, ignore_eos=True, seed=SEED)
    with engine.lock, torch.inference_mode():
        session = engine.open_session(resolve_plan(skip, engine.num_layers))
        group = make_group(itertools.count(), 0, prefix, params)
        session.add(0, group)
        blocks, prefill_seconds = session.scheduler.blocks, 0.0
        while session.scheduler.waiting or session.scheduler.prefilling:
            start = time.perf_counter()
            session.step()
            prefill_seconds += time.perf_counter() - start
        # un-share the prompt's blocks: each sample gets a copy of its own (as a separate prefill would leave)
        lead = group[0]
        cached = blocks.num_tokens(lead.seq_id)
        source = blocks.block_table(lead.seq_id)
        copies = []
        for seq in group[1:] if unshare else ():
            blocks.free(seq.seq_id)
            blocks.allocate(seq.seq_id, cached)
            copies += zip(source, blocks.block_table(seq.seq_id))
        session.cache.copy_blocks(copies)
        if unshare:
            assert all(blocks.ref_count(b) == 1 for s in group for b in blocks.block_table(s.seq_id))
        times, contexts = [], []
        while session.has_work():
            assert len(session.scheduler.running) == seqs
            contexts.append(blocks.num_tokens(lead.seq_id) + 1)  # the step attends over this many tokens
            start = time.perf_counter()
            session.step()
            times.append(time.perf_counter() - start)
        stats = session.finish()
    assert len(times) == steps + 1 and stats.generated_tokens == seqs * (steps + 2), (times, stats)
    timed = sum(times[1:])
    return {"seconds": timed, "tokens": seqs * steps, "step_seconds": times[1:],
            "warmup_step_seconds": times[0], "contexts": contexts[1:],
            "setup_prefill_seconds": prefill_seconds,
            "kv_blocks_used": stats.peak_used_blocks, "kv_blocks": stats.num_blocks,
            "kv_cache_bytes": stats.kv_cache_bytes, "peak_kv_bytes": stats.peak_kv_cache_bytes,
            "skipped_layers": list(stats.skipped_layers), "outputs": [s.output_token_ids for s in group]}


@torch.inference_mode()
def hf_decode_at_context(model, prefix: list[int], seqs: int, steps: int, pad: int) -> dict:
    """HF `generate` on a cache of `prefix` repeated into `seqs` rows: the same contexts as the engine's."""
    from transformers import DynamicCache

    start = time.perf_counter()
    cache = DynamicCache(config=model.config)
    model(torch.tensor([prefix]), cache=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(seqs)
    setup = time.perf_counter() - start
    extra = random_prompts(1, 1, model.config.vocab_size, SEED + 7)[0]
    r = hf_generate(model, [prefix + extra] * seqs, steps + 1, pad, past=cache)
    stamps = r["step_stamps"]
    timed = stamps[-1] - stamps[0]  # steps 2 .. steps + 1
    step_seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds": timed, "tokens": seqs * steps, "step_seconds": step_seconds,
            "warmup_step_seconds": r["first_token_seconds"],
            "contexts": list(range(len(prefix) + 2, len(prefix) + steps + 2)), "setup_prefill_seconds": setup}


def completion_row(model, tokenizer, case: dict) -> dict:
    from nreft_engine import SkipPolicy

    context, seqs, steps = case["context"], case["seqs"], case["steps"]
    vocab, pad = model.config.vocab_size, 0
    prefix = random_prompts(1, context - steps - 1, vocab, SEED + context)[0]
    if case["system"] == "hf":
        warm_hf(model, vocab, seqs, pad)
        with PeakRSS() as mem:
            row = hf_decode_at_context(model, prefix, seqs, steps, pad)
    else:
        skip = SkipPolicy(case["skip"], seed=SEED) if case.get("skip") else None
        engine = make_engine(model, tokenizer, kv_budget(model, seqs * (context + 1), seqs))
        warm_engine(engine, vocab, seqs)
        with PeakRSS() as mem:
            row = engine_decode_at_context(engine, prefix, seqs, steps, skip)
        del row["outputs"]
    row.update(mem.fields(), label=f"context {context}", x=context, sequences=seqs, max_tokens=steps)
    return row


def sequences_row(model, tokenizer, case: dict) -> dict:
    from nreft_engine.bench import chat_workload

    n, tokens = case["n"], case["tokens"]
    vocab = model.config.vocab_size
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = chat_workload(tokenizer, 16)
    seqs = len(prompts) * n
    if case["system"] == "engine":
        engine = make_engine(model, tokenizer, kv_budget(model, sum(map(len, prompts)) + seqs * tokens, seqs))
        warm_engine(engine, vocab, n)
        engine_generate(engine, prompts, n, 4)  # the measured batch's shapes
        with PeakRSS() as mem:
            row = engine_generate(engine, prompts, n, tokens)
    else:
        rows = [p for p in prompts for _ in range(n)]
        hf_generate(model, rows, 4, pad)
        with PeakRSS() as mem:
            row = hf_generate(model, rows, tokens, pad)
        row["prefill_seconds"] = row.pop("first_token_seconds")
        del row["step_stamps"]
    row.update(mem.fields(), label=f"{seqs} seqs", x=seqs, sequences=seqs, max_tokens=tokens)
    return row


ROWS = {"prompt": prompt_row, "completion": completion_row, "sequences": sequences_row}


def check_memory(model, case: dict) -> None:
    """Fail before a completion row whose 64 caches would not fit in the memory available now (the machine
    may be shared: better a clear error than the kernel's OOM killer picking a process)."""
    if case["axis"] != "completion":
        return
    from nreft_engine.cache import available_memory

    need = int(1.1 * case["seqs"] * case["context"] * kv_bytes_per_token(model)) + (1 << 30)
    have = available_memory(torch.device("cpu"))
    if need > have:
        raise SystemExit(f"the {case['context']}-token context row of {case['seqs']} sequences needs about "
                         f"{need / 2**30:.1f} GiB and {have / 2**30:.1f} GiB is available; free memory, or "
                         "run --dtype bfloat16 (half the KV bytes)")


def worker(case: dict, dtype: str, out: str) -> None:
    from nreft_engine.models.loader import load_model

    model, tokenizer = load_model(case["model"], dtype=DTYPES[dtype])
    model.eval()
    with torch.inference_mode():  # the weights may be mapped from a file: resident only once read
        model(torch.tensor([random_prompts(1, 8, model.config.vocab_size, SEED)[0]]))
    release_memory()
    model_rss = rss_bytes()
    check_memory(model, case)
    row = ROWS[case["axis"]](model, tokenizer, case)
    row.update(axis=case["axis"], system=case["system"], n=case.get("n", case.get("seqs")),
               model_rss_bytes=model_rss, peak_over_model_bytes=row["peak_rss_bytes"] - model_rss,
               tokens_per_second=row["tokens"] / row["seconds"])
    with open(out, "w") as f:
        json.dump(row, f)


# ---- the driver -----------------------------------------------------------------------------------------

def cases(grid: dict, axes: list[str], model: str) -> list[dict]:
    """One case per row and system (the engine first), each run in a process of its own."""
    out = []
    if "prompt" in axes:
        tokens = grid["prompt_tokens"]
        out += [{"axis": "prompt", "length": length, "n": n, "tokens": tokens, "system": system}
                for length in grid["prompt_lengths"] for n in grid["prompt_n"] for system in ("engine", "hf")]
    if "completion" in axes:
        systems = [("engine", 0.0), (f"engine skip {SKIP_RATIO}", SKIP_RATIO), ("hf", 0.0)]
        out += [{"axis": "completion", "context": c, "seqs": grid["completion_seqs"], "steps": grid["steps"],
                 "system": system, "skip": skip} for c in grid["contexts"] for system, skip in systems]
    if "sequences" in axes:
        out += [{"axis": "sequences", "n": n, "tokens": grid["sequences_tokens"], "system": system}
                for n in grid["sequences_n"] for system in ("engine", "hf")]
    for case in out:
        case["model"] = model
    return out


def run_case(case: dict, dtype: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(case), "--dtype", dtype,
               "--worker-out", path]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"row {case} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(path) as f:
            return json.load(f)
    finally:
        os.unlink(path)


def add_ratios(rows: list[dict]) -> None:
    hf = {(r["axis"], r["label"]): r for r in rows if r["system"] == "hf"}
    for r in rows:
        ref = hf.get((r["axis"], r["label"]))
        r["x_hf"] = r["tokens_per_second"] / ref["tokens_per_second"] if ref else None


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


COLUMNS = ["axis", "case", "system", "seqs", "tok/s", "x HF", "prefill s", "HF fwd s", "peak RSS GiB",
           "over model GiB", "KV blocks"]
WIDTHS = [10, 18, 17, 4, 8, 5, 9, 8, 12, 14, 13]


def cells(r: dict) -> list[str]:
    """One row's table cells (prefill s: "-" where not measured comparably, the completion rows)."""
    return [r["axis"], r["label"], r["system"], str(r["sequences"]), f"{r['tokens_per_second']:.1f}",
            f"{r['x_hf']:.2f}", f"{r['prefill_seconds']:.2f}" if "prefill_seconds" in r else "-",
            f"{r['hf_forward_seconds']:.2f}" if "hf_forward_seconds" in r else "",
            gib(r["peak_rss_bytes"]), gib(r["peak_over_model_bytes"]),
            f"{r['kv_blocks_used']}/{r['kv_blocks']}" if "kv_blocks" in r else ""]


def print_table(rows: list[dict]) -> None:
    def line(values):
        return " ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, WIDTHS)))

    print("\n" + line(COLUMNS))
    for r in rows:
        print(line(cells(r)))


def markdown(rows: list[dict], verdicts: list[dict]) -> str:
    """The tables for RESULTS.md."""
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    out += ["", "| target | measured | |", "|---|---|---|"]
    out += [f"| {t['target']} | {t['measured']} | {'met' if t['pass'] else '**missed**'} |" for t in verdicts]
    return "\n".join(out) + "\n"


def targets(rows: list[dict], grid: dict) -> list[dict]:
    """PASS/MISS of each target on the run's rows (on the largest sizes the grid has, in a --quick run)."""
    def find(axis, system, x, n=None):
        for r in rows:
            if r["axis"] == axis and r["system"] == system and r["x"] == x and (n is None or r["n"] == n):
                return r
        return None

    out = []
    longest = max(grid["prompt_lengths"])
    e, h = find("prompt", "engine", longest, 1), find("prompt", "hf", longest, 1)
    if e and h:
        ratio = e["prefill_seconds"] / h["hf_forward_seconds"]
        measured = f"{e['prefill_seconds']:.2f} s vs {h['hf_forward_seconds']:.2f} s = {ratio:.2f}x"
        out.append({"target": f"{longest}-token prompt: engine prefill <= {PREFILL_TARGET}x HF forward",
                    "measured": measured, "pass": ratio <= PREFILL_TARGET})
        over = e["peak_over_model_bytes"]
        hf_over = h["hf_forward_peak_rss_bytes"] - h["model_rss_bytes"]
        out.append({"target": f"{longest}-token prompt: engine peak RSS over the model's "
                    f"<= {MEMORY_TARGET / 1e9:g} GB",
                    "measured": f"{over / 1e9:.2f} GB (HF forward: {hf_over / 1e9:.2f} GB)",
                    "pass": over <= MEMORY_TARGET})
    for context in grid["contexts"]:
        if context < 1000 and context != max(grid["contexts"]):
            continue
        e, h = find("completion", "engine", context), find("completion", "hf", context)
        if e and h:
            ratio = e["tokens_per_second"] / h["tokens_per_second"]
            measured = f"{e['tokens_per_second']:.1f} vs {h['tokens_per_second']:.1f} = {ratio:.2f}x"
            target = f"context {context}, {e['sequences']} seqs: engine >= {DECODE_TARGET}x HF tok/s"
            out.append({"target": target,
                        "measured": measured, "pass": ratio >= DECODE_TARGET})
    seqs = sorted({r["x"] for r in rows if r["axis"] == "sequences"})
    if len(seqs) >= 2:
        big = find("sequences", "engine", seqs[-1])
        ref = find("sequences", "engine", 64 if 64 in seqs[:-1] else seqs[-2])
        ratio = big["tokens_per_second"] / ref["tokens_per_second"]
        measured = f"{big['tokens_per_second']:.1f} vs {ref['tokens_per_second']:.1f} = {ratio:.2f}x"
        out.append({"target": f"{big['x']} seqs: engine tok/s >= at {ref['x']} seqs", "measured": measured,
                    "pass": ratio >= 1.0})
    return out


def plot(rows: list[dict], grid_sizes: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = [a for a in ("prompt", "completion", "sequences") if any(r["axis"] == a for r in rows)]
    xlabels = {"prompt": f"prompt tokens ({grid_sizes['prompt_tokens']} new tokens)",
               "completion": f"context tokens ({grid_sizes['completion_seqs']} seqs decoding)",
               "sequences": f"sequences ({grid_sizes['sequences_tokens']} new tokens)"}
    fig, grid = plt.subplots(2, len(axes_names), figsize=(5 * len(axes_names), 7.5), squeeze=False)
    styles = {"engine": ("C0", "o"), f"engine skip {SKIP_RATIO}": ("C2", "s"), "hf": ("C3", "^")}
    for col, axis in enumerate(axes_names):
        mine = [r for r in rows if r["axis"] == axis]
        series: dict[tuple, list] = {}
        for r in mine:
            key = (r["system"], r["n"]) if axis == "prompt" else (r["system"], None)
            series.setdefault(key, []).append(r)
        for (system, n), rs in series.items():
            rs.sort(key=lambda r: r["x"])
            color, marker = styles.get(system, ("C7", "x"))
            label = system if n is None else f"{system} n={n}"
            style = "--" if n not in (None, 1) else "-"
            xs = [r["x"] for r in rs]
            grid[0][col].plot(xs, [r["tokens_per_second"] for r in rs], style, color=color, marker=marker,
                              label=label)
            grid[1][col].plot(xs, [r["peak_rss_bytes"] / 2**30 for r in rs], style, color=color,
                              marker=marker, label=label)
        for row, ylabel in ((0, "generated tokens/s"), (1, "peak RSS (GiB)")):
            ax = grid[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabels[axis])
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        grid[0][col].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return ""


def main() -> None:
    from tqdm import tqdm

    from nreft_engine.models.loader import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run on smaller sizes (prompts <= 512, 16 seqs at context <= 512, ...)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a load_model name or path")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--axes", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", help="JSON path (the PNG beside it); default "
                        "benchmarks/results/scaling-cpu-<dtype>.json, a temporary folder with --quick")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker), args.dtype, args.worker_out)
        return
    grid = QUICK if args.quick else FULL
    if args.out:
        out = args.out
    elif args.quick:
        out = os.path.join(tempfile.gettempdir(), f"scaling-quick-{args.dtype}.json")
    else:
        out = os.path.join(os.path.dirname(__file__), "results", f"scaling-cpu-{args.dtype}.json")
    todo = cases(grid, args.axes, args.model)
    rows = []
    start = time.perf_counter()
    bar = tqdm(todo, desc="scaling", unit="row")
    for case in bar:
        shown = (f"{k}={v}" for k, v in case.items() if k not in ("axis", "model", "skip"))
        bar.set_postfix_str(" ".join(shown))
        rows.append(run_case(case, args.dtype))
    bar.close()
    add_ratios(rows)
    print_table(rows)
    verdicts = targets(rows, grid)
    print()
    for t in verdicts:
        print(f"{'PASS' if t['pass'] else 'MISS'}  {t['target']}: {t['measured']}")
    import transformers

    from nreft_engine.bench import cpu_name

    machine = cpu_name()
    meta = {"machine": machine, "threads": torch.get_num_threads(), "model": args.model, "dtype": args.dtype,
            "torch": torch.__version__, "transformers": transformers.__version__, "commit": git_commit(),
            "quick": args.quick, "grid": grid, "seconds": time.perf_counter() - start}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({**meta, "targets": verdicts, "rows": rows}, f, indent=2)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(rows, verdicts))
    png = os.path.splitext(out)[0] + ".png"
    plot(rows, grid, png, f"{args.model} {args.dtype}, {machine}, {torch.get_num_threads()} threads")
    print(f"wrote {out}, its .md tables and {png} ({meta['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
