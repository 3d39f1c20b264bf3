"""Fuzz the front end: generate ``.lmp`` programs from the grammar's pieces and check each one.

A program passes when checking it either succeeds or raises :class:`lmprog.dsl.errors.LmpError` whose
diagnostics are all located (a line and column in a file) and none is an "internal error"; anything else is a
*crash*. A program whose check takes longer than ``--timeout`` seconds is a *hang*. Checks run in worker
processes (``--jobs``) fed one program at a time; a worker that hangs is killed and replaced, so one hang
costs one timeout.

Program ``i`` of a run is generated from ``random.Random(f"{seed}:{i}")``: a reported crash or hang is
reproduced with ``--seed S --start I --count 1 --show``.

    .venv/bin/python scripts/fuzz_check.py --count 5000 --seed 0 --timeout 10 --jobs 2
    .venv/bin/python scripts/fuzz_check.py --count 1000000 --max-seconds 300   # as many as fit in 5 minutes

The generator (:func:`program`) is also what ``tests/test_hardening_frontend.py`` draws from (with a
hypothesis-controlled ``random.Random``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_DIR = ROOT / "tests" / "lmp"  # has helpers.py, so `import "helpers.py" as h` resolves

NAMES = ["x", "y", "answer", "n", "s", "item", "k", "v", "h", "x", "y", "len"]
REGEXES = [
    r"[a-z]+", r"[A-Z][a-z]+( [A-Z][a-z]+)*", r"\d{1,3}", r"-?[0-9]+", r"(a|b)*c", r"yes|no", r"\w+", r"\s*\S+",
    r"(?i)hello", r"[^\n]*", r"a|ab", r"", r"(a|a)*b", r"(((a+)+)+)+b",
    # bounded repetitions: fast (byte DFA of a few thousand states) or a located limit error
    r".*a.{20}", r"a?[a-z]{40}", r"[^\n]*[^ ]{30}", r".{400,}", r"[^b]{300}", r"\w{100}", r"(a{1000}){1000}",
    r"(((a{9}){9}){9}){9}", r"[a-z]{0,40}", r"(ab|cd){3,7}",
    # invalid or unsupported
    r"[", r"(?=a)b", r"(ab)\1", r"^x$", r"\bword", r"a*+", r"[[:alpha:]]", r"a{,3}", r"[^\s\S]", r"\d{2,1}",
    r"\p{L}", r"(?#c)a", r"\x{41}", "a\nb",
]
STRINGS = ["", "a", "Paris", "hello world", "a\\nb", "\\x04", "é", "{", "}", "[[", "]]", "\\u3000", "\\t", "x" * 300,
           "\\x00", "\\ud800", "line\\none"]
INTS = [0, 1, 2, 3, 5, 8, 16, 100, 256, -1, 2 ** 31, 2 ** 62, 10 ** 30]
BUILTINS = ["len", "tokens", "words", "int", "float", "str", "lower", "upper", "strip", "split", "join", "contains",
            "startswith", "endswith", "count", "min", "max", "abs", "log", "exp", "logprob", "range", "print"]
STRATEGIES = ["sample(n=4)", "greedy()", "importance(particles=8)", "smc(particles=16, ess=0.5)", "beam(width=2)",
              "mcmc(steps=10, chains=2)", "smc(particles=-1)", "vote(n=3, key=x)", "best_of(n=2, score=len(x))",
              "particle_gibbs(iterations=2, particles=1)", "unknown(1)", "smc(ess=2)"]
MODELS = ['"smollm2-135m"', '"missing.gguf"', '""']
DISTS = ["choice([1, 2, 3])", "uniform_int(0, 9)", "bernoulli(0.5)", "poisson(3)", "categorical([0.2, 0.8])",
         "normal(0, 1)", "beta(1, 2)", "choice([])", "normal(0, -1)", "dirichlet(1)"]


def _str(rng: random.Random) -> str:
    quote = rng.choice(['"', "'"])
    body = rng.choice(STRINGS)
    return quote + body.replace(quote, "\\" + quote) + quote


def expr(rng: random.Random, depth: int = 0) -> str:
    """A random expression (valid or not) of nesting depth at most about 4."""
    k = rng.randrange(16 if depth < 3 else 4)
    if k == 0:
        return str(rng.choice(INTS))
    if k == 1:
        return _str(rng)
    if k == 2:
        return rng.choice(NAMES)
    if k == 3:
        return rng.choice(["true", "false", "1.5", "1e999", "0.0", "2 ** 62", "10 ** 10 ** 10", "[]", "{}"])
    sub = lambda: expr(rng, depth + 1)  # noqa: E731 - a local shorthand
    if k == 4:
        return f"{sub()} {rng.choice(['+', '-', '*', '/', '//', '%', '**'])} {sub()}"
    if k == 5:
        return f"{sub()} {rng.choice(['<', '<=', '==', '!=', '>', '>=', 'in', 'not in'])} {sub()}"
    if k == 6:
        return f'{sub()} matches r"{rng.choice(REGEXES)}"'
    if k == 7:
        f = rng.choice(BUILTINS)
        return f"{f}({', '.join(sub() for _ in range(rng.randrange(3)))})"
    if k == 8:
        return f"[{', '.join(sub() for _ in range(rng.randrange(4)))}]"
    if k == 9:
        return f"{{{', '.join(_str(rng) + ': ' + sub() for _ in range(rng.randrange(3)))}}}"
    if k == 10:
        return f"{sub()}[{sub()}]"
    if k == 11:
        return f"{sub()} if {sub()} else {sub()}"
    if k == 12:
        return f"{rng.choice(['not ', '-', ''])}{sub()} {rng.choice(['and', 'or'])} {sub()}"
    if k == 13:
        return f'f"{{{sub()}}} and {{{rng.choice(NAMES)}:>4}}"'
    if k == 14:
        return f"h.{rng.choice(['is_prime', 'digits_only', 'score', 'missing'])}({sub()})"
    return f"({sub()})"


def constraint(rng: random.Random, hole: str, depth: int = 0) -> str:
    """A random ``where`` term on ``hole`` (sometimes on another name, or a combination)."""
    h = hole if rng.random() < 0.9 else rng.choice(NAMES)
    k = rng.randrange(14 if depth < 2 else 11)
    if k == 0:
        return f'{h} matches r"{rng.choice(REGEXES)}"'
    if k == 1:
        return f"{h} in [{', '.join(_str(rng) for _ in range(rng.randrange(4)))}]"
    if k == 2:
        return f"{rng.choice(['stop_at', 'stop_before'])}({h}, {_str(rng)})"
    if k == 3:
        return (f"{rng.choice(['tokens', 'len', 'words'])}({h}) {rng.choice(['<', '<=', '==', '>=', '>'])} "
                f"{rng.choice(INTS + ['n', '2**62'])}")
    if k == 4:
        return f"{rng.choice(['is_int', 'is_float'])}({h})"
    if k == 5:
        return f"{rng.choice(['not ', ''])}{rng.choice(['contains', 'startswith', 'endswith'])}({h}, {_str(rng)})"
    if k == 6:
        return f'grammar({h}, "{rng.choice(["g.lark", "missing.lark", "a" * 300 + ".lark"])}")'
    if k == 7:
        return f'json({h}{rng.choice(["", ", schema=" + chr(34) + "s.json" + chr(34)])})'
    if k == 8:
        return f"h.{rng.choice(['is_prime', 'digits_only', 'nope'])}({h}{rng.choice(['', ', prefix=true'])})"
    if k == 9:
        return f"{h} {rng.choice(['maches', 'match', 'in'])} {expr(rng, 3)}"
    if k == 10:
        return expr(rng, 2)
    sub = lambda: constraint(rng, hole, depth + 1)  # noqa: E731 - a local shorthand
    if k == 11:
        return f"({sub()} or {sub()})"
    if k == 12:
        return f"not ({sub()})"
    return f"{sub()} and {sub()}"


def template(rng: random.Random, holes: list[str]) -> str:
    """A template string with text, holes, interpolations and escapes."""
    pieces = []
    for _ in range(rng.randrange(1, 5)):
        k = rng.randrange(6)
        if k == 0 or k == 1:
            name = rng.choice(NAMES[:6])
            holes.append(name)
            pieces.append(f"[{name}]")
        elif k == 2:
            pieces.append("{" + expr(rng, 2) + "}")
        elif k == 3:
            pieces.append(rng.choice(["Q: ", "A: ", "\\n", " ", "[[x]]", "{{", "\\x04", "\\x06", "é", "\\t",
                                      "\\u00ff", "\\x1d"]))
        else:
            pieces.append(rng.choice(["Hello", " world", ".", "The answer is", "!"]))
    quote = rng.choice(['"', '"""'])
    return quote + "".join(pieces) + quote


