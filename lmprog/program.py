"""The Python API of the front end: ``compile``, ``load``, :class:`Program`, and ``check_files`` for the CLI.

>>> import lmprog
>>> p = lmprog.compile('input country = "France"\\n"The capital of {country} is [city]." where city matches r"[A-Z][a-z]+"')
>>> list(p.inputs), list(p.holes)
(['country'], ['city'])

A :class:`Program` is a parsed and checked program; constructing one raises :class:`LmpError` (with every
problem found) and nothing else for any source text. ``Program.run`` / ``run_batch`` run it (``lmprog.runner``).
"""

from __future__ import annotations

import keyword
import os
from pathlib import Path
from typing import Callable, Mapping, Optional, TextIO

from lmprog.compiler.checks import (CheckedProgram, HoleSpec, ImportSpec, InputSpec, StrategySpec, check_module)
from lmprog.dsl import ast as A
from lmprog.catalog import DEFAULT_STRATEGY
from lmprog.dsl.catalog import BUILTINS, DEFAULT_MODEL, KEYWORDS
from lmprog.dsl.errors import Diagnostic, LmpError, utf8_diagnostic
from lmprog.dsl.parser import parse
from lmprog.dsl.source import SourceFile, Span, normalize_source

__all__ = ["Program", "compile", "load", "check_files", "LmpError", "InputSpec", "HoleSpec", "ImportSpec",
           "StrategySpec"]


