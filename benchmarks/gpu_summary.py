"""The GPU suite's last word: each step's outcome, then the performance targets, measured against required.

Reads what benchmarks/gpu_suite.sh leaves in its work folder (steps.jsonl, each step's log and JSON), prints
two tables and writes them as JSON. The targets are for the Qwen2.5-1.5B shape in bf16 on an H200; in the
suite's CPU check the same tables hold the tiny model's numbers, which only show that each step ran and wrote
what this reads.

    python benchmarks/gpu_summary.py WORK_FOLDER [--json summary.json]
"""

from __future__ import annotations

import argparse
import json
import os

# Decode at half the memory floor's speed or better, skipping a quarter of the layers paying off end to end at
# both batch sizes, and a new skip set's graph capture cheap next to the steps it serves.
DECODE_MS = {64: 1.5, 1: 1.3}  # steady decode ms per step at skip 0, by sequences
SKIP_SPEEDUP = 1.25  # skip 0.25 over skip 0, end-to-end tok/s
CAPTURE_MS = 6.0  # one decode graph for a new skip set, captured the engine's way (median)
H200_COPY_GBPS = 4132  # the H200's measured copy bandwidth (RESULTS.md), for a run that measured none


def load(work: str, name: str) -> dict | None:
    path = os.path.join(work, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def rows_by_case(work: str, *names: str) -> dict:
    """The rows of the first of these rollout_throughput.py JSON files that exists, by (sequences, system)."""
    for name in names:
        data = load(work, name)
        if data:
            return {(r["sequences"], r["system"]): r for r in data["rows"]}
    return {}


def read_steps(work: str) -> list[dict]:
    """steps.jsonl's records, each with the last line of its step's log."""
    steps = []
    with open(os.path.join(work, "steps.jsonl")) as f:
        for line in f:
            step = json.loads(line)
            log = os.path.join(work, f"{step['step']}.log")
            if os.path.exists(log):
                with open(log, errors="replace") as f_log:
                    lines = [x.strip() for x in f_log if x.strip()]
                step["last_line"] = lines[-1] if lines else ""
            steps.append(step)
    return steps


def target(name: str, required: str, measured: str | None, ok: bool | None, note: str = "") -> dict:
    """One row; a measurement with nothing to pass (ok None) is information, the others PASS or MISS."""
    verdict = ("info" if measured else "no data") if ok is None else "PASS" if ok else "MISS"
    return {"target": name, "required": required, "measured": measured or "-", "verdict": verdict,
            "note": note}


def targets(work: str, steps: list[dict]) -> list[dict]:
    by_step = {s["step"]: s for s in steps}
    rows = []
    for name, what in (("build", "CUDA extension builds"), ("tests", "GPU tests pass, no interpreter")):
        s = by_step.get(name, {})
        measured, ok = (f"exit {s['rc']}", s["rc"] == 0) if "rc" in s else (None, None)
        rows.append(target(what, "exit 0", measured, ok, s.get("skipped") or s.get("last_line", "")))

    engine = rows_by_case(work, "rollout.json", "rollout_eager.json")
    one_layer = rows_by_case(work, "rollout_1layer.json")
    bench = load(work, "bench.json")
    copy_gbps = bench["benchmarks"][0]["extra_info"]["copy_gbps"] if bench and bench["benchmarks"] else None
    floor_ms = None
    if engine:
        weight_gb = next(iter(engine.values()))["weight_bytes"] / 1e9
        floor_ms = weight_gb / (copy_gbps or H200_COPY_GBPS)
        source = f"this run's {copy_gbps:.0f}" if copy_gbps else f"the H200's {H200_COPY_GBPS}"
        rows.append(target("memory floor: the weights read once a step", "-", f"{floor_ms:.3f} ms", None,
                           f"{weight_gb:.2f} GB at {source} GB/s copy bandwidth (Qwen2.5-1.5B on an H200: "
                           "3.09 GB at 4132 GB/s, 0.75 ms)"))

    profile = {(c["sequences"], c["skip"]): c for c in (load(work, "profile.json") or {"cases": []})["cases"]}
    for seqs, limit in DECODE_MS.items():
        ms = engine.get((seqs, "engine skip 0.0"), {}).get("steady_decode_ms_per_step")
        note = f"{100 * floor_ms / ms:.0f}% of the floor's speed" if ms else ""
        p = profile.get((seqs, 0.0))
        if p and p["busy_percent"] is not None:
            note += f"; profiled: {p['device_ms_per_step']:.2f} ms of kernels, {p['busy_percent']:.0f}% busy"
        rows.append(target(f"decode ms/step, batch {seqs}, skip 0", f"<= {limit} ms", ms and f"{ms:.3f} ms",
                           ms and ms <= limit, note))
    for seqs in DECODE_MS:
        ms = one_layer.get((seqs, "engine skip 0.0"), {}).get("steady_decode_ms_per_step")
        rows.append(target(f"decode ms/step, batch {seqs}, 1 layer", "-", ms and f"{ms:.3f} ms", None,
                           "what skipping cannot remove: host work, lm head, sampler"))

    for seqs in DECODE_MS:
        base, skip = engine.get((seqs, "engine skip 0.0")), engine.get((seqs, "engine skip 0.25"))
        ratio, note = None, ""
        if base and skip:
            ratio = skip["tokens_per_second"] / base["tokens_per_second"]
            steady = skip["steady_decode_tokens_per_second"] / base["steady_decode_tokens_per_second"]
            note = f"decode steps alone (graph captures out): {steady:.2f}x"
        rows.append(target(f"skip 0.25 / skip 0 end to end, batch {seqs}", f">= {SKIP_SPEEDUP}x",
                           ratio and f"{ratio:.2f}x", ratio and ratio >= SKIP_SPEEDUP, note))

    capture = (load(work, "capture.json") or {"rows": []})["rows"]
    engine_way = {r["sequences"]: r for r in capture if r["variant"] == "engine"}
    for seqs in DECODE_MS:
        r = engine_way.get(seqs)
        note = r and (f"{min(r['capture_ms']):.1f}-{max(r['capture_ms']):.1f} ms, "
                      f"same tokens as eager: {r['same_tokens_as_eager']}")
        rows.append(target(f"graph capture, new skip set, batch {seqs}", f"<= {CAPTURE_MS} ms",
                           r and f"{r['median_ms']:.1f} ms", r and r["median_ms"] <= CAPTURE_MS, note or ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", help="the suite's work folder")
    parser.add_argument("--json", help="write the two tables here")
    args = parser.parse_args()
    steps = read_steps(args.work)
    print(f"\n{'step':15} {'outcome':>8} {'s / limit':>10}  last line of its log")
    for s in steps:
        if "skipped" in s:
            print(f"{s['step']:15} {'skipped':>8} {'':>10}  ({s['skipped']})")
        else:
            outcome = "timeout" if s["rc"] in (124, 137) else f"rc={s['rc']}"  # timeout's codes: TERM, KILL
            time = f"{s['seconds']} / {s['limit']}"
            print(f"{s['step']:15} {outcome:>8} {time:>10}  {s.get('last_line', '')[:100]}")
    rows = targets(args.work, steps)
    print(f"\n{'target':42} {'required':>10} {'measured':>10} {'verdict':>7}  note")
    for r in rows:
        print(f"{r['target']:42} {r['required']:>10} {r['measured']:>10} {r['verdict']:>7}  {r['note']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "targets": rows}, f, indent=2)


if __name__ == "__main__":
    main()