def statement(rng: random.Random, depth: int, indent: str) -> list[str]:
    """One random statement (a list of lines: blocks take several)."""
    k = rng.randrange(16 if depth < 2 else 12)
    if k <= 2:
        holes: list[str] = []
        observe = rng.random() < 0.2
        text = ("observe " if observe else "") + template(rng, holes)
        if holes and not observe and rng.random() < 0.7:
            terms = [constraint(rng, rng.choice(holes)) for _ in range(rng.randrange(1, 4))]
            if rng.random() < 0.3 and len(terms) > 1:
                return [indent + text, indent + "    where " + terms[0]] + [indent + "    and " + t for t in terms[1:]]
            text += " where " + " and ".join(terms)
        return [indent + text]
    if k == 3:
        return [indent + f"gen {rng.choice(NAMES[:6])}" + (f" where {constraint(rng, 'x')}" if rng.random() < 0.5 else "")]
    if k == 4:
        return [indent + f"let {rng.choice(NAMES)} = {expr(rng)}"]
    if k == 5:
        return [indent + f"sample {rng.choice(NAMES)} ~ {rng.choice(DISTS)}"]
    if k == 6:
        return [indent + f"{rng.choice(['condition', 'factor'])} {expr(rng)}"]
    if k == 7:
        typ = rng.choice(["", ": str", ": int", ": float", ": bool", ": list", ": dict"])
        return [indent + f"input {rng.choice(NAMES)}{typ}" + (f" = {expr(rng, 3)}" if rng.random() < 0.6 else "")]
    if k == 8:
        return [indent + "model " + rng.choice(MODELS)]
    if k == 9:
        return [indent + f"infer {rng.choice(STRATEGIES)}"]
    if k == 10:
        path = rng.choice(["helpers.py", "missing.py", "a" * 300 + ".py", "helpers.txt", "../helpers.py"])
        return [indent + f'import "{path}" as {rng.choice(["h", "g", "len"])}']
    if k == 11:
        return [indent + "return " + ", ".join(expr(rng, 2) for _ in range(rng.randrange(1, 3)))]
    inner = indent + "    "
    if k in (12, 13):
        lines = [indent + f"if {expr(rng, 2)}:"] + block(rng, depth + 1, inner)
        if rng.random() < 0.4:
            lines += [indent + f"elif {expr(rng, 2)}:"] + block(rng, depth + 1, inner)
        if rng.random() < 0.4:
            lines += [indent + "else:"] + block(rng, depth + 1, inner)
        return lines
    iterable = rng.choice(["range(3)", "range(n)", "[1, 2]", "range(10 ** 9)", "x", "range(-1)"])
    return [indent + f"for {rng.choice(['i', 'x', 'item'])} in {iterable}:"] + block(rng, depth + 1, inner)


