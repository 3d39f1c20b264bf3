"""Record the results of a fixed set of runs with fixed seeds, to check that a refactor keeps them identical.

    python benchmarks/record_results.py --out before.json          # every case (toy LMs + the default model)
    python benchmarks/record_results.py --out a.json --skip-model  # toy LMs only (no real model)
    python benchmarks/record_results.py --compare before.json after.json

Each case runs a program through the public API (``lmprog.compile`` / ``lmprog.load``, ``Program.run``,
``Program.run_batch``) and records ``Result.to_dict()`` with every timing field removed (any key ending in
``_s``: ``wall_s``, ``compile_s``, ``lower_s``, ``load_s``, ``engine_wall_s``, ``constraint_compile_s``, ...),
so two files written before and after a change can be compared with ``diff`` or with ``--compare``, which
compares numbers with a relative tolerance of 1e-6, prints every difference and exits 1 if there is one.
A run that raises records the error's type and message instead (paths under the checkout are written
relative to it, so files from two checkouts compare equal).

The cases cover every strategy (sample, greedy, importance, smc with each resampler, smc with rejuvenation,
beam, best_of, vote, mcmc with suffix and independent moves, particle_gibbs), a 3-row ``run_batch``, and
programs with observe, let / condition / factor, ``sample ~``, if / for, Python predicates (imported and
passed with ``functions=``, prefix predicates included) and a hole interpolated into later text. They run on:

* ``toy``: a random table-driven ToyLM over a 10-token vocabulary (programs written for it, below);
* ``ascii``: a random bigram ToyLM over printable ASCII (so programs of examples/ and tests/lmp/ run on it);
* ``tiny``: a tiny random-weight Llama over bytes (the real model class: KV cache, reordering, prefill);
* ``model``: the default model (smollm2-135m), a few short runs (skipped with ``--skip-model``).

Programs and helper files are read from the checkout this script sits in (examples/, tests/lmp/); a hash of
every program's source is recorded with its case, so a changed program shows up as a difference too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMAT = 1

# ----------------------------------------------------------------------------------------------- language models

TOY_VOCAB = ("<bos>", "<eos>", "a", "b", "c", " ", "\n", "Q", ":", "Z")
ASCII_VOCAB = ("<bos>", "<eos>", "\n") + tuple(chr(c) for c in range(32, 127))

_LMS: dict = {}


def get_lm(kind: str):
    """The language model of a case (built once per process); None for the default model."""
    if kind == "model":
        return None
    if kind not in _LMS:
        if kind == "toy":
            from lmprog.backends.toy import ToyLM

            _LMS[kind] = ToyLM.random(TOY_VOCAB, positions=24, seed=3, scale=1.0)
        elif kind == "ascii":
            from lmprog.backends.toy import ToyLM

            _LMS[kind] = ToyLM.random(ASCII_VOCAB, positions=8, seed=11, scale=1.5, name="toy-ascii")
        elif kind == "tiny":
            from lmprog.backends.tiny import tiny_model

            _LMS[kind] = tiny_model(seed=1)
        else:
            raise ValueError(kind)
    return _LMS[kind]


# ------------------------------------------------------------------------------------------------ programs

# let / condition / factor; the hole x interpolated into later text ("Z {x} [w]") and a let of it ({y} via pair)
TOY_MAIN = '''{infer}
input who: str = "Q"
let tag = who + ":"
"{{tag}} [x]\\n" where x matches r"[abc]{{1,3}}" and tokens(x) <= 3
let y = x + x
condition x != "b"
factor 1.0 if startswith(x, "a") else 0.0
"Z {{x}} [w]" where w in ["a", "b", "ab"]
return {{"x": x, "pair": y, "w": w}}
'''

# sample ~ (discrete and continuous), let, observe, factor
TOY_BAYES = '''{infer}
sample k ~ uniform_int(1, 3)
sample coin ~ bernoulli(0.3)
sample bias ~ beta(2, 2)
let side = "a" if coin else "b"
"Q: [x]\\n" where x in ["a", "b", "ab"]
observe "Z{{side}}"
factor log(bias) if coin else log(1 - bias)
return x, k, side, bias
'''

# if / else per particle, a for loop of indexed holes, a condition on the loop's list
TOY_BRANCH = '''{infer}
sample k ~ bernoulli(0.4)
"Q:"
if k:
    " [x]\\n" where x in ["a", "ab"]
else:
    " [x]\\n" where x matches r"[bc]+" and tokens(x) <= 3
    "Z"
for i in range(3):
    " [item]" where item in ["a", "b", "c"]
condition item[0] != "c" or k
return k, x, item
'''

# Python predicates: passed with functions= (one of them a prefix predicate) and imported (tests/lmp/helpers.py)
TOY_PRED = '''import "helpers.py" as h
{infer}
"Q: [x]\\n" where x matches r"[abc]{{1,4}}" and no_cc(x) and no_ba(x, prefix=true)
factor h.score(x, weight=0.5)
"Z [y]" where y in ["a", "b"]
return x, y
'''


def _no_cc(s):
    return "cc" not in s


def _no_ba(s):
    return "ba" not in s


TOY_FUNCTIONS = {"no_cc": _no_cc, "no_ba": _no_ba}

# for the batch: the input is interpolated into the prompt text (per-row prompts), rows differ in length
TOY_BATCH = '''{infer}
input who: str = "Q"
"{{who}}: [x]\\n" where x in ["a", "b", "ab"]
"{{who}} Z [y]\\n" where y matches r"[abc]{{1,2}}"
return x, y
'''

BATCH_ROWS = [{"who": "Q"}, {"who": "ZZ Q"}, {"who": "Qa"}]

INLINE = {"TOY_MAIN": TOY_MAIN, "TOY_BAYES": TOY_BAYES, "TOY_BRANCH": TOY_BRANCH, "TOY_PRED": TOY_PRED,
          "TOY_BATCH": TOY_BATCH}

# ------------------------------------------------------------------------------------------------- cases
# (name, lm kind, program, run options); program: ("inline", NAME, infer line) or ("file", relative path).
# Run options: seed, particles, strategy, max_tokens, temperature, inputs, and batch=[rows] for run_batch.

RESAMPLERS = ("multinomial", "stratified", "systematic", "residual")

CASES = [
    # --- every strategy on one program (toy LM)
    ("toy/main/sample", "toy", ("inline", "TOY_MAIN", "infer sample(4)"), dict(seed=1)),
    ("toy/main/greedy", "toy", ("inline", "TOY_MAIN", "infer greedy()"), dict(seed=0)),
    ("toy/main/importance", "toy", ("inline", "TOY_MAIN", "infer importance(particles=16)"), dict(seed=2)),
    *[(f"toy/main/smc-{r}", "toy", ("inline", "TOY_MAIN", f'infer smc(particles=16, ess=0.9, resample="{r}")'),
       dict(seed=3)) for r in RESAMPLERS],
    ("toy/main/smc-rejuvenate", "toy", ("inline", "TOY_MAIN", "infer smc(particles=8, ess=1.0, rejuvenate=2)"),
     dict(seed=4)),
    ("toy/main/beam", "toy", ("inline", "TOY_MAIN", "infer beam(width=4)"), dict(seed=0)),
    ("toy/main/best_of", "toy", ("inline", "TOY_MAIN", "infer best_of(6, score=logprob(x) + len(w))"),
     dict(seed=5)),
    ("toy/main/vote", "toy", ("inline", "TOY_MAIN", "infer vote(8, key=w)"), dict(seed=6)),
    ("toy/main/mcmc-suffix", "toy", ("inline", "TOY_MAIN", 'infer mcmc(steps=10, chains=2, burn_in=2, move="suffix")'),
     dict(seed=7)),
    ("toy/main/mcmc-independent", "toy",
     ("inline", "TOY_MAIN", 'infer mcmc(steps=6, chains=2, move="independent", particles=4)'), dict(seed=8)),
    ("toy/main/particle_gibbs", "toy", ("inline", "TOY_MAIN", "infer particle_gibbs(iterations=4, particles=4)"),
     dict(seed=9)),
    # the common options overriding the program's: temperature, max_tokens, particles, strategy by name
    ("toy/main/options", "toy", ("inline", "TOY_MAIN", "infer importance(particles=16)"),
     dict(seed=10, particles=12, temperature=0.7, max_tokens=6, inputs={"who": "QQ"})),
    # --- sample ~ / observe / factor
    ("toy/bayes/importance", "toy", ("inline", "TOY_BAYES", "infer importance(particles=32)"), dict(seed=0)),
    ("toy/bayes/mcmc-suffix", "toy", ("inline", "TOY_BAYES", "infer mcmc(steps=12, chains=2, burn_in=2)"),
     dict(seed=2)),
    ("toy/bayes/particle_gibbs", "toy", ("inline", "TOY_BAYES", "infer particle_gibbs(iterations=4, particles=4)"),
     dict(seed=3)),
    # --- if / for
    ("toy/branch/smc", "toy", ("inline", "TOY_BRANCH", "infer smc(particles=16)"), dict(seed=0)),
    ("toy/branch/particle_gibbs", "toy", ("inline", "TOY_BRANCH", "infer particle_gibbs(iterations=3, particles=4)"),
     dict(seed=2)),
    # --- Python predicates
    ("toy/pred/importance", "toy", ("inline", "TOY_PRED", "infer importance(particles=16)"), dict(seed=0)),
    ("toy/pred/best_of", "toy", ("inline", "TOY_PRED", "infer best_of(4, score=h.score(x) + logprob(x))"),
     dict(seed=1)),
    ("toy/pred/mcmc-independent", "toy",
     ("inline", "TOY_PRED", 'infer mcmc(steps=5, chains=2, move="independent", particles=4)'), dict(seed=2)),
    # --- batches of 3 rows (one grouped engine call; a strategy that runs row by row)
    ("toy/batch/importance", "toy", ("inline", "TOY_BATCH", "infer importance(particles=8)"),
     dict(seed=0, batch=BATCH_ROWS)),
    ("toy/batch/greedy", "toy", ("inline", "TOY_BATCH", "infer greedy()"), dict(seed=0, batch=BATCH_ROWS)),
    ("toy/batch/vote", "toy", ("inline", "TOY_BATCH", "infer vote(4, key=y)"), dict(seed=2, batch=BATCH_ROWS)),
    # --- programs of examples/ and tests/lmp/ on an ASCII toy LM (BOS, one token per character)
    ("ascii/tests/bayes", "ascii", ("file", "tests/lmp/bayes.lmp"), dict(seed=0, particles=16)),
    ("ascii/tests/branches", "ascii", ("file", "tests/lmp/branches.lmp"), dict(seed=0, max_tokens=12)),
    ("ascii/tests/list_loop", "ascii", ("file", "tests/lmp/list_loop.lmp"), dict(seed=0, particles=8, max_tokens=10)),
    ("ascii/tests/everything", "ascii", ("file", "tests/lmp/everything.lmp"), dict(seed=0, max_tokens=12)),
    ("ascii/examples/prime", "ascii", ("file", "examples/prime.lmp"), dict(seed=0)),
    ("ascii/examples/shopping_list", "ascii", ("file", "examples/shopping_list.lmp"), dict(seed=0, particles=8)),
    ("ascii/examples/bayes_topic", "ascii", ("file", "examples/bayes_topic.lmp"), dict(seed=0, particles=16)),
    ("ascii/examples/best_of", "ascii", ("file", "examples/best_of.lmp"), dict(seed=0, max_tokens=16)),
    ("ascii/examples/vote", "ascii", ("file", "examples/vote.lmp"), dict(seed=0, particles=4, max_tokens=12)),
    # --- the real model class (tiny random Llama over bytes)
    ("tiny/examples/capital", "tiny", ("file", "examples/capital.lmp"), dict(seed=0, particles=8, max_tokens=16)),
    ("tiny/examples/mcmc_fruit", "tiny", ("file", "examples/mcmc_fruit.lmp"), dict(seed=0, particles=2)),
    ("tiny/examples/sentiment-batch", "tiny", ("file", "examples/sentiment.lmp"),
     dict(seed=0, particles=8, batch=[{"review": "Great food."}, {"review": "It was awful, we left early."},
                                      {"review": "Fine."}])),
    # --- the default model (smollm2-135m), short runs
    ("model/examples/capital", "model", ("file", "examples/capital.lmp"), dict(seed=0, particles=8)),
    ("model/examples/sentiment", "model", ("file", "examples/sentiment.lmp"), dict(seed=0, particles=8)),
    ("model/examples/iso_date", "model", ("file", "examples/iso_date.lmp"), dict(seed=0, particles=8)),
    ("model/examples/beam", "model", ("file", "examples/beam.lmp"), dict(seed=0, particles=3, max_tokens=16)),
]


# ------------------------------------------------------------------------------------------------ running

def _is_timing(key) -> bool:
    return isinstance(key, str) and key.endswith("_s")


def strip_timings(obj, inside_value: bool = False):
    """A copy of ``obj`` without keys ending in ``_s`` (not inside returned values, which are the program's)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not inside_value and _is_timing(k):
                continue
            out[k] = strip_timings(v, inside_value or k in ("values", "value", "inputs"))
        return out
    if isinstance(obj, (list, tuple)):
        return [strip_timings(x, inside_value) for x in obj]
    return obj


def _clean_text(s: str) -> str:
    return s.replace(str(ROOT) + os.sep, "").replace(str(ROOT), ".")


def _error(exc: BaseException) -> dict:
    return {"error": type(exc).__name__, "message": _clean_text(str(exc))}


def _program(spec):
    import lmprog

    if spec[0] == "inline":
        _, name, infer = spec
        source = INLINE[name].format(infer=infer)
        # compiled as if it sat in tests/lmp/ (relative: the same in every checkout): `import "helpers.py"`
        # resolves to tests/lmp/helpers.py
        prog = lmprog.compile(source, f"tests/lmp/{name.lower()}.lmp",
                              functions=TOY_FUNCTIONS if name == "TOY_PRED" else None)
        return prog, source
    _, path = spec
    prog = lmprog.load(path)
    return prog, prog.source


def run_case(name, kind, spec, opts) -> dict:
    record = {"name": name, "lm": kind, "program": spec[1] if spec[0] == "file" else f"{spec[1]}: {spec[2]}",
              "options": {k: v for k, v in opts.items()}}
    try:
        prog, source = _program(spec)
    except Exception as exc:  # noqa: BLE001 - recorded
        record["program_error"] = _error(exc)
        return record
    record["source_sha256"] = hashlib.sha256(source.encode("utf-8")).hexdigest()
    lm = get_lm(kind)
    kw = {k: opts[k] for k in ("seed", "particles", "strategy", "max_tokens", "temperature") if k in opts}
    try:
        if "batch" in opts:
            out = prog.run_batch(opts["batch"], lm=lm, errors="return", **kw)
            record["batch"] = [_error(r) if isinstance(r, BaseException) else strip_timings(r.to_dict())
                               for r in out]
        else:
            record["result"] = strip_timings(prog.run(opts.get("inputs", {}), lm=lm, **kw).to_dict())
    except Exception as exc:  # noqa: BLE001 - recorded
        record["run_error"] = _error(exc)
    return record


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache in lmprog's cache folder, as lmprog turns it on when it loads a model
    (``$LMPROG_CACHE_DIR``/jax, else ~/.cache/lmprog/jax): repeated recordings skip most compiles. It changes
    compile times only, never results. Off with ``--no-compile-cache`` or ``LMPROG_NO_COMPILATION_CACHE=1``."""
    if os.environ.get("LMPROG_NO_COMPILATION_CACHE"):
        return
    import jax

    path = Path(os.environ.get("LMPROG_CACHE_DIR") or Path.home() / ".cache" / "lmprog") / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def record(out_path: str, skip_model: bool, only=None, use_cache: bool = True) -> int:
    os.chdir(ROOT)  # program paths (and the messages that name them) relative to the checkout
    t_start = time.perf_counter()
    if use_cache:
        _enable_compilation_cache()
    import lmprog

    print(f"lmprog from {Path(lmprog.__file__).resolve().parent}; programs from {ROOT}", file=sys.stderr)
    cases = [c for c in CASES if not (skip_model and c[1] == "model")]
    if only:
        cases = [c for c in cases if any(s in c[0] for s in only)]
    records = []
    for name, kind, spec, opts in cases:
        t0 = time.perf_counter()
        rec = run_case(name, kind, spec, opts)
        records.append(rec)
        status = next((f"{k}: {rec[k]['error']}" for k in ("program_error", "run_error") if k in rec), "ok")
        if "batch" in rec:
            errs = sum("error" in r for r in rec["batch"])
            status = f"batch of {len(rec['batch'])}" + (f", {errs} errors" if errs else "")
        print(f"{time.perf_counter() - t0:7.2f} s  {name}  ({status})", file=sys.stderr, flush=True)
    doc = {"format": FORMAT, "skip_model": bool(skip_model), "cases": records}
    text = json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=False, allow_nan=True)
    Path(out_path).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"{len(records)} cases in {time.perf_counter() - t_start:.1f} s -> {out_path}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------ comparing

REL_TOL = 1e-6
ABS_TOL = 1e-12


def _diff(a, b, path: str, out: list) -> None:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        if type(a) is not type(b) or a != b:
            out.append(f"{path}: {a!r} != {b!r}")
        return
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if isinstance(a, float) or isinstance(b, float):
            fa, fb = float(a), float(b)
            if math.isnan(fa) and math.isnan(fb):
                return
            if not math.isclose(fa, fb, rel_tol=REL_TOL, abs_tol=ABS_TOL):
                out.append(f"{path}: {a!r} != {b!r} (rel {abs(fa - fb) / max(abs(fa), abs(fb), 1e-300):.3g})")
        elif a != b:
            out.append(f"{path}: {a!r} != {b!r}")
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                out.append(f"{path}.{k}: only in A ({_short(a[k])})")
        for k in b:
            if k not in a:
                out.append(f"{path}.{k}: only in B ({_short(b[k])})")
        for k in a:
            if k in b:
                _diff(a[k], b[k], f"{path}.{k}", out)
        return
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{path}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _diff(x, y, f"{path}[{i}]", out)
        return
    if type(a) is not type(b) or a != b:
        out.append(f"{path}: {_short(a)} != {_short(b)}")


def _short(v, limit: int = 120) -> str:
    text = json.dumps(v, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare(path_a: str, path_b: str, max_lines: int = 400) -> int:
    with open(path_a, encoding="utf-8") as f:
        a = json.load(f)
    with open(path_b, encoding="utf-8") as f:
        b = json.load(f)
    diffs: list[str] = []
    ca = {c["name"]: c for c in a.get("cases", [])}
    cb = {c["name"]: c for c in b.get("cases", [])}
    for k in ("format", "skip_model"):
        if a.get(k) != b.get(k):
            diffs.append(f"{k}: {a.get(k)!r} != {b.get(k)!r}")
    for name in ca:
        if name not in cb:
            diffs.append(f"[{name}]: only in A")
    for name in cb:
        if name not in ca:
            diffs.append(f"[{name}]: only in B")
    per_case = {}
    for name in ca:
        if name in cb:
            d: list[str] = []
            _diff(ca[name], cb[name], f"[{name}]", d)
            per_case[name] = len(d)
            diffs.extend(d)
    for line in diffs[:max_lines]:
        print(line)
    if len(diffs) > max_lines:
        print(f"... {len(diffs) - max_lines} more differences")
    bad = [n for n, k in per_case.items() if k]
    only_a, only_b = len(set(ca) - set(cb)), len(set(cb) - set(ca))
    summary = f"compared {len(per_case)} cases (rel tol {REL_TOL:g}): "
    if not diffs:
        summary += "no differences"
    else:
        summary += f"{len(diffs)} differences; {len(bad)} cases differ" + (f" ({', '.join(bad)})" if bad else "")
        if only_a or only_b:
            summary += f"; {only_a} cases only in A, {only_b} only in B"
    print(summary)
    return 1 if diffs else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results.json", help="the JSON file to write (default: results.json)")
    parser.add_argument("--skip-model", action="store_true", help="toy LMs only: skip the runs on the real model")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two result files; exit 1 if they differ")
    parser.add_argument("--only", nargs="+", metavar="SUBSTR", help="run only the cases whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not turn on JAX's persistent compilation cache (compile times only)")
    args = parser.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.list:
        for name, kind, spec, opts in CASES:
            print(f"{name:40s} {kind:6s} {spec[1] if spec[0] == 'file' else spec[2]}  {opts}")
        return 0
    out = os.path.abspath(args.out)
    return record(out, args.skip_model, args.only, use_cache=not args.no_compile_cache)


if __name__ == "__main__":
    sys.exit(main())
