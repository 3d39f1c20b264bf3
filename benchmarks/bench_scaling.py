"""Accuracy against compute budget for reward-guided search (issue 17): greedy, majority vote, weighted vote,
best-of-N, step beam, SMC with a process reward and particle Gibbs on generated step-wise arithmetic.

    python benchmarks/bench_scaling.py [--problems 100] [--run 40] [--budgets 1 2 4 8 16 32 64]
                                       [--subset 12 --subset-from 32]
                                       [--reward exact|judge] [--temperature 0.8] [--out benchmarks/results/scaling.json]
    python benchmarks/bench_scaling.py --plot [--out ...] [--png docs/img/scaling.png]   # table + figure from the JSON
    python benchmarks/bench_scaling.py --quick --model tiny --out /tmp/s.json             # the test suite's mode

The task (``examples/arith_steps.lmp``, helpers in ``examples/arith_steps.py``): ``n0 op n1 op n2 op n3`` with
+ and -, numbers 2-20, every running value in [0, 40], ``--problems`` distinct problems drawn with
``--seed``; two worked examples, then one step per line (``Step k: a op b = c``, a hole per step in a loop).
The process reward is a ``factor`` per step: ``exact``, the Python checker (``a.step_logreward``: 0 for the
correct step, ``-penalty`` otherwise), or ``judge``, the LM itself asked whether the step is correct
(``logprob_of``; "pending" until the language has it). Steps are aggregated by ``--agg`` (product, min,
last: the factors telescope, see docs/inference.md "Reward-guided search").

One run of the program per (problem, strategy family, budget N), each a real run with its own counters:

* ``greedy``: ``greedy()`` (budget 1 only);
* ``importance(N)`` gives three strategies from one run (they read the same N samples): ``majority``
  (self-consistency: the most frequent answer, every sample one vote), ``weighted`` (the weighted vote:
  importance weights, i.e. the product of step rewards times the constraint mass, the tally ``vote`` makes
  on an importance base) and ``best_of`` (the answer of the sample with the best outcome reward, the
  aggregated reward R_T; ties: the majority among the best);
* ``beam``: ``beam(width=N)``, scored by log target = LM log-probability plus the reward factors;
* ``smc``: ``smc(particles=N, ess=0.5)``: resampling when the ESS falls below N/2, i.e. after the reward of
  a step has spread the weights (at the next step's first token); the answer is the weighted majority;
* ``pg``: ``particle_gibbs(iterations=4, particles=N/4)`` for N >= 8 (it needs 2 particles, one the
  reference): N particle passes of work; the answer is the majority of the 4 references.

Every family runs all problems of a budget as the groups (rows) of one batch (``Program.run_batch``: tokens and
time shared out per problem; beam rows are independent searches, each the search of a run of its own). Beam
records made before beam could run as groups (``batch_rows`` 1) ran one problem per run.

Budget: N; the table and plot put accuracy against the tokens the particles processed (``stats.tokens``:
generated and per-particle forced text, the shared prompt excluded) and against wall time (``wall_s -
compile_s``), both means per problem. Accuracy: the fraction of problems whose answer is right, with a
Wilson 95 % interval. ``--problems`` are generated; the first ``--run`` of them run at budgets below
``--subset-from`` and the first ``--subset`` at the budgets from it on (the table says on how many problems
each row is; the figure's second row has every budget on the same ``--subset`` problems). Results go to ``--out`` after every run, and a restarted run
skips what is there (``--resume`` is the default), so the benchmark can run in the background for as long
as there is time. Figures are this machine's, in this run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = ROOT / "examples" / "arith_steps.lmp"
sys.path.insert(0, str(ROOT / "examples"))
import arith_steps  # noqa: E402

STRATEGIES = ("greedy", "majority", "weighted", "best_of", "beam", "smc", "pg")
#: The run family each strategy's answer comes from.
FAMILY = {"greedy": "greedy", "majority": "importance", "weighted": "importance", "best_of": "importance",
          "beam": "beam", "smc": "smc", "pg": "pg"}
PG_ITERATIONS = 4

#: The LM judge's step reward (``logprob_of``, LANGUAGE.md "Rewards from a language model"): the log of the
#: model's probability of " Yes" against " No" after the question, the step and "Is this step correct?".
JUDGE_REWARD = (
    'let judged = f"Q: {question}\\nStep: {step}\\nIs this step correct? Answer Yes or No:"\n'
    '    let yes = logprob_of(" Yes", given=judged)\n'
    '    let r = yes - log(exp(yes) + exp(logprob_of(" No", given=judged)))'
)
EXACT_REWARD = "let r = a.step_logreward(question, i, step, penalty)"


def program_source(reward: str) -> str:
    """The benchmark's program: ``examples/arith_steps.lmp`` returning the aggregated reward R_T (``score``,
    best-of-N's outcome reward) beside the answer, with the judge's reward line for ``judge``."""
    src = EXAMPLE.read_text()
    assert EXACT_REWARD in src and "\nreturn answer\n" in src, "examples/arith_steps.lmp changed its form"
    src = src.replace("\nreturn answer\n", "\nreturn answer, score\n")
    return src if reward == "exact" else src.replace(EXACT_REWARD, JUDGE_REWARD)


def load_program(reward: str):
    """The compiled program, or ``None`` with the reason when the judge is not available yet (pending)."""
    import lmprog

    try:
        return lmprog.compile(program_source(reward), filename=str(EXAMPLE)), None
    except lmprog.LmpError as err:
        return None, str(err).splitlines()[0]


def load_lm(name: str):
    if name == "tiny":
        from lmprog.backends.tiny import tiny_model

        return tiny_model(seed=1)
    from lmprog.backends.registry import load_model

    return load_model(name)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (95 % for z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def majority(answers: list[str], weights=None) -> str:
    """The answer with the largest total weight (uniform without weights); ties: the first reached."""
    total: dict[str, float] = {}
    for i, a in enumerate(answers):
        total[a] = total.get(a, 0.0) + (1.0 if weights is None else float(weights[i]))
    return max(total, key=lambda a: total[a]) if total else ""


def answer_of(family: str, result) -> str:
    """The answer of one run of ``family`` (not ``importance``: see :func:`importance_answers`)."""
    samples = result.samples  # the finished ones
    answers = [str(s.values["answer"]) for s in samples]
    if family == "beam":  # the highest-scoring beam
        i = max(range(len(samples)), key=lambda k: samples[k].log_weight, default=None)
        return answers[i] if i is not None else ""
    if family == "greedy":
        return answers[0] if answers else ""
    return majority(answers, [s.weight for s in samples])  # smc: the weighted majority; pg: the references


def importance_answers(particles: list[dict], n: int) -> list[dict[str, str]]:
    """``majority``, ``weighted`` and ``best_of`` answers of every block of ``n`` consecutive particles of one
    importance run (disjoint blocks). Importance particles are independent, so a block is distributed exactly
    as an ``n``-particle run: one run at the largest budget gives every smaller one."""
    out = []
    for b0 in range(0, len(particles) - n + 1, n):
        block = particles[b0 : b0 + n]
        answers = [p["answer"] for p in block]
        top = max(p["log_weight"] for p in block)
        weights = [math.exp(p["log_weight"] - top) for p in block]
        best = max(p["reward"] for p in block)
        out.append({"majority": majority(answers), "weighted": majority(answers, weights),
                    "best_of": majority([p["answer"] for p in block if p["reward"] == best])})
    return out


def strategy_of(family: str, n: int, temperature: float):
    from lmprog.inference import make_strategy

    opts = {"temperature": temperature, "enumerate": False}  # token by token, as when the grid was first run
    if family == "greedy":
        return make_strategy("greedy")
    if family == "importance":
        return make_strategy("importance", particles=n, **opts)
    if family == "smc":
        return make_strategy("smc", particles=n, ess=0.5, resample="systematic", **opts)
    if family == "beam":
        return make_strategy("beam", width=n, **opts)
    if family == "pg":
        return make_strategy("particle_gibbs", iterations=PG_ITERATIONS, particles=n // PG_ITERATIONS, **opts)
    raise ValueError(family)


def work(args) -> list[tuple[str, int, int]]:
    """The runs, ``(family, budget, problems)``, in the order they are made (every new budget and family
    compiles new kernels: minutes on a loaded CPU, so the most informative come first): the main budgets on
    the first ``--run`` problems, then the large ones on the first ``--subset``; within each, greedy, one
    importance run at the largest budget (it gives every smaller one), then smc, beam and particle Gibbs at
    the largest budget, a quarter of it, the smallest, then the rest from the top."""
    fams = {FAMILY[s] for s in args.strategies}
    out = []
    for tier_budgets, count in (([b for b in args.budgets if b < args.subset_from], args.run),
                                ([b for b in args.budgets if b >= args.subset_from], args.subset)):
        if not tier_budgets:
            continue
        top = max(tier_budgets)
        order = sorted(tier_budgets, key=lambda b: (b != top, b != top // 4, b != min(tier_budgets), -b))
        if "greedy" in fams and 1 in tier_budgets:
            out.append(("greedy", 1, count))
        if "importance" in fams:
            out.append(("importance", top, count))
        alone = min(count, args.alone)  # beam: on at most --alone problems
        for b in order:
            out += [(f, b, alone if f == "beam" else count) for f in ("smc", "beam", "pg")
                    if f in fams and not (f == "pg" and b < 2 * PG_ITERATIONS)]
    return out


def run_key(reward: str, agg: str, family: str, budget: int, problem: int) -> str:
    return f"{reward}|{agg}|{family}|{budget}|{problem}"


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "runs": {}}


def save_results(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def record(args, family: str, budget: int, i: int, prob: dict, result, tokens: float, wall: float,
           compile_s: float, rows: int, cpu: float | None = None) -> dict:
    """One problem's record: its answer(s), whether right, and its share of the run's tokens, wall time and CPU
    time (this process's, all threads: unlike wall time, not stretched by other jobs that take the cores)."""
    rec = {"reward": args.reward, "agg": args.agg, "family": family, "budget": budget, "problem": i,
           "question": prob["question"], "tokens": tokens, "wall_s": wall, "compile_s": compile_s, "batch_rows": rows}
    if cpu is not None:
        rec["cpu_s"] = cpu
    if family == "importance":
        rec["particles"] = [{"answer": str(s.values["answer"]), "reward": float(s.values["score"]),
                             "log_weight": float(s.log_weight)}
                            for s in result.samples]
    else:
        a = answer_of(family, result)
        rec["answers"] = {family: a}
        rec["correct"] = {family: arith_steps.solved(prob["question"], a)}
    return rec


def run_benchmark(args) -> dict:
    """Make every missing run of :func:`work`, saving after each; returns the results."""
    out = Path(args.out)
    data = load_results(out) if args.resume else {"meta": {}, "runs": {}}
    problems = arith_steps.make_problems(args.problems, seed=args.seed)
    program, pending = load_program(args.reward)
    data["meta"].update(machine=f"{platform.machine()}, {os.cpu_count()} cores, CPU", model=args.model,
                        seed=args.seed, problems=len(problems), temperature=args.temperature,
                        penalty=args.penalty, run=args.run, alone=args.alone, subset=args.subset, subset_from=args.subset_from,
                        pg_iterations=PG_ITERATIONS, budgets=sorted(args.budgets))
    data.setdefault("pending", {})
    if program is None:
        data["pending"][args.reward] = pending
        print(f"reward {args.reward!r} pending: {pending}")
        save_results(out, data)
        return data
    data["pending"].pop(args.reward, None)
    lm = load_lm(args.model)
    inputs = lambda prob: {"question": prob["question"], "steps": 3, "agg": args.agg,  # noqa: E731
                           "penalty": args.penalty}
    for family, budget, count in work(args):
        todo = [i for i in range(min(count, len(problems)))
                if run_key(args.reward, args.agg, family, budget, i) not in data["runs"]]
        if not todo:
            continue
        strategy = strategy_of(family, budget, args.temperature)
        opts = dict(lm=lm, strategy=strategy, seed=args.seed, max_tokens=args.max_tokens,
                    memory_limit=args.memory_limit)
        # every problem one group of one engine call (more than fit one call: several), tokens and time shared out
        t0, c0 = time.perf_counter(), time.process_time()
        results = program.run_batch([inputs(problems[i]) for i in todo], **opts)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        per = lambda x: float(x) / len(todo)  # noqa: E731
        for i, r in zip(todo, results):
            # a row's share of its own engine call (rows that did not fit one call ran in several)
            rows = int(r.stats.get("batch_rows") or 1)
            data["runs"][run_key(args.reward, args.agg, family, budget, i)] = record(
                args, family, budget, i, problems[i], r, float(r.stats.get("tokens", 0)) / rows, per(wall),
                float(r.stats.get("compile_s") or 0.0) / rows, rows, per(cpu))
        save_results(out, data)
        if args.verbose:
            acc = [data["runs"][run_key(args.reward, args.agg, family, budget, i)] for i in todo]
            print(f"{family:10s} N={budget:3d} on {len(todo):3d} problems: {sum(x['wall_s'] for x in acc):7.1f} s",
                  flush=True)
    return data


def per_problem(data: dict, reward: str, agg: str) -> dict:
    """``{(strategy, budget): {problem: (score in [0, 1], tokens, wall s)}}`` from the runs. Importance-based
    strategies at budget n read the smallest importance run with at least n particles: a problem's score is
    the fraction of its disjoint n-particle blocks answered right, its tokens and time n / N of the run's."""
    runs = [r for r in data["runs"].values() if r["reward"] == reward and r["agg"] == agg]
    out: dict = {}
    imp: dict = {}
    for r in runs:
        if r["family"] == "importance":
            imp.setdefault(r["problem"], []).append(r)
            continue
        s = r["family"]
        out.setdefault((s, r["budget"]), {})[r["problem"]] = (float(r["correct"][s]), r["tokens"],
                                                              r["wall_s"] - r["compile_s"])
    budgets = sorted({r["budget"] for r in runs if r["family"] != "importance"} |
                     {b for r in runs if r["family"] == "importance" for b in data["meta"].get("budgets", [])
                      if b <= r["budget"]})
    for p, recs in imp.items():
        for n in budgets:
            fit = [r for r in recs if r["budget"] >= n and len(r["particles"]) >= n]
            if not fit:
                continue
            r = min(fit, key=lambda x: x["budget"])
            blocks = importance_answers(r["particles"], n)
            share = n / max(len(r["particles"]), 1)
            for s in ("majority", "weighted", "best_of"):
                ok = sum(arith_steps.solved(r["question"], b[s]) for b in blocks) / len(blocks)
                out.setdefault((s, n), {})[p] = (ok, r["tokens"] * share, (r["wall_s"] - r["compile_s"]) * share)
    return out


def summarize(data: dict, reward: str = "exact", agg: str = "product", problems=None) -> list[dict]:
    """One row per (strategy, budget): accuracy (mean score) with a Wilson 95 % interval on the summed scores,
    mean tokens and mean wall time per problem, over the problems that ran it (``problems``: only these)."""
    rows = []
    table = per_problem(data, reward, agg)
    for (s, b), got in sorted(table.items(), key=lambda kv: (kv[0][1], STRATEGIES.index(kv[0][0]))):
        if problems is not None:
            got = {p: v for p, v in got.items() if p in problems}
        if not got:
            continue
        n = len(got)
        k = sum(v[0] for v in got.values())
        lo, hi = wilson(round(k), n)
        rows.append({"strategy": s, "budget": b, "problems": n, "accuracy": k / n, "ci": [lo, hi],
                     "tokens": sum(v[1] for v in got.values()) / n, "wall_s": sum(v[2] for v in got.values()) / n})
    return rows


def subset_rows(data: dict, problems: int, reward="exact", agg="product") -> list[dict]:
    """The rows of :func:`summarize` on the first ``problems`` problems only (every budget on the same ones)."""
    return summarize(data, reward, agg, problems=set(range(problems)))


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'strategy':10s} {'N':>4s} {'probs':>5s} {'accuracy':>8s} {'95% CI':>13s} {'tokens':>8s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['strategy']:10s} {r['budget']:4d} {r['problems']:5d} {r['accuracy']:8.3f} "
              f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] {r['tokens']:8.0f} {r['wall_s']:7.2f}")