def block(rng: random.Random, depth: int, indent: str) -> list[str]:
    lines: list[str] = []
    for _ in range(rng.randrange(1, 4)):
        lines += statement(rng, depth, indent)
    return lines


def mutate(rng: random.Random, text: str) -> str:
    """A small textual mutation (delete, duplicate or swap a span) so that syntax errors are exercised too."""
    if not text:
        return text
    i = rng.randrange(len(text))
    k = rng.randrange(4)
    if k == 0:
        return text[:i] + text[i + rng.randrange(1, 8):]
    if k == 1:
        j = rng.randrange(len(text))
        return text[:i] + text[j:j + rng.randrange(1, 20)] + text[i:]
    if k == 2:
        return text[:i] + rng.choice(["(", ")", '"', "[", "]", ":", "\n", "    ", "\\", "#", "\x00", "\udc80"]) + text[i:]
    return text * rng.randrange(1, 3)


def program(rng: random.Random) -> str:
    """A random program: statements from the grammar's pieces, sometimes mutated."""
    lines: list[str] = []
    for _ in range(rng.randrange(1, 8)):
        lines += statement(rng, 0, "")
    text = "\n".join(lines) + "\n"
    if rng.random() < 0.25:
        text = mutate(rng, text)
    return text


# -------------------------------------------------------------------------------------------------- checking