class Program:
    """A parsed, checked .lmp program.

    Attributes:
        source: the program text (line endings normalised to ``\\n``).
        filename: the name used in diagnostics (a path for :func:`load`).
        ast: the :class:`lmprog.dsl.ast.Module`.
        inputs: ``{name: InputSpec(name, type, default, required)}`` in declaration order.
        holes: ``{name: HoleSpec(name, constraint, loop_depth, conditional)}`` in order of first definition.
        hole_definitions: every hole definition (a name defined in several ``if`` branches appears once per branch).
        model: the ``model`` statement's name, or None (the runtime uses ``default_model``).
        models: ``{alias: ModelSpec(alias, name)}``: the second models (``model judge = "..."``).
        strategy: the checked ``infer`` statement (``StrategySpec(name, args)``), or None for the default.
        imports: ``{alias: ImportSpec(alias, path, names)}``.
        functions: the ``functions=`` callables.
        returns: ``((key, expr), ...)``: what each sample reports (the ``return`` statement, else every hole).
    """

    default_model = DEFAULT_MODEL
    default_strategy = DEFAULT_STRATEGY

    def __init__(self, source: str, filename: str = "<string>", functions: Optional[Mapping[str, Callable]] = None,
                 base_dir: Optional[os.PathLike] = None):
        self.functions: dict[str, Callable] = _validate_functions(functions)
        self.filename = filename
        self.source = normalize_source(source)
        try:
            self.ast: A.Module = parse(self.source, filename)
            checked = check_module(self.ast, SourceFile(filename, self.source), self.functions,
                                   Path(base_dir) if base_dir is not None else None)
        except LmpError:
            raise
        except RecursionError:
            raise LmpError([Diagnostic(Span(filename, 1, 1, 1, 2), "the program is nested too deeply")]) from None
        except Exception as exc:  # a front-end bug: still one error type for callers (tests assert it never happens)
            raise LmpError([Diagnostic(Span(filename, 1, 1, 1, 2), f"internal error in the lmprog front end "
                                       f"(please report it): {type(exc).__name__}: {exc}")]) from exc
        self._checked: CheckedProgram = checked
        self.inputs: dict[str, InputSpec] = checked.inputs
        self.holes: dict[str, HoleSpec] = checked.holes
        self.hole_definitions: tuple[HoleSpec, ...] = checked.hole_definitions
        self.imports: dict[str, ImportSpec] = checked.imports
        self.model: Optional[str] = checked.model
        self.models: dict = checked.models  # alias -> ModelSpec of each `model alias = "..."` (judges)
        self.strategy: Optional[StrategySpec] = checked.strategy
        self.returns: tuple[tuple[str, A.Expr], ...] = checked.returns
        self.base_dir: Optional[Path] = checked.base_dir  # relative grammar / json paths (the lowering reads them)

    @property
    def required_inputs(self) -> list[str]:
        """Names of inputs without a default (a run must set them)."""
        return [name for name, spec in self.inputs.items() if spec.required]

    def run(self, inputs: Optional[Mapping] = None, /, *, particles: Optional[int] = None,
            seed: Optional[int] = None, strategy=None, max_tokens: Optional[int] = None,
            temperature: Optional[float] = None, model: Optional[str] = None, lm=None, progress=None,
            memory_limit=None, host_timeout: Optional[float] = None, devices: Optional[int] = None,
            model_devices: int = 1, models: Optional[Mapping] = None, enumerate_holes: Optional[bool] = None,
            **kwargs):
        """Run the program: ``program.run(country="Japan", particles=32, seed=1) -> Result``.

        Inputs are keyword arguments (or a dict as the first argument); ``particles`` overrides the strategy's
        first argument (particles / n / width / chains: a positive int); ``strategy`` a strategy name (or an
        engine strategy object); ``max_tokens`` (a positive int) / ``temperature`` (a positive number) the
        common options; ``seed`` the program's ``infer`` seed (an int from 0 to 2**32-1, default 0);
        ``model`` the program's model name; ``lm`` an already loaded language model; ``memory_limit`` the
        bytes (or ``"4G"``) the run may use beyond the loaded model (default: the device's free memory): a run
        that needs more runs in waves of fewer particles when its strategy allows, else raises
        :class:`lmprog.inference.memory.MemoryPlanError` saying how many particles fit; ``host_timeout``
        the seconds each call into the program's Python code may take (default 30; 0: no limit); ``devices``
        the local devices the particles are sharded over (default: as many as divide the particle count; see
        docs/devices.md) and ``model_devices`` the devices each shard's weights are split over; ``models``
        already loaded second models by alias (``{"judge": lm2}`` for ``model judge = "..."``; a declared
        model not given is loaded by its name, once per process); ``enumerate_holes`` overrides the strategy's
        ``enumerate`` option (``True``: small finite holes by exact enumeration, not token by token).

        Raises:
            OptionError (:class:`lmprog.compiler.errors.OptionError`, a ``ValueError`` and ``TypeError``): a bad argument
                (``particles=2.5``, ``strategy=5``, a seed out of range, ...), naming it and what is valid.
            LmpError: missing, unknown or bad inputs (NaN and infinite numbers included), or a program that
                cannot run with them (e.g. a loop bound that needs more tokens than the model reads); located.
            MemoryPlanError (a ``ValueError``): the run does not fit in memory; says how many particles fit.
            lmprog.inference.InferenceError: every particle died (names the constraint).
            RunError (:class:`lmprog.compiler.errors.RunError`): other runtime failures, among them
                :class:`~lmprog.compiler.errors.HostError` for the program's Python code (an exception for
                every particle, ``SystemExit``, a predicate that returns no bool, a factor that is no finite
                number, a call past ``host_timeout``), located at the ``.lmp`` call site.
            KeyboardInterrupt: passes through (also when raised by the program's Python code).
        """
        from lmprog.compiler.errors import OptionError
        from lmprog.runner import run_program

        if inputs is not None and not isinstance(inputs, Mapping):
            raise OptionError(f"inputs must be a dict of input names to values, not {type(inputs).__name__}")
        given = dict(inputs or {})
        given.update(kwargs)
        result = run_program(self, given, particles=particles, seed=seed, strategy=strategy, max_tokens=max_tokens,
                             temperature=temperature, model=model, lm=lm, progress=progress,
                             memory_limit=memory_limit, host_timeout=host_timeout, devices=devices,
                             model_devices=model_devices, models=models, enumerate_holes=enumerate_holes)
        result.program = self  # the HTML report shows the source (Result.report)
        return result

    def run_batch(self, rows, /, *, particles: Optional[int] = None, seed: Optional[int] = None,
                  strategy=None, max_tokens: Optional[int] = None, temperature: Optional[float] = None,
                  model: Optional[str] = None, lm=None, errors: str = "raise", memory_limit=None,
                  host_timeout: Optional[float] = None, devices: Optional[int] = None, model_devices: int = 1,
                  models: Optional[Mapping] = None, enumerate_holes: Optional[bool] = None):
        """Run the program once per row of inputs (dicts): ``[Result, ...]`` in input order.

        Rows with the same structure run together: every row's particles in one batched engine call (one
        compiled kernel, independent particle groups with a log Z each); see :func:`lmprog.runner.run_batch`.
        ``errors="raise"`` raises the first failing row's error (after running the batch); ``errors="return"``
        puts the exception in that row's place. The options are those of :meth:`run` (and raise the same
        errors); :func:`lmprog.runner.iter_batch` yields each row as soon as it is done.
        """
        from lmprog.compiler.errors import OptionError
        from lmprog.runner import run_batch

        if errors not in ("raise", "return"):
            raise OptionError(f"errors must be 'raise' or 'return', not {errors!r}")
        out = run_batch(self, rows, particles=particles, seed=seed, strategy=strategy, max_tokens=max_tokens,
                        temperature=temperature, model=model, lm=lm, memory_limit=memory_limit,
                        host_timeout=host_timeout, devices=devices, model_devices=model_devices, models=models,
                        enumerate_holes=enumerate_holes)
        for r in out:
            if not isinstance(r, BaseException):
                r.program = self
        if errors == "raise":
            for r in out:
                if isinstance(r, BaseException):
                    raise r
        return out

    def __repr__(self) -> str:
        inputs = ", ".join(f"{n}: {s.type}" for n, s in self.inputs.items())
        return (f"<lmprog.Program {self.filename!r} inputs=({inputs}) holes={list(self.holes)} "
                f"strategy={self.strategy.name if self.strategy else self.default_strategy}>")


