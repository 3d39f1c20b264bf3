"""The ``lmprog`` command line: check, run, batch, models, generate, demo.

Exit codes: 0 success, 2 bad input (program errors, bad arguments), 1 runtime failures. No command
prints a Python traceback for a user error.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_check(args) -> int:
    from lmprog.program import check_files

    return check_files(args.files, sys.stdout)


DEMO_PROMPT = "<|im_start|>user\nWrite one sentence about the sea.<|im_end|>\n<|im_start|>assistant\n"


def _cmd_models(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from lmprog.backends import available_models

    table = Table(title="registered models (any .gguf file or Hugging Face folder also works with --model)")
    for col in ("name", "location", "description"):
        table.add_column(col)
    for name, status, description in available_models():
        table.add_row(name, status, description)
    Console().print(table)
    return 0


def _generate(model: str, prompt: str, tokens: int, batch: int, seed: int, temperature: float, title: str) -> int:
    import time

    from rich.console import Console
    from rich.panel import Panel

    from lmprog.backends import load_model
    from lmprog.backends.generate import sample

    console = Console()
    t0 = time.perf_counter()
    with console.status(f"loading {model} ..."):
        lm = load_model(model)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with console.status(f"sampling {batch} x {tokens} tokens ..."):
        out = sample(lm, prompt, n_tokens=tokens, batch=batch, temperature=temperature, seed=seed)
    gen_s = time.perf_counter() - t0
    console.print(Panel(prompt, title="prompt", title_align="left"))
    for i, text in enumerate(out.texts):
        console.print(Panel(text, title=f"{title} {i + 1}  (log p = {out.logprob[i]:.2f})", title_align="left"))
    console.print(
        f"[dim]{lm!r}; load {load_s:.1f} s; sampling {gen_s:.1f} s for {batch} x {tokens} tokens "
        f"(includes compilation on the first run; later runs reuse the persistent cache)[/dim]"
    )
    return 0


def _cmd_generate(args) -> int:
    return _generate(args.model, args.prompt, args.tokens, args.batch, args.seed, args.temperature, "sample")


def _cmd_demo(args) -> int:
    return _generate(args.model, DEMO_PROMPT, 40, 3, args.seed, 0.8, "continuation")


# ------------------------------------------------------------------------------------------- run / batch


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        name, eq, value = item.partition("=")
        if not eq or not name.strip():
            raise _UsageError(f"--set expects NAME=VALUE, got {item!r}")
        out[name.strip()] = value
    return out


class _UsageError(Exception):
    pass


def _run_options(args) -> dict:
    return dict(particles=args.particles, seed=args.seed, strategy=args.strategy, max_tokens=args.max_tokens,
                temperature=args.temperature, model=args.model, memory_limit=args.memory_limit)


def _progress_runner(console, enabled: bool):
    """A context manager yielding an engine progress callback that shows a bar after ~1.5 s."""
    import contextlib
    import time

    @contextlib.contextmanager
    def manager():
        if not enabled:
            yield None
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                       TimeElapsedColumn(), console=console, transient=True)
        state = {"task": None, "t0": time.perf_counter(), "started": False}

        def callback(p):
            if not state["started"]:
                if time.perf_counter() - state["t0"] < 1.5:
                    return
                bar.start()
                state["started"] = True
            desc = f"hole {p.hole}: {p.active} active"
            if state["task"] is None:
                state["task"] = bar.add_task(desc, total=max(int(p.budget), 1))
            bar.update(state["task"], description=desc, completed=min(int(p.steps), int(p.budget)),
                       total=max(int(p.budget), 1))

        try:
            yield callback
        finally:
            if state["started"]:
                bar.stop()

    return manager()


def _print_result(console, result, path: str) -> None:
    from rich.table import Table

    st = result.stats
    title = (f"{path} — {result.strategy}"
             + ("" if result.properly_weighted else " (not properly weighted: a baseline, not the posterior)"))
    table = Table(title=title, title_justify="left")
    table.add_column("probability", justify="right")
    keys = list(result.posterior[0][0]) if result.posterior else []
    for k in keys:
        table.add_column(k, overflow="fold")
    for value, p in result.posterior[:20]:
        table.add_row(f"{p:.3f}", *[_cell(value.get(k)) for k in keys])
    console.print(table)
    if len(result.posterior) > 20:
        console.print(f"[dim]... {len(result.posterior) - 20} more values (use --json for all)[/dim]")
    ess = result.ess
    ess_text = f"{min(ess):.1f} min, {ess[-1]:.1f} final" if ess else "n/a"
    if st.get("waves"):  # memory waves: the ESS history is the first wave's
        ess_text += f" (first of {st['waves']} memory waves)"
    logz = f"{result.log_evidence:.3f}" if result.log_evidence is not None else "n/a"
    console.print(
        f"log Z = {logz}   ESS = {ess_text}   particles = {st.get('particles')} ({st.get('dead', 0)} dead)   "
        f"tokens = {st.get('tokens')}   forward passes = {st.get('forward_passes')}   "
        f"wall = {st.get('wall_s', 0):.2f} s   compile = {st.get('compile_s', 0):.2f} s"
    )
    diag = result.extra.get("mcmc")
    if diag:
        acc = diag.get("acceptance")
        acc_text = "n/a" if not acc else f"{min(acc):.2f}–{max(acc):.2f} over {len(acc)} chain(s)"
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        warn = "   [yellow](R-hat > 1.1: the chains disagree; run more steps)[/yellow]" \
            if diag.get("r_hat") is not None and diag["r_hat"] > 1.1 else ""
        console.print(f"MCMC: acceptance {acc_text}   R-hat = {fmt(diag.get('r_hat'))}   "
                      f"ESS = {fmt(diag.get('ess'))}{warn}")
    rj = result.extra.get("rejuvenation")
    if rj:
        acc = rj.get("acceptance")
        console.print(f"rejuvenation: {rj['moves']} moves in {rj['rounds']} rounds, acceptance "
                      f"{'n/a' if acc is None else f'{acc:.2f}'}")


def _cell(v) -> str:
    import json

    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


def _cmd_run(args) -> int:
    from rich.console import Console

    from lmprog.program import load

    console = Console(stderr=args.json)
    program = load(args.file)
    sets = _parse_sets(args.set)
    from lmprog.runner import get_model, run_program

    model = args.model or program.model or program.default_model
    with console.status(f"loading {model} ...") if not args.json else _null():
        lm = get_model(model)
    with _progress_runner(console, not args.json) as progress:
        result = run_program(program, sets, from_text=True, lm=lm, progress=progress,
                             **{k: v for k, v in _run_options(args).items() if k != "model"})
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(result.to_json() + "\n")
    if args.json:
        sys.stdout.write(result.to_json() + "\n")
    else:
        _print_result(console, result, args.file)
    return 0


def _null():
    import contextlib

    return contextlib.nullcontext()


def _cmd_batch(args) -> int:
    import contextlib
    import json

    from rich.console import Console

    from lmprog.program import load
    from lmprog.runner import get_model, run_batch

    console = Console(stderr=True)
    program = load(args.file)
    try:
        with open(args.inputs, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise _UsageError(f"cannot read {args.inputs}: {exc.strerror or exc}") from None
    model = args.model or program.model or program.default_model
    with console.status(f"loading {model} ..."):
        lm = get_model(model)

    # Parse every line first; the valid rows then run together (one engine call per group of rows with the
    # same structure, see runner.run_batch), and each record is written in input order.
    numbered = [(i, line) for i, line in enumerate(lines) if line.strip()]
    records: list[dict | None] = [None] * len(numbered)
    valid: list[tuple[int, dict]] = []
    for n, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            records[n] = {"row": n, "error": f"{args.inputs}:{i + 1}: not valid JSON: {exc.msg}"}
            continue
        if not isinstance(row, dict):
            records[n] = {"row": n, "error": f"{args.inputs}:{i + 1}: a row must be a JSON object of input values"}
            continue
        valid.append((n, row))
    options = {k: v for k, v in _run_options(args).items() if k != "model"}
    with _progress_runner(console, True) as progress:
        results = run_batch(program, [row for _, row in valid], lm=lm, progress=progress, **options)
    for (n, row), result in zip(valid, results):
        if isinstance(result, BaseException):
            records[n] = {"row": n, "error": str(result)}
        else:
            records[n] = {"row": n, "inputs": row, **result.to_dict()}

    failed = 0
    with (open(args.out, "w", encoding="utf-8") if args.out else contextlib.nullcontext(sys.stdout)) as out:
        for n, record in enumerate(records):
            if "error" in record:
                failed += 1
                line_no = numbered[n][0] + 1
                console.print(f"[red]row {n} ({args.inputs}:{line_no}):[/red] {record['error']}", markup=True,
                              highlight=False)
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    console.print(f"{len(records) - failed}/{len(records)} rows ok" + (f" -> {args.out}" if args.out else ""))
    return 1 if failed else 0


def _add_run_options(p) -> None:
    p.add_argument("--particles", type=_positive_int, default=None,
                   help="particles (or n / width) of the program's strategy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strategy", default=None, help="override the program's infer strategy by name")
    p.add_argument("--max-tokens", dest="max_tokens", type=_positive_int, default=None)
    p.add_argument("--temperature", type=_positive_float, default=None)
    p.add_argument("--model", default=None, help="a registered model name, a .gguf file or a HF folder")
    p.add_argument("--memory-limit", dest="memory_limit", type=_memory_size, default=None, metavar="SIZE",
                   help="memory a run may use beyond the loaded model, e.g. 4G (default: what the device has free); "
                        "a run that needs more runs in waves of fewer particles, or stops with exit 2")


def _memory_size(text: str) -> int:
    from lmprog.inference.memory import parse_size  # noqa: PLC0415 - JAX loads only for commands that run

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmprog", description="Probabilistic programs over language models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="parse and check .lmp files; exit 0 if all are valid, 2 otherwise")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("run", help="run a .lmp program and print the posterior")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set an input (repeatable)")
    _add_run_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", default=None, metavar="F", help="also write the JSON result to F")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("batch", help="run a program once per JSON line of inputs; one JSON line per row")
    p.add_argument("file", metavar="FILE")
    p.add_argument("inputs", metavar="INPUTS.jsonl")
    p.add_argument("--out", default=None, metavar="OUT.jsonl", help="output file (default: stdout)")
    _add_run_options(p)
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("models", help="list the registered models and where they are installed")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("generate", help="sample continuations of a prompt (plain batched decoding)")
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=_positive_int, default=48)
    p.add_argument("--batch", type=_positive_int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=_positive_float, default=1.0)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("demo", help="sample three answers to a chat prompt with the default model")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def _positive(convert, what: str):
    """An argparse ``type=`` that accepts values ``> 0`` of ``convert`` and names what it expected."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}")
        return value

    return parse