def check_one(source: str) -> str | None:
    """None if checking ``source`` behaves (success, or LmpError with located non-internal diagnostics); else
    what went wrong, in one line."""
    from lmprog.dsl.errors import LmpError
    from lmprog.program import Program

    try:
        Program(source, "fuzz.lmp", base_dir=BASE_DIR)
    except LmpError as err:
        if not err.diagnostics:
            return "LmpError without diagnostics"
        for d in err.diagnostics:
            if "internal error" in d.message:
                return d.message.splitlines()[0][:300]
            if d.span.line < 1 or d.span.col < 1:
                return f"unlocated diagnostic: {d.message[:200]}"
    except Exception as exc:  # noqa: BLE001 - this is what the fuzzer looks for
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    return None


def _worker(conn) -> None:
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent went away
            return
        if item is None:
            return
        i, source = item
        t0 = time.perf_counter()
        problem = check_one(source)
        conn.send((i, problem, time.perf_counter() - t0))


class _Worker:
    def __init__(self, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        self.job: tuple[int, str, float] | None = None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()


def run(count: int, seed: int, timeout: float, jobs: int, start: int = 0, log=sys.stderr,
        max_seconds: float | None = None) -> dict:
    """Generate and check ``count`` programs (fewer if ``max_seconds`` of wall time run out first: no new program
    is started after that); returns the figures (tried, crashes, hangs, slowest, ...)."""
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    workers = [_Worker(ctx) for _ in range(jobs)]
    crashes, hangs, times = [], [], []
    todo = iter(range(start, start + count))
    done = 0
    t_start = time.perf_counter()
    while True:
        out_of_time = max_seconds is not None and time.perf_counter() - t_start > max_seconds
        for w in workers:
            if w.job is None and not out_of_time:
                i = next(todo, None)
                if i is not None:
                    source = program(random.Random(f"{seed}:{i}"))
                    w.job = (i, source, time.perf_counter())
                    w.conn.send((i, source))
        busy = [w for w in workers if w.job is not None]
        if not busy:
            break
        ready = mp.connection.wait([w.conn for w in busy], timeout=0.05)
        now = time.perf_counter()
        for w in busy:
            i, source, t0 = w.job
            if w.conn in ready:
                _, problem, dt = w.conn.recv()
                times.append(dt)
                if problem is not None:
                    crashes.append({"index": i, "problem": problem, "source": source})
                    print(f"crash #{i}: {problem}", file=log)
                w.job = None
                done += 1
            elif now - t0 > timeout:
                hangs.append({"index": i, "source": source})
                print(f"hang #{i} (> {timeout:g} s)", file=log)
                w.kill()
                workers[workers.index(w)] = _Worker(ctx)
                done += 1
        if done and done % 1000 == 0 and ready:
            print(f"{done} programs, {len(crashes)} crashes, {len(hangs)} hangs", file=log)
    for w in workers:
        w.conn.send(None)
        w.proc.join(timeout=5)
    times.sort()
    return {
        "tried": done, "crashes": len(crashes), "hangs": len(hangs), "timeout_s": timeout, "seed": seed,
        "start": start, "jobs": jobs, "wall_s": round(time.perf_counter() - t_start, 1),
        "median_ms": round(1000 * times[len(times) // 2], 2) if times else None,
        "p99_ms": round(1000 * times[int(len(times) * 0.99)], 1) if times else None,
        "max_s": round(times[-1], 2) if times else None,
        "crash_examples": crashes[:5], "hang_examples": hangs[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000, help="programs to generate and check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start", type=int, default=0, help="index of the first program (to reproduce one)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a check counts as a hang")
    parser.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument("--max-seconds", type=float, help="stop starting programs after this much wall time")
    parser.add_argument("--show", action="store_true", help="print the programs instead of checking them")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.show:
        for i in range(args.start, args.start + args.count):
            print(f"# program {i} (seed {args.seed})\n{program(random.Random(f'{args.seed}:{i}'))}")
        return 0
    figures = run(args.count, args.seed, args.timeout, args.jobs, args.start, max_seconds=args.max_seconds)
    text = json.dumps(figures, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 1 if figures["crashes"] or figures["hangs"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