def compile(source: str, filename: str = "<string>", functions: Optional[Mapping[str, Callable]] = None) -> Program:
    """Parse and check program text. Raises :class:`LmpError` listing every problem.

    ``functions={"name": callable}`` makes Python callables available by bare name in expressions, ``factor``,
    ``condition`` and ``where`` predicates, without an ``import`` file. Relative paths in the program are looked
    up next to ``filename`` when it names a file, else in the current directory.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, not {type(source).__name__}")
    return Program(source, filename, functions)


def load(path: str | os.PathLike, functions: Optional[Mapping[str, Callable]] = None) -> Program:
    """Read, parse and check a ``.lmp`` file. Raises :class:`LmpError` (also for a missing or unreadable file)."""
    name = os.fspath(path)
    return Program(_read(name), name, functions)


def check_files(paths: list[str], stream: TextIO) -> int:
    """``lmprog check``: check each file, print diagnostics; 0 if every file is valid, else 2."""
    status = 0
    for path in paths:
        try:
            load(path)
        except LmpError as err:
            _write(stream, err.render() + "\n")
            status = 2
        except Exception as exc:  # a bug in the front end must still not show a traceback to the user
            _write(stream, f"{path}:1:1: internal error while checking: {type(exc).__name__}: {exc}\n")
            status = 2
    return status


def _read(path: str) -> str:
    span = Span(path, 0, 0, 0, 0)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LmpError([Diagnostic(span, "file not found")]) from None
    except IsADirectoryError:
        raise LmpError([Diagnostic(span, "is a directory, not a .lmp file")]) from None
    except OSError as exc:
        raise LmpError([Diagnostic(span, f"cannot read file: {exc.strerror or exc}")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:  # located, with the line (bad bytes as U+FFFD) and a caret
        raise LmpError([utf8_diagnostic(path, data, exc)]) from None


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:  # e.g. an ASCII terminal: never fail on the em dash or the user's text
        encoding = getattr(stream, "encoding", None) or "ascii"
        stream.write(text.encode(encoding, "backslashreplace").decode(encoding, "replace"))


def _validate_functions(functions: Optional[Mapping[str, Callable]]) -> dict[str, Callable]:
    if functions is None:
        return {}
    if not isinstance(functions, Mapping):
        raise TypeError("functions must be a mapping of names to callables")
    out = {}
    for name, fn in functions.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name in KEYWORDS:
            raise ValueError(f"functions: {name!r} is not a valid name")
        if name in BUILTINS or name == "range":
            raise ValueError(f"functions: {name!r} would hide the built-in function of that name")
        if not callable(fn):
            raise TypeError(f"functions: {name!r} is not callable")
        out[name] = fn
    return out