_positive_int = _positive(int, "integer")
_positive_float = _positive(float, "number")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from lmprog.backends.gguf_file import GGUFError
    from lmprog.backends.loaders import ModelLoadError
    from lmprog.backends.registry import ModelNotFoundError
    from lmprog.backends.tokenizer import TokenizerError
    from lmprog.dsl.errors import LmpError

    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ModelNotFoundError, ModelLoadError, GGUFError, TokenizerError) as exc:
        print(f"lmprog: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # bad option values caught below argparse (e.g. prompt longer than the context)
        print(f"lmprog: error: {exc}", file=sys.stderr)
        return 2
    except (LmpError, _UsageError) as exc:  # program and input errors: located messages
        print(str(exc), file=sys.stderr)
        return 2
    except Exception as exc:  # runtime failures (every particle died, ...): a message, never a traceback
        if _is_runtime_failure(exc):
            print(f"lmprog: run failed: {exc}", file=sys.stderr)
        else:
            print(f"lmprog: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _is_runtime_failure(exc: Exception) -> bool:
    """InferenceError / RunError, without importing JAX for commands that never ran anything."""
    segments = sys.modules.get("lmprog.inference.segments")
    errors = sys.modules.get("lmprog.compiler.errors")
    return (segments is not None and isinstance(exc, segments.InferenceError)) or \
        (errors is not None and isinstance(exc, errors.RunError))


if __name__ == "__main__":
    sys.exit(main())
