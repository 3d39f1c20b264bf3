"""The ``lmprog`` command line: check, run, batch, models, generate, demo, serve.

Exit codes: 0 success, 2 bad input (program errors, bad arguments), 1 runtime failures. No command
prints a Python traceback for a user error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
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


def _cmd_serve(args) -> int:
    from lmprog import server

    path = server.socket_path()
    if args.status or args.stop:
        info = server.request(path, {"op": "stop" if args.stop else "ping"}) if path.exists() else None
        if info is None:
            print("no lmprog server is running for this installation and environment", file=sys.stderr)
            return 1
        if "error" in info:
            print(f"lmprog: error: the lmprog server answered: {info['error']}", file=sys.stderr)
            return 1
        if args.stop:
            print(f"lmprog server {info['pid']}: stopping" + (" after the command it is running" if info.get("busy")
                                                             else ""))
        else:
            rss = f", {info['rss_bytes'] / 2**30:.2f} GiB resident" if info.get("rss_bytes") else ""
            print(f"lmprog server {info['pid']} on {info['socket']}: up {info['uptime_s']:.0f} s, "
                  f"{info['served']} commands served, {'busy' if info['busy'] else 'idle'}, "
                  f"{info['models']} model{'s' if info['models'] != 1 else ''} loaded{rss}")
        return 0
    try:
        if args.detach:
            info = server.start_detached(args.idle_timeout)
            print(f"lmprog server {info['pid']} running on {info['socket']} (log: {info['log']}); "
                  "stop it with 'lmprog serve --stop'")
            return 0
        srv = server.Server(path, main, idle_timeout=args.idle_timeout)
        srv.bind()
    except server.ServeError as exc:
        print(f"lmprog: error: {exc}", file=sys.stderr)
        return 2
    srv.serve_forever()
    return 0


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
                temperature=args.temperature, model=args.model, memory_limit=args.memory_limit,
                host_timeout=args.host_timeout, devices=args.devices, model_devices=args.model_devices,
                enumerate_holes=getattr(args, "enumerate", None))


def _engine_options(args) -> dict:
    """The run options without the model name (the commands load the model themselves)."""
    return {k: v for k, v in _run_options(args).items() if k != "model"}


def _check_run_options(program, args) -> None:
    """Bad options exit 2 before the model loads or any output file is touched."""
    from lmprog.runner import check_devices, check_options

    opts = _engine_options(args)
    check_options(program, **{k: opts[k] for k in ("particles", "seed", "strategy", "max_tokens", "temperature",
                                                   "host_timeout")})
    check_devices(opts["devices"], opts["model_devices"])


def _check_out_path(path: str, protected: list[str], option: str = "--out") -> None:
    """Refuse an output path that cannot be written, before any work: a folder, a missing folder, no write
    permission, or the same file as one of ``protected`` (the program, the input rows). ``option`` names the
    option in the message (``--out``, ``--report``)."""
    import os
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        raise _UsageError(f"{option} {path}: is a folder; give the name of a file to write")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise _UsageError(f"{option} {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise _UsageError(f"{option} {path}: not writable (permission denied)")
    for other in protected:
        try:
            same = p.exists() and os.path.samefile(p, other)
        except OSError:
            same = False
        if same:
            raise _UsageError(f"{option} {path}: is the same file as {other}; writing it would destroy it")


def _check_report_path(path: str, protected: list[str], out) -> None:
    """``--report``: as ``--out`` (:func:`_check_out_path`), and never the ``--out`` file itself."""
    import os

    if out and os.path.abspath(out) == os.path.abspath(path):
        raise _UsageError(f"--report {path}: is the same file as --out; give the report its own file")
    _check_out_path(path, protected + ([out] if out else []), option="--report")


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
    _print_conversation(console, result.conversation)
    ess = result.ess
    ess_text = f"{min(ess):.1f} min, {ess[-1]:.1f} final" if ess else "n/a"
    if st.get("waves"):  # memory waves: the ESS history is the first wave's
        ess_text += f" (first of {st['waves']} memory waves)"
    logz = f"{result.log_evidence:.3f}" if result.log_evidence is not None else "n/a"
    if result.log_evidence is not None and result.log_evidence_se is not None:
        logz += f" ± {result.log_evidence_se:.3f}"
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
    enumerated = st.get("enumerated")
    if enumerated:  # holes generated exactly (lmprog.inference.enumeration)
        def note(v):
            if not v.get("rao_blackwellized"):
                return ""
            return ", exact posterior" if not v.get("frontier_mass") else ", Rao-Blackwellized posterior"
        parts = [f"{k} ({v['paths']} paths{note(v)})" for k, v in enumerated.items()]
        console.print("enumerated: " + ", ".join(parts))
    rj = result.extra.get("rejuvenation")
    if rj:
        acc = rj.get("acceptance")
        console.print(f"rejuvenation: {rj['moves']} moves in {rj['rounds']} rounds, acceptance "
                      f"{'n/a' if acc is None else f'{acc:.2f}'}")


def _print_conversation(console, messages) -> None:
    """A chat program's conversation (its most probable sample), one turn per row."""
    if not messages:
        return
    from rich.table import Table

    table = Table(title="conversation (most probable sample)", title_justify="left", show_header=False)
    table.add_column("role", style="bold")
    table.add_column("content", overflow="fold")
    for m in messages:
        table.add_row(m["role"], m["content"])
    console.print(table)