def plot(data: dict, png: Path, reward="exact", agg="product") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = data["meta"]
    sets = [("all problems", summarize(data, reward, agg))]
    if meta.get("subset") and meta.get("subset_from") and meta["subset"] < meta.get("problems", 0):
        sets.append((f"first {meta['subset']} problems (every budget)", subset_rows(data, meta["subset"], reward, agg)))
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4.2 * len(sets)), squeeze=False)
    for row, (label, rows) in enumerate(sets):
        full = {}
        for r in rows:
            full.setdefault(r["strategy"], []).append(r)
        top = max((r["problems"] for r in rows), default=0)
        for col, (xkey, xlabel) in enumerate((("tokens", "tokens per problem"), ("wall_s", "wall s per problem"))):
            ax = axes[row][col]
            for s, rs in full.items():
                rs = [r for r in rs if r["problems"] == top] if row == 0 else rs
                if not rs:
                    continue
                x = [max(r[xkey], 1e-3) for r in rs]
                y = [r["accuracy"] for r in rs]
                err = [[r["accuracy"] - r["ci"][0] for r in rs], [r["ci"][1] - r["accuracy"] for r in rs]]
                ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=s, linestyle="-" if len(rs) > 1 else "none")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1)
            ax.set_title(f"{label}, n={top}")
            ax.grid(alpha=0.3)
            if col == 0:
                ax.legend(fontsize=8)
    fig.suptitle(f"{meta.get('model')} on 3-step arithmetic, reward={reward}, agg={agg}, T={meta.get('temperature')}"
                 f" ({meta.get('machine')}, shared; Wilson 95 % intervals)", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="a model name, or 'tiny' (a tiny random model)")
    ap.add_argument("--problems", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budgets", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--run", type=int, default=40, help="problems run (the first ones) at budgets below --subset-from")
    ap.add_argument("--alone", type=int, default=20, help="at most this many problems for beam")
    ap.add_argument("--subset", type=int, default=12, help="problems run at the budgets from --subset-from on")
    ap.add_argument("--subset-from", type=int, default=32)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    ap.add_argument("--reward", default="exact", choices=("exact", "judge"))
    ap.add_argument("--agg", default="product", choices=("product", "min", "last"))
    ap.add_argument("--penalty", type=float, default=4.0, help="exact reward: log-reward of a wrong step")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--memory-limit", default=None, help="memory a batch may use beyond the model, e.g. 5G (fewer rows "
                    "per engine call; default: what the machine has free when each call starts)")
    ap.add_argument("--out", default=str(HERE / "results" / "scaling.json"))
    ap.add_argument("--png", default=str(ROOT / "docs" / "img" / "scaling.png"))
    ap.add_argument("--no-resume", dest="resume", action="store_false")
    ap.add_argument("--plot", action="store_true", help="only print the table and draw the figure from --out")
    ap.add_argument("--quick", action="store_true", help="2 problems at budget 8, the smallest with particle Gibbs; no greedy (the test suite's mode)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.problems, args.run, args.budgets, args.subset_from = 2, 2, [2 * PG_ITERATIONS], 10**9
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    data = load_results(Path(args.out)) if args.plot else run_benchmark(args)
    rows = summarize(data, args.reward, args.agg)
    print_table(rows, f"reward={args.reward} agg={args.agg} ({data['meta'].get('model')}, {data['meta'].get('machine')})")
    if data.get("pending", {}).get(args.reward):
        print(f"reward {args.reward!r}: PENDING ({data['pending'][args.reward]})")
    if args.plot:
        meta = data["meta"]
        if meta.get("subset"):
            print_table(subset_rows(data, meta["subset"], args.reward, args.agg), f"first {meta['subset']} problems")
        plot(data, Path(args.png), args.reward, args.agg)
    return data


if __name__ == "__main__":
    main()
