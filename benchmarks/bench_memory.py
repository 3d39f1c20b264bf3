"""Peak memory of a choice program against the particle count: caches sized by what holes can reach.

    python benchmarks/bench_memory.py [--particles 16 250 1000 2000] [--no-reach] [--planner]
                                      [--model smollm2-135m] [--seed 0] [--json]

The program (a 13-token prompt, then a four-way choice that ends at EOS; the prompt's trailing space is healed
into the hole, so the values are generated as " Red" ...)::

    infer smc(particles=16, ess=0.5)
    "Q: What is the colour of ripe bananas?\\nA: [answer]" where answer in ["Red", "Blue", "Yellow", "Red."]
    return answer

runs through ``lmprog.load``/``Program.run`` with ``particles=N`` for every ``N`` of ``--particles``, each in a
fresh Python process (model load included), so the peak resident memory (the child's own ``VmHWM``) is that
run's. Reported per count: peak RSS, wall time of ``Program.run`` (lowering + engine, not the model load), the
engine's compile seconds, the KV-cache slots per particle, and the total variation distance of the posterior
to the exact one (every tokenisation of each choice + EOS scored with the model, by
:func:`lmprog.inference.exact.enumerate_program` over the lowered program, in its own process).

``--no-reach`` runs the same program sized as before holes knew their reach: the engine's sizing
(``engine._room``) sees every hole with ``Hole.reach = None`` (buffers and the KV cache reserve the budget, 256
tokens, plus the terminator slack); the target, mask and budget are the same.

The engine's memory pre-flight (``lmprog.inference.memory``) is given ``memory_limit=1T`` unless ``--planner``
is passed, so that a run is never split into waves and its peak is what its sizing allocates.

Guard: a count is skipped, with a message, when its estimated peak exceeds 80 % of ``MemAvailable`` in
``/proc/meminfo`` at launch. The estimate is the smallest run's peak plus the per-particle growth, measured from
the runs so far (at least two), else from the first run's KV-cache and logits sizes (a conservative a priori
figure). A watchdog also ends the child (by its pid) if ``MemAvailable`` falls under 5 % of ``MemTotal``, so the
OS never has to kill anything.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time

PROGRAM = '''infer smc(particles=16, ess=0.5)
"Q: What is the colour of ripe bananas?\\nA: [answer]" where answer in ["Red", "Blue", "Yellow", "Red."]
return answer
'''
CHOICES = ("Red", "Blue", "Yellow", "Red.")


def _meminfo() -> dict:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0]) * 1024
    return out


def _status(pid="self") -> dict:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


def _no_reach(engine) -> None:
    """Size every hole by its budget again: the engine's sizing (``engine._room``, read by the layout, the
    memory pre-flight and the walk) sees ``Hole.reach = None``. The mask never reads reach."""
    import dataclasses

    from lmprog.inference import Hole

    real = engine._room

    def room(seg, strategy, slack):
        return real(dataclasses.replace(seg, reach=None) if isinstance(seg, Hole) else seg, strategy, slack)

    engine._room = room


def _record_setup(engine, seen: list) -> None:
    real = engine.setup

    def setup(*args, **kwargs):
        r, state, s = real(*args, **kwargs)
        own = int(state.cache.k[0].shape[2]) if hasattr(state.cache, "k") else None  # [B, KV, S, D] per layer
        seen.append({"cache_len": int(s.cache_len), "own_slots": own, "buffer": int(state.particles.tokens.shape[1]),
                     "holes": [h.reach for h in r.program.holes]})
        return r, state, s

    engine.setup = setup


def worker(args) -> dict:
    """One run, in this (fresh) process."""
    import lmprog
    from lmprog.inference import engine
    from lmprog.runner import get_model

    t0 = time.perf_counter()
    lm = get_model(args.model)
    load_s = time.perf_counter() - t0
    if args.no_reach:
        _no_reach(engine)
    seen: list = []
    _record_setup(engine, seen)
    program = lmprog.compile(PROGRAM, "bench_memory.lmp")
    opts = {}
    if not args.planner and "memory_limit" in inspect.signature(program.run).parameters:
        opts["memory_limit"] = "1T"  # the engine allocates what the run needs: this benchmark guards the machine
    t = time.perf_counter()
    result = program.run(lm=lm, particles=args.worker, seed=args.seed, **opts)
    wall = time.perf_counter() - t
    cfg = getattr(lm, "config", None)
    slot_bytes = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4 if cfg is not None else None
    return {
        "particles": args.worker,
        "peak_rss": _status().get("VmHWM"),
        "wall_s": wall,
        "load_s": load_s,
        "compile_s": float(result.stats.get("compile_s", 0.0)),
        "waves": result.stats.get("waves", 1),
        "memory_estimate": result.stats.get("memory_estimate"),
        "posterior": {c: result.probability(answer=c) for c in CHOICES},
        "log_evidence": result.log_evidence,
        "setup": seen[-1] if seen else None,
        "slot_bytes": slot_bytes,
        "vocab": int(lm.vocab_size),
    }


def exact(args) -> dict:
    """The exact posterior over the choices: every complete sequence of the lowered program, scored."""
    import numpy as np

    import lmprog
    from lmprog.compiler.lower import lower
    from lmprog.inference.exact import enumerate_program
    from lmprog.runner import get_model

    lm = get_model(args.model)

    class Scored:  # the real model as exact.py's host_logits (its log-probabilities are logits)
        tokenizer = lm.tokenizer
        vocab_size = lm.vocab_size

        @staticmethod
        def host_logits(history):
            return np.asarray(lm.logprobs(list(history))[-1], np.float64)

    low = lower(lmprog.compile(PROGRAM, "bench_memory.lmp"), lm.tokenizer, {})
    ex = enumerate_program(Scored(), low.program)
    marginal = ex.marginal(lambda p: p.values["answer"])
    return {"posterior": {c: marginal.get(c, 0.0) for c in CHOICES}, "log_z": ex.log_z, "sequences": len(ex.paths),
            "prefix_tokens": len(ex.prefix)}


def _child(cmd: list[str]) -> tuple[dict | None, str]:
    """Run a child, with the memory watchdog. Returns its JSON (or None) and a note."""
    total = _meminfo()["MemTotal"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    note = ""
    while proc.poll() is None:
        if _meminfo()["MemAvailable"] < 0.05 * total:
            proc.kill()  # our own child, by its pid
            note = "ended by the watchdog (MemAvailable < 5 % of MemTotal)"
            break
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode != 0:
        return None, note or f"failed (exit {proc.returncode}): {err.strip().splitlines()[-1] if err.strip() else ''}"
    return json.loads(out.strip().splitlines()[-1]), note


def _estimate(runs: list[dict], n: int) -> tuple[float, str]:
    """Estimated peak bytes of a run with ``n`` particles, from the runs so far."""
    runs = sorted(runs, key=lambda r: r["particles"])
    base = runs[0]
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        per = max(0.0, (b["peak_rss"] - a["peak_rss"]) / (b["particles"] - a["particles"]))
        how = f"{per / 2**20:.2f} MiB/particle measured"
    else:  # a priori: the own KV cache once (resampling moves row indices; decode blocks are bounded), its
        # particle state and buffers
        slots = (base["setup"] or {}).get("own_slots") or (base["setup"] or {}).get("cache_len", 272)
        per = slots * (base["slot_bytes"] or 46080) + 4096
        how = f"{per / 2**20:.2f} MiB/particle a priori"
    return base["peak_rss"] + per * max(0, n - base["particles"]), how


def _slots(row: dict) -> str:
    s = row.get("setup") or {}
    return str(s.get("own_slots") or s.get("cache_len") or "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, nargs="+", default=[16, 250, 1000, 2000])
    ap.add_argument("--no-reach", action="store_true", help="size holes by their budget (Hole.reach = None)")
    ap.add_argument("--planner", action="store_true",
                    help="keep the engine's memory pre-flight (default: memory_limit=1T, so runs are never split "
                         "into waves and the peak is the engine's own; this script's guard protects the machine)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON too")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.exact:
        print(json.dumps(exact(args)))
        return
    if args.worker is not None:
        print(json.dumps(worker(args)))
        return

    me = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--seed", str(args.seed)]
    if args.planner and args.no_reach:
        print("# note: the memory pre-flight sees the same sizing as the run (engine._room)")
    truth, note = _child(me + ["--exact"])
    if truth is None:
        sys.exit(f"exact posterior: {note}")
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {_meminfo()['MemTotal'] / 2**30:.1f} GiB; "
          f"python {platform.python_version()}")
    print(f"# sizing: {'budget (--no-reach)' if args.no_reach else 'reach'}; exact posterior "
          f"({truth['sequences']} tokenisations, prompt {truth['prefix_tokens']} tokens): "
          + ", ".join(f"{k} {v:.4f}" for k, v in truth["posterior"].items()))
    rows: list[dict] = []
    print("| particles | peak RSS (GiB) | wall (s) | compile (s) | KV slots per particle | TV to exact |"
          + (" waves |" if args.planner else ""))
    print("|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.planner else ""))
    for n in args.particles:
        if rows:
            est, how = _estimate(rows, n)
            avail = _meminfo()["MemAvailable"]
            if est > 0.8 * avail:
                print(f"| {n} | skipped: estimated {est / 2**30:.1f} GiB ({how}) > 80 % of MemAvailable "
                      f"{avail / 2**30:.1f} GiB | | | | |", flush=True)
                continue
        flags = (["--no-reach"] if args.no_reach else []) + (["--planner"] if args.planner else [])
        row, note = _child(me + ["--worker", str(n)] + flags)
        if row is None:
            print(f"| {n} | {note} | | | | |", flush=True)
            continue
        tv = 0.5 * sum(abs(row["posterior"][c] - truth["posterior"][c]) for c in CHOICES)
        row["tv"] = tv
        rows.append(row)
        print(f"| {n} | {row['peak_rss'] / 2**30:.2f} | {row['wall_s']:.1f} | {row['compile_s']:.1f} | "
              f"{_slots(row)} | {tv:.3f} |" + (f" {row['waves']} |" if args.planner else ""), flush=True)
    if args.json:
        print(json.dumps({"exact": truth, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