def _cell(v) -> str:
    import json

    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


@contextlib.contextmanager
def _kernel_prefetch(args):
    """Load, in the background, the kernel executables the last run of this very command used
    (:mod:`lmprog.inference.prefetch`), and remember this run's for the next one."""
    from lmprog.inference import prefetch

    options = {k: v for k, v in sorted(vars(args).items()) if k != "func"}
    tag = repr((os.getcwd(), os.path.abspath(args.file), options))
    prefetch.start(tag)
    done = False
    try:
        yield
        done = True
    finally:
        if done:
            prefetch.remember(tag)
        else:
            prefetch.stop()


def _cmd_run(args) -> int:
    with _kernel_prefetch(args):
        return _run_command(args)


def _run_command(args) -> int:
    from rich.console import Console

    from lmprog.program import load

    console = Console(stderr=args.json)
    program = load(args.file)
    sets = _parse_sets(args.set)
    if args.out:
        _check_out_path(args.out, [args.file])
    if args.report:
        _check_report_path(args.report, [args.file], args.out)
    _check_run_options(program, args)
    from lmprog.runner import get_model, run_program

    model = args.model or program.model or program.default_model
    with console.status(f"loading {model} ...") if not args.json else _null():
        lm = get_model(model)
    failure = None
    with _progress_runner(console, not args.json) as progress:
        try:
            result = run_program(program, sets, from_text=True, lm=lm, progress=progress, **_engine_options(args))
        except Exception as exc:  # every particle died (or user code failed for all): --report still says why
            if not (args.report and _is_runtime_failure(exc)):
                raise
            failure = exc
    if failure is not None:
        from lmprog import report

        from lmprog.result import Result

        _write_report(console, args.report, report.render_failure(
            failure, result=Result.from_failure(failure, sets), program=program))
        raise failure  # main() reports it: the exit status and message are those of any failed run
    text = result.to_json()
    if args.json:
        sys.stdout.write(text + "\n")
    else:
        _print_result(console, result, args.file)
    if args.out:  # after printing: a failing write loses nothing that was not shown
        try:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        except OSError as exc:
            print(f"lmprog: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    if args.report:
        from lmprog import report

        result.program = program
        return _write_report(console, args.report, report.render(result, program=program))
    return 0


def _write_report(console, path: str, text: str) -> int:
    """Write an HTML report and say where and how large it is (exit status 1 when it cannot be written)."""
    from lmprog import report

    try:
        size = report.write(path, text)
    except OSError as exc:
        print(f"lmprog: error: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    console.print(f"report: {path} ({report.size_text(size)}, self-contained HTML)", highlight=False, soft_wrap=True)
    return 0


def _null():
    import contextlib

    return contextlib.nullcontext()


def _cmd_batch(args) -> int:
    """``lmprog batch``: every row; with several processes (``--num-processes``, :mod:`lmprog.distributed`) this
    process's share of the rows into its part file, then, on process 0, every part merged into ``--out`` in input
    order (the rows of a process that failed get error records)."""
    import json

    from lmprog import distributed

    opts = distributed.resolve(args.coordinator, args.num_processes, args.process_id)
    if opts is not None and opts[1] != 1:
        if not args.out:
            raise _UsageError("several processes (--num-processes) need --out: each writes its rows to a part "
                              "file beside it, and process 0 merges them into it")
        if args.report:
            raise _UsageError("--report is not available with several processes (--num-processes)")
    procs = distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    if procs.count == 1:
        return _batch(args, procs)
    try:
        status = _batch(args, procs)
    except Exception as exc:  # noqa: BLE001 - reported here; process 0 reports this process's rows
        status, message = _failure(exc)
        print(f"process {procs.index}: {message}", file=sys.stderr)
    live = distributed.wait_for_peers(procs)  # every live process has written its part
    distributed.leave(procs)
    if procs.index != 0:
        return status
    try:
        with open(args.inputs, encoding="utf-8") as f:
            rows, bad, _ = _parse_rows(f.read().splitlines(), args.inputs)
    except (OSError, UnicodeDecodeError):
        return status  # every process failed reading them, and said so
    lines = {n: line for n, line, _ in rows} | {n: line for n, line, _ in bad}
    missing = distributed.merge_parts(args.out, procs, lines, live)
    with open(args.out, encoding="utf-8") as f:
        kinds = [json.loads(line).get("error_kind", "ok") for line in f if line.strip()]
    n_ok = kinds.count("ok")
    print(f"{n_ok}/{len(kinds)} rows ok over {procs.count} processes -> {args.out}"
          + (f"; {len(missing)} row{'s' if len(missing) != 1 else ''} not written by their process (see the records)" if missing else ""),
          file=sys.stderr)
    return 1 if "run" in kinds else 2 if "input" in kinds else status


def _batch(args, procs) -> int:
    import contextlib

    from rich.console import Console

    from lmprog import distributed

    from lmprog.program import load
    from lmprog.runner import get_model, iter_batch

    console = Console(stderr=True)
    program = load(args.file)
    try:
        with open(args.inputs, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read {args.inputs}: {getattr(exc, 'strerror', None) or exc}") from None
    if args.resume and not args.out:
        raise _UsageError("--resume needs --out: the output file whose rows are already done")
    if args.out:
        _check_out_path(args.out, [args.inputs, args.file])
    if args.report:
        _check_report_path(args.report, [args.inputs, args.file], args.out)
    _check_run_options(program, args)
    rows, bad, blank = _parse_rows(lines, args.inputs)
    if blank:
        shown = ", ".join(str(b) for b in blank[:10]) + (", ..." if len(blank) > 10 else "")
        console.print(f"skipped {len(blank)} blank line{'s' if len(blank) != 1 else ''} of {args.inputs} "
                      f"(line{'s' if len(blank) != 1 else ''} {shown})", highlight=False, soft_wrap=True)
    total = len(rows) + len(bad)
    out_path = args.out
    if procs.count > 1:  # this process's share of the rows, into its own part file
        rows, bad = [r for r in rows if procs.mine(r[0])], [b for b in bad if procs.mine(b[0])]
        out_path = distributed.part_path(args.out, procs)
    share = len(rows) + len(bad)
    done = _done_rows(out_path, rows, total, console) if args.resume else {}
    if done:
        console.print(f"resuming: {len(done)}/{total} rows already in {args.out}", highlight=False, soft_wrap=True)
    model = args.model or program.model or program.default_model
    with console.status(f"loading {model} ..."):
        lm = get_model(model)

    kinds = dict(done)  # row -> "ok" / "input" / "run", every row written so far
    written = 0
    reported: list = []  # --report: (row, inputs, Result or message, section HTML) of this invocation's rows
    per_row = None
    if args.report:
        from lmprog import report

        per_row = max(5, min(report.MAX_ROWS, report.BATCH_ROW_BUDGET // max(len(rows) + len(bad), 1)))
    todo = [r for r in rows if r[0] not in done]
    try:
        with (open(out_path, "a" if args.resume else "w", encoding="utf-8") if args.out
              else contextlib.nullcontext(sys.stdout)) as out:
            def write(record: dict, kind: str) -> None:
                nonlocal written
                out.write(_record_json(record) + "\n")
                out.flush()  # on disk at once: an interrupted batch keeps every finished row
                written += 1
                kinds[record["row"]] = kind
                if kind != "ok":
                    console.print(f"[red]row {record['row']} ({args.inputs}:{record['line']}):[/red] "
                                  f"{record['error']}", markup=True, highlight=False, soft_wrap=True)

            for n, line_no, message in bad:
                if n not in done:
                    write({"row": n, "line": line_no, "error": message, "error_kind": "input"}, "input")
                    if args.report:
                        reported.append((n, None, message))
            with _progress_runner(console, True) as progress:
                outcomes = iter_batch(program, [row for _, _, row in todo], lm=lm, progress=progress,
                                      **_engine_options(args))
                for k, outcome in outcomes:
                    n, line_no, row = todo[k]
                    if isinstance(outcome, BaseException):
                        code, message = _failure(outcome)
                        kind = "input" if code == 2 else "run"
                        write({"row": n, "line": line_no, "error": message, "error_kind": kind}, kind)
                        if args.report:
                            reported.append((n, row, message))
                    else:
                        write({"row": n, "line": line_no, "inputs": row, **outcome.to_dict()}, "ok")
                        if args.report:  # the row's section now: the Result (and its arrays) can go
                            from lmprog import report

                            html_text = report.section(outcome, program=program, prefix=f"row{n}",
                                                       max_rows=per_row) \
                                if len(reported) < report.MAX_BATCH_SECTIONS else ""
                            reported.append((n, row, _ReportRow(outcome), html_text))
    except KeyboardInterrupt:
        where = f" to {args.out}" if args.out else ""
        console.print(f"interrupted: {written} row{'s' if written != 1 else ''} written{where} "
                      f"({len(kinds)}/{total} rows done)"
                      + ("; run the same command with --resume to finish" if args.out else ""),
                      highlight=False, soft_wrap=True)
        return 130
    if args.out:
        _sort_records(out_path)
    report_status = 0
    if args.report:
        from lmprog import report

        note = (f"{len(done)} rows done by an earlier invocation (--resume) are in {args.out} but not in this report."
                if done else "")
        report_status = _write_report(console, args.report, report.render_batch(
            reported, program=program, max_rows=per_row, note=note,
            title=f"lmprog batch report — {args.file} ({args.inputs})"))
    failed = {k for k in kinds.values() if k != "ok"}
    n_failed = sum(1 for k in kinds.values() if k != "ok")
    console.print(f"{len(kinds) - n_failed}/{share} rows ok" + (f" -> {out_path}" if args.out else "")
                  + (f" (process {procs.index} of {procs.count})" if procs.count > 1 else ""),
                  highlight=False, soft_wrap=True)
    return 1 if "run" in failed else 2 if failed else report_status


class _ReportRow:
    """What a batch report's summary needs of a row's Result (the Result itself, with its arrays, is dropped)."""

    def __init__(self, result):
        self.posterior = result.posterior[:1]
        self.samples = ()
        self.stats = {k: result.stats.get(k) for k in ("particles", "dead")}
        self.log_evidence = result.log_evidence


def _parse_rows(lines: list[str], name: str) -> tuple[list, list, list]:
    """The rows of a JSONL file: ``(rows, bad, blank)``; ``rows``: ``(row, line, dict)`` for each valid line,
    ``bad``: ``(row, line, message)`` for lines that are no JSON object of inputs, ``blank``: the line numbers
    of blank lines (no row). Rows are numbered from 0 over the non-blank lines. JSON is read strictly: NaN,
    Infinity and numbers too large for a float are refused (JSON has none of them)."""
    import json

    rows, bad, blank = [], [], []
    n = 0
    for i, line in enumerate(lines):
        if not line.strip():
            blank.append(i + 1)
            continue
        try:
            row = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
        except _NonFinite as exc:
            bad.append((n, i + 1, f"{name}:{i + 1}: {exc} (JSON has no NaN or Infinity; inputs must be finite "
                                  f"numbers)"))
        except json.JSONDecodeError as exc:
            bad.append((n, i + 1, f"{name}:{i + 1}: not valid JSON: {exc.msg} (column {exc.colno})"))
        else:
            if isinstance(row, dict):
                rows.append((n, i + 1, row))
            else:
                bad.append((n, i + 1, f"{name}:{i + 1}: a row must be a JSON object of input values, "
                                      f"such as {{\"country\": \"Japan\"}}"))
        n += 1
    return rows, bad, blank


class _NonFinite(ValueError):
    pass


def _reject_constant(token: str):
    raise _NonFinite(f"{token} is not valid JSON")


def _finite_float(token: str) -> float:
    import math

    x = float(token)
    if not math.isfinite(x):
        raise _NonFinite(f"{token} is too large for a float")
    return x


def _record_json(record: dict) -> str:
    """One output line (strict JSON; the inputs echoed are finite by construction)."""
    from lmprog.result import dumps

    return dumps(record)


def _done_rows(path: str, rows: list, total: int, console) -> dict:
    """``{row: kind}`` of the records already in ``path`` (``--resume``). A last line cut short by an
    interrupted write is dropped from the file; any other line that is not a record of this batch is an
    error (a different input file, or not an output of ``lmprog batch``)."""
    import json
    import os

    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = text.split("\n")
    given = {n: row for n, _, row in rows}
    done: dict = {}
    offset = 0
    for i, line in enumerate(lines):
        if not line.strip():
            offset += len(line) + 1
            continue
        try:
            record = json.loads(line)
            n = record["row"] if isinstance(record, dict) else None
            ok = isinstance(n, int) and not isinstance(n, bool)
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines) - 1:  # cut short by an interrupted write: drop it
                with open(path, "r+", encoding="utf-8") as f:
                    f.truncate(len(text[:offset].encode("utf-8")))
                console.print(f"{path}:{i + 1}: dropped an incomplete last line", highlight=False, soft_wrap=True)
                break
            raise _UsageError(f"--resume: {path}:{i + 1} is not a record of lmprog batch")
        if not 0 <= n < total:
            raise _UsageError(f"--resume: {path}:{i + 1} is row {n}, but the input has {total} rows: "
                              f"was it written for another input file?")
        if "inputs" in record and n in given and record["inputs"] != given[n]:
            raise _UsageError(f"--resume: {path}:{i + 1} (row {n}) was computed for other inputs than the input's "
                              f"row {n}: was it written for another input file?")
        done[n] = "ok" if "error" not in record else record.get("error_kind", "run")
        offset += len(line) + 1
    return done


def _sort_records(path: str) -> None:
    """Rewrite a finished batch's output in row order (rows are written as they finish); nothing is
    rewritten when the order is already right or a line is not a record."""
    import contextlib
    import json
    import os
    import tempfile

    with open(path, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()]
    try:
        keys = [json.loads(line)["row"] for line in lines]
    except (ValueError, KeyError, TypeError):
        return
    if keys == sorted(keys):
        return
    order = sorted(range(len(lines)), key=lambda i: keys[i])
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".lmprog-batch-", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(lines[i] + "\n" for i in order))
        os.replace(tmp, path)
    except OSError:  # the rows stay as they were written; only their order is lost
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _add_run_options(p) -> None:
    p.add_argument("--particles", type=_positive_int, default=None,
                   help="particles (or n / width) of the program's strategy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strategy", default=None, help="override the program's infer strategy by name")
    p.add_argument("--max-tokens", dest="max_tokens", type=_positive_int, default=None)
    p.add_argument("--temperature", type=_positive_float, default=None)
    p.add_argument("--model", default=None, help="a registered model name, a .gguf file or a HF folder")
    p.add_argument("--enumerate", dest="enumerate", action=argparse.BooleanOptionalAction, default=None,
                   help="generate small finite holes (choice lists, bounded regexes) by enumeration under "
                        "importance/smc/mcmc/particle_gibbs (the default; --no-enumerate: token by token); "
                        "stats list them")
    p.add_argument("--memory-limit", dest="memory_limit", type=_memory_size, default=None, metavar="SIZE",
                   help="memory a run may use beyond the loaded model, e.g. 4G (default: what the device has free); "
                        "a run that needs more runs in waves of fewer particles, or stops with exit 2")
    p.add_argument("--host-timeout", dest="host_timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="seconds one call into the program's Python code may take (default 30; 0: no limit); "
                        "a call that takes longer stops the run with an error naming it")
    p.add_argument("--devices", type=_positive_int, default=None, metavar="N",
                   help="local devices (GPUs, TPU cores) the particles are sharded over (default: all local devices "
                        "that divide the particle count; see docs/devices.md)")
    p.add_argument("--model-devices", dest="model_devices", type=_positive_int, default=1, metavar="M",
                   help="devices each particle shard's weights are split over (tensor parallel, for models that do "
                        "not fit one device; N x M devices in all)")


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
    p.add_argument("--report", default=None, metavar="OUT.html",
                   help="also write an HTML report (self-contained: posterior, particles, genealogy, ESS, ...)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("batch", help="run a program once per JSON line of inputs; one JSON line per row")
    p.add_argument("file", metavar="FILE")
    p.add_argument("inputs", metavar="INPUTS.jsonl")
    p.add_argument("--out", default=None, metavar="OUT.jsonl",
                   help="output file (default: stdout); each row is written as soon as it is done")
    p.add_argument("--resume", action="store_true",
                   help="skip the rows already in --out (an interrupted batch) and append the others")
    p.add_argument("--report", default=None, metavar="OUT.html",
                   help="also write an HTML report: a summary of every row and a section per row")
    _add_run_options(p)
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="several processes (jax.distributed): the address of process 0 (default: "
                        "$JAX_COORDINATOR_ADDRESS); each process runs every K-th row into OUT.partIofK, process 0 "
                        "merges them into --out in input order")
    p.add_argument("--num-processes", dest="num_processes", type=_positive_int, default=None, metavar="K",
                   help="processes running the batch (default: $JAX_NUM_PROCESSES, or JAX's cluster detection)")
    p.add_argument("--process-id", dest="process_id", type=int, default=None, metavar="I",
                   help="this process's number, 0 to K-1 (default: $JAX_PROCESS_ID, or JAX's cluster detection)")
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

    p = sub.add_parser("serve", help="keep a resident lmprog process that later run/batch/generate/demo commands "
                                     "hand their work to (no imports, model loads or kernel loading per command)",
                       description="Keep Python, JAX, the loaded models and the compiled kernels alive. While it "
                                   "runs, 'lmprog run', 'batch', 'generate' and 'demo' in the same installation "
                                   "and environment run in it (the same results, faster to start); a busy server "
                                   "is bypassed. LMPROG_NO_SERVER=1 makes a command run in its own process.")
    p.add_argument("--idle-timeout", dest="idle_timeout", type=_seconds, default=3600.0, metavar="SECONDS",
                   help="stop after this long without a command (default 3600; 0: never)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--detach", action="store_true", help="run in the background and return once it answers")
    what.add_argument("--status", action="store_true", help="say whether a server is running, and what it holds")
    what.add_argument("--stop", action="store_true", help="stop the running server")
    p.set_defaults(func=_cmd_serve)
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


def _seconds(text: str) -> float:
    """``--host-timeout``: a number of seconds >= 0 (0: no limit)."""
    import math

    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0 (0: no limit), got {text!r}")
    return value


def entry(argv: list[str] | None = None) -> int:
    """The ``lmprog`` executable: the command in a running ``lmprog serve`` when there is one for this
    installation and environment (:mod:`lmprog.server`), else :func:`main` in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    from lmprog import server

    code = server.forward(argv)
    return main(argv) if code is None else code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # the user's Ctrl-C (also when the program's Python code raised it)
        print("lmprog: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmprog batch ... | head`: the reader has gone, and so does the command
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 1
    except SystemExit as exc:  # never success: nothing in a command exits on purpose
        if _stdout_went_away():  # rich's answer to a closed pipe (`lmprog run ... | head`): nothing to report
            return 1
        print(f"lmprog: internal error: SystemExit({exc.code!r}) during the command", file=sys.stderr)
        return 1
    except Exception as exc:
        code, message = _failure(exc)
        print(message, file=sys.stderr)
        return code


def _stdout_went_away() -> bool:
    """Whether standard output now points at the null device: what rich does when the reader of its pipe has
    gone (it then raises ``SystemExit(1)``)."""
    try:
        out, null = os.fstat(sys.stdout.fileno()), os.stat(os.devnull)
    except (OSError, ValueError, AttributeError):
        return False
    return (out.st_dev, out.st_ino) == (null.st_dev, null.st_ino)


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit status and message of a failed command (or batch row): 2 for program, input and option errors
    (located messages), 1 for runtime failures (every particle died, ...) and internal errors; never a
    traceback."""
    from lmprog.backends.gguf_file import GGUFError
    from lmprog.backends.loaders import ModelLoadError
    from lmprog.backends.registry import ModelNotFoundError
    from lmprog.backends.tokenizer import TokenizerError
    from lmprog.dsl.errors import LmpError

    if isinstance(exc, (LmpError, _UsageError)):
        return 2, str(exc)
    if isinstance(exc, (ModelNotFoundError, ModelLoadError, GGUFError, TokenizerError)):
        return 2, f"lmprog: error: {exc}"
    if isinstance(exc, ValueError):  # bad option values caught below argparse, memory plans, context length
        return 2, f"lmprog: error: {exc}"
    if _out_of_memory(exc):
        return 2, ("lmprog: error: the run ran out of memory, beyond what the memory pre-flight estimated "
                   f"({type(exc).__name__}: {_first_line(exc)}); use fewer particles, or a --memory-limit "
                   "smaller than what the machine has")
    if isinstance(exc, Exception) and _is_runtime_failure(exc):
        text = f"{exc}" + _call_site(exc)
        return 1, f"lmprog: run failed: {text}" + ("" if "\n" in text else _caret(text))
    return 1, f"lmprog: internal error: {type(exc).__name__}: {exc}"


def _call_site(exc: BaseException) -> str:
    """The source line and caret of the call into user code that caused ``exc`` (a ``HostError`` among its
    causes), when the message does not show them already."""
    seen = 0
    while exc is not None and seen < 8:
        diag = getattr(exc, "diagnostic", None)
        if diag is not None and type(exc).__name__ == "HostError":
            lines = diag.render().split("\n")[1:3]
            return "" if not lines or lines[0] in str(exc) else "\n" + "\n".join(lines)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return ""


def _caret(message: str) -> str:
    """The source line and a caret under ``FILE:LINE:COL`` at the start of a one-line runtime message (the
    engine and host steps locate their errors so), read from the file; empty if it cannot be read."""
    import re

    m = re.match(r"(.+?):(\d+):(\d+): ", message)
    if not m:
        return ""
    try:
        with open(m.group(1), encoding="utf-8") as f:
            lines = f.read().split("\n")
        line, col = lines[int(m.group(2)) - 1], int(m.group(3))
    except (OSError, UnicodeDecodeError, IndexError, ValueError):
        return ""
    if not 1 <= col <= len(line) + 1:
        return ""
    return f"\n    {line}\n    {' ' * (col - 1)}^"


def _out_of_memory(exc: BaseException) -> bool:
    """A host ``MemoryError`` or XLA's ``RESOURCE_EXHAUSTED`` (a device allocation that failed)."""
    return isinstance(exc, MemoryError) or ("RESOURCE_EXHAUSTED" in str(exc) and "Runtime" in type(exc).__name__)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().split("\n")[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _is_runtime_failure(exc: Exception) -> bool:
    """InferenceError / RunError, without importing JAX for commands that never ran anything."""
    segments = sys.modules.get("lmprog.inference.segments")
    errors = sys.modules.get("lmprog.compiler.errors")
    return (segments is not None and isinstance(exc, segments.InferenceError)) or \
        (errors is not None and isinstance(exc, errors.RunError))


if __name__ == "__main__":
    sys.exit(entry())
