"""Semantic checks of a parsed program; every problem found is reported (one :class:`LmpError` with all of them).

:func:`check_module` walks the program once, in order, keeping an environment of the names defined so far, and
checks:

* **structure**: at most one ``model`` and one ``infer``; ``model``, ``infer``, ``input`` and ``import`` only at the
  top level; ``return`` only as the last top-level statement;
* **names**: every name is defined before it is used (flow-sensitively: a name set in only some branches of an
  ``if`` may not be used after it); no name is defined twice except ``let`` variables, which may be re-assigned;
  holes and samples inside a ``for`` loop are indexed, so after the loop the name is the list of per-iteration
  values; ``let`` variables and the loop variable first bound inside a loop body are local to it; built-ins,
  keywords and ``functions=`` names cannot be re-bound;
* **calls**: built-ins with the right number of arguments; ``functions=`` callables (their Python signature);
  ``h.f(...)`` where ``h`` is an ``import`` and ``f`` is defined in that file (read with Python's ``ast``, never
  executed); attribute access only on imported modules; ``range`` only as a ``for`` iterable; ``logprob`` of a
  hole; ``logprob_of(TEXT, given=CONTEXT)`` and ``M.logprob_of(...)`` of a model declared with ``model M = "..."``
  (strings; not in ``return``, ``where`` or ``infer`` arguments: it is scored in host statements);
* **types** where they are known before the run (literals, declared inputs, holes are strings, ...): operators,
  comparisons, built-in arguments, input defaults, loop bounds;
* **loops**: the iterable is known before the run: ``range(N)`` with integer N, or a list, built only from
  literals, inputs and ``let`` s of those;
* **constraints**, **regexes** and **emptiness**: :mod:`lmprog.compiler.check_constraints`;
* **strategies** and **distributions**: :mod:`lmprog.compiler.check_args`;
* what those share with this walker (bindings, the environment, the interface they call back through,
  :class:`~lmprog.compiler.check_env.CheckContext`): :mod:`lmprog.compiler.check_env`;
* **files**: ``import`` paths (and ``grammar`` / ``json`` files) exist, relative to the program file.

The result, :class:`CheckedProgram`, is what :class:`lmprog.program.Program` exposes and the lowering consumes.
"""

from __future__ import annotations

import ast as pyast
import inspect
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from lmprog.catalog import CATALOG
from lmprog.compiler.check_args import StrategySpec, check_infer, check_sample
from lmprog.compiler.check_constraints import check_where
from lmprog.dsl.constraints import conjuncts
from lmprog.compiler.check_env import KIND_WORD, UNKNOWN, Binding, Ctx, Env, regex_span
from lmprog.compiler.check_regex import regex_problem
from lmprog.dsl import ast as A
from lmprog.dsl.catalog import BUILTINS, CONSTRAINT_CALLS, DISTRIBUTIONS, INPUT_TYPES, PYTHON_SPELLINGS
from lmprog.dsl.errors import Diagnostic, LmpError, suggestion
from lmprog.dsl.printer import expr_to_source
from lmprog.dsl.source import NO_SPAN, SourceFile, Span
from lmprog.dsl.static import NotStatic, StaticError, static_value

NUMERIC = ("int", "float", "bool")


# --------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class InputSpec:
    """A program input: ``type`` is one of str, int, float, bool, list; ``default`` is a Python value."""

    name: str
    type: str
    default: Any = None
    required: bool = True
    span: Span = field(default=NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class HoleSpec:
    """A generation hole: where it is defined and the constraint on it (the ``where`` terms that name it).

    ``loop_depth`` > 0 means the hole is inside that many ``for`` loops (its value is then indexed);
    ``conditional`` means it is inside an ``if`` branch (it may have no value). A name defined as a hole in
    several branches of an ``if`` has one spec per definition in ``Program.hole_definitions``; ``holes`` keeps the
    first.
    """

    name: str
    constraint: Optional[A.Constraint] = None
    loop_depth: int = 0
    conditional: bool = False
    statement: Optional[A.Node] = field(default=None, compare=False, repr=False)
    span: Span = field(default=NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class ImportSpec:
    """``import "path" as alias``: the resolved path, and the names the file defines (None if not knowable)."""

    alias: str
    path: str
    names: Optional[frozenset[str]] = None
    span: Span = field(default=NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class ModelSpec:
    """``model alias = "name"``: a second model, scored with ``alias.logprob_of(...)`` (loaded at run time)."""

    alias: str
    name: str
    span: Span = field(default=NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True)
class CheckedProgram:
    """Everything the checks learnt about a valid program."""

    module: A.Module
    inputs: dict[str, InputSpec]
    holes: dict[str, HoleSpec]
    hole_definitions: tuple[HoleSpec, ...]
    imports: dict[str, ImportSpec]
    model: Optional[str]
    strategy: Optional[StrategySpec]
    returns: tuple[tuple[str, A.Expr], ...]
    base_dir: Optional[Path] = None  # where relative grammar / json / import paths were looked up
    models: dict = field(default_factory=dict)  # alias -> ModelSpec: the models of `model NAME = "..."`


# ----------------------------------------------------------------------------------------------------- checker


class Checker:
    """One check of one program. Use :func:`check_module`."""

    def __init__(self, module: A.Module, source: SourceFile, functions: Mapping[str, Callable],
                 base_dir: Path):
        self.module = module
        self.source = source
        self.functions = dict(functions)
        self.base_dir = base_dir
        self.diagnostics: list[Diagnostic] = []
        self.inputs: dict[str, InputSpec] = {}
        self.holes: list[HoleSpec] = []
        self.imports: dict[str, ImportSpec] = {}
        self.model: Optional[str] = None
        self.models: dict[str, ModelSpec] = {}
        self.infer: Optional[A.InferStmt] = None
        self.return_stmt: Optional[A.Return] = None
        self.defined_anywhere = _all_bindings(module)
        self.reported_undefined: set[str] = set()

    # -------------------------------------------------------------------------------------------- reporting

    def error(self, span: Span, message: str, help: Optional[str] = None, source_line: Optional[str] = None) -> None:
        line = self.source.line_text(span.line) if span.file == self.source.name else source_line
        self.diagnostics.append(Diagnostic(span, message, help, line))

    # -------------------------------------------------------------------------------------------------- run

    def run(self) -> CheckedProgram:
        self.structure()
        env: Env = {name: Binding("function", "function", NO_SPAN) for name in self.functions}
        env = self.block(self.module.body, env, Ctx())
        strategy = check_infer(self, self.infer, env) if self.infer is not None else None
        if self.infer is not None:
            for kw in self.infer.kwargs:
                self.no_lm_scores(kw.value, f"the {kw.name}= of a strategy", "compute it with a let")
        returns = self.returns(env)
        for _, v in returns:
            self.no_lm_scores(v, "a return value", "compute it with a let before the return: "
                                                   "let r = logprob_of(...)")
        if self.diagnostics:
            raise LmpError(self.diagnostics)
        first: dict[str, HoleSpec] = {}
        for h in self.holes:
            first.setdefault(h.name, h)
        return CheckedProgram(self.module, dict(self.inputs), first, tuple(self.holes), dict(self.imports),
                              self.model, strategy, returns, self.base_dir, dict(self.models))

    # ---------------------------------------------------------------------------------------------- structure

    def structure(self) -> None:
        """Counts and placement of model / infer / input / import / return."""
        seen: dict[type, A.Node] = {}
        body = self.module.body
        for i, stmt in enumerate(body):
            if isinstance(stmt, (A.ModelStmt, A.InferStmt)):
                word = "model" if isinstance(stmt, A.ModelStmt) else "infer"
                if type(stmt) in seen:
                    first = seen[type(stmt)].span
                    self.error(stmt.span, f"a program has at most one '{word}' statement",
                               f"the first one is at line {first.line}")
                else:
                    seen[type(stmt)] = stmt
                    if isinstance(stmt, A.ModelStmt):
                        self.model = stmt.name
                        if not stmt.name.strip():
                            self.error(stmt.span, "the model name is empty",
                                       'write a registered name such as "smollm2-135m", or a path')
                    else:
                        self.infer = stmt
            if isinstance(stmt, A.ModelDecl):
                if not stmt.name.strip():
                    self.error(stmt.path_span, "the model name is empty",
                               'write a registered name such as "smollm2-135m", or a path')
                self.models.setdefault(stmt.alias, ModelSpec(stmt.alias, stmt.name, span=stmt.span))
            if isinstance(stmt, A.Return):
                if i != len(body) - 1:
                    self.error(stmt.span, "return must be the last statement of the program",
                               "move it to the end; nothing after a return would run")
                self.return_stmt = stmt
        for stmt in _nested_statements(body):
            if isinstance(stmt, (A.ModelStmt, A.ModelDecl, A.InferStmt, A.InputStmt, A.ImportStmt, A.Return)):
                word = {A.ModelStmt: "model", A.ModelDecl: "model", A.InferStmt: "infer", A.InputStmt: "input",
                        A.ImportStmt: "import", A.Return: "return"}[type(stmt)]
                self.error(stmt.span, f"'{word}' must be at the top level of the program, not inside if/for")

    # --------------------------------------------------------------------------------------------- statements

    def block(self, body: tuple[A.Stmt, ...], env: Env, ctx: Ctx) -> Env:
        for stmt in body:
            env = self.stmt(stmt, env, ctx)
        return env

    def stmt(self, s: A.Stmt, env: Env, ctx: Ctx) -> Env:
        method = getattr(self, "s_" + type(s).__name__)
        return method(s, env, ctx)

    def s_ModelStmt(self, s, env, ctx):
        return env

    def s_ModelDecl(self, s: A.ModelDecl, env: Env, ctx: Ctx) -> Env:
        return self.bind(s.alias, Binding("model", "model", s.name_span), env, s.name_span, ctx)

    def s_InferStmt(self, s, env, ctx):
        return env  # checked at the end: score= / key= may name anything the program defines

    def s_InputStmt(self, s: A.InputStmt, env: Env, ctx: Ctx) -> Env:
        declared = s.type
        if declared is not None and declared not in INPUT_TYPES:
            self.error(s.type_span, f"unknown input type '{declared}'" + suggestion(declared, INPUT_TYPES),
                       "input types: " + ", ".join(INPUT_TYPES))
            declared = None
        value, has_default = None, s.default is not None
        if s.default is not None:
            self.expr(s.default, env)
            try:
                value = static_value(s.default)
            except NotStatic:
                self.error(s.default.span, "the default of an input must be a literal",
                           'e.g. input n: int = 3, or input name = "Ada"')
                has_default = False
            except StaticError as exc:
                self.error(s.default.span, f"cannot evaluate the default: {exc}")
                has_default = False
        typ = declared
        if has_default:
            actual = _type_of_value(value)
            if typ is None:
                if actual not in INPUT_TYPES:
                    self.error(s.default.span, f"an input cannot be a {actual}",
                               "input types: " + ", ".join(INPUT_TYPES))
                typ = actual
            elif not _value_fits(typ, value):
                self.error(s.default.span, f"the default of '{s.name}' is {_a(actual)}, not {_a(typ)}")
            elif typ == "float":
                value = float(value)
        typ = typ or "str"
        if s.name not in self.inputs:  # a second definition is reported by bind()
            self.inputs[s.name] = InputSpec(s.name, typ, value if has_default else None,
                                            not has_default and s.default is None, span=s.span)
        return self.bind(s.name, Binding("input", typ, s.name_span, static=True), env, s.name_span, ctx)

    def s_ImportStmt(self, s: A.ImportStmt, env: Env, ctx: Ctx) -> Env:
        spec = self.import_file(s)
        if spec is not None and s.alias not in self.imports:
            self.imports[s.alias] = spec
        return self.bind(s.alias, Binding("module", "module", s.name_span), env, s.name_span, ctx)

    def s_Template(self, s: A.Template, env: Env, ctx: Ctx) -> Env:
        before = _Before(env, _hole_names(s.parts))
        env, holes = self.parts(s.parts, env, ctx, allow_holes=True)
        self.constraints(s, s.where, holes, before, env, ctx)
        return env

    def s_Turn(self, s: A.Turn, env: Env, ctx: Ctx) -> Env:
        """A chat turn: a template whose holes are only allowed in assistant turns; not inside an ``if`` (the
        chat template renders a turn from the roles of the turns before it, the same for every particle)."""
        if s.role != "assistant":
            for hole in s.holes:
                self.error(hole.span, f"a {s.role} turn cannot contain a hole ('[{hole.name}]')",
                           "the model generates only its own turns: put holes in an assistant turn, "
                           "or write '[[' for a literal '['")
        if ctx.branch:
            self.error(s.role_span, f"a chat turn ({s.role}) cannot be inside an if branch",
                       "the conversation's turns are the same for every run: put the turn before or after "
                       "the if, and choose its text with a let or an interpolation")
        return self.s_Template(s, env, ctx)  # (holes of other turns are bound too: no follow-on errors)

    def s_Gen(self, s: A.Gen, env: Env, ctx: Ctx) -> Env:
        before = _Before(env, frozenset([s.name]) if s.name not in env else frozenset())
        env = self.bind(s.name, Binding("hole", "str", s.name_span), env, s.name_span, ctx)
        self.constraints(s, s.where, {s.name: s.name_span}, before, env, ctx)
        return env

    def s_Observe(self, s: A.Observe, env: Env, ctx: Ctx) -> Env:
        env, _ = self.parts(s.parts, env, ctx, allow_holes=False)
        return env

    def s_SampleStmt(self, s: A.SampleStmt, env: Env, ctx: Ctx) -> Env:
        typ = check_sample(self, s, env)
        return self.bind(s.name, Binding("sample", typ, s.name_span), env, s.name_span, ctx)

    def s_Let(self, s: A.Let, env: Env, ctx: Ctx) -> Env:
        typ = self.expr(s.value, env)
        static = ctx.top and self.is_static(s.value, env)
        value = self.fold(s.value, env, report=False) if static else UNKNOWN
        return self.bind(s.name, Binding("let", typ, s.name_span, static=static, value=value), env, s.name_span,
                         ctx)

    def s_Condition(self, s: A.Condition, env: Env, ctx: Ctx) -> Env:
        self.expr(s.test, env)
        return env

    def s_Factor(self, s: A.Factor, env: Env, ctx: Ctx) -> Env:
        typ = self.expr(s.value, env)
        if typ in ("str", "list", "dict"):
            self.error(s.value.span, f"factor needs a number (a log-weight), not {_a(typ)}")
        return env

    def s_If(self, s: A.If, env: Env, ctx: Ctx) -> Env:
        inner = replace(ctx, top=False, branch=True)
        outcomes = []
        for branch in s.branches:
            self.expr(branch.test, env)
            outcomes.append(self.block(branch.body, dict(env), inner))
        outcomes.append(self.block(s.orelse, dict(env), inner) if s.orelse is not None else dict(env))
        return _merge_branches(env, outcomes, s.span)

    def s_For(self, s: A.For, env: Env, ctx: Ctx) -> Env:
        var_type = self.loop_iterable(s, env)
        inner_ctx = replace(ctx, top=False, loops=ctx.loops + 1)
        inner = self.bind(s.var, Binding("loop", var_type, s.name_span), dict(env), s.name_span, inner_ctx)
        after = self.block(s.body, inner, inner_ctx)
        return _merge_loop(env, after, s.var)

    def s_Return(self, s: A.Return, env: Env, ctx: Ctx) -> Env:
        for v in s.values:
            self.expr(v, env)
        return env

    # ---------------------------------------------------------------------------------------------- bindings

    def bind(self, name: str, binding: Binding, env: Env, span: Span, ctx: Ctx) -> Env:
        """Define ``name`` (reporting invalid re-definitions); returns the new environment."""
        if name in BUILTINS or name == "range":
            self.error(span, f"'{name}' is a built-in function and cannot be used as a name")
            return env
        if name in PYTHON_SPELLINGS:
            self.error(span, f"'{name}' cannot be used as a name")
            return env
        old = env.get(name)
        if old is not None and not (binding.kind == "let" and old.kind == "let"):
            if old.kind == "function" and old.span is NO_SPAN:
                self.error(span, f"'{name}' is already defined: it is a function passed with functions=")
            else:
                where = f" (line {old.span.line})" if old.span.line else ""
                self.error(span, f"'{name}' is already defined as {KIND_WORD[old.kind]}{where}",
                           "use a different name" if binding.kind != "let" else
                           f"only let variables can be assigned again; '{name}' is {KIND_WORD[old.kind]}")
            return env
        if binding.kind == "let" and old is not None and not ctx.top:
            binding = replace(binding, static=False, value=UNKNOWN)
        # In place: an environment belongs to the block threading it (branches and loop bodies start from a
        # copy, a statement's "before" is a view), so copying here would make checking quadratic in the
        # number of statements.
        env[name] = binding
        return env

    def parts(self, parts: tuple[A.Part, ...], env: Env, ctx: Ctx, allow_holes: bool) -> tuple[Env, dict[str, Span]]:
        """Check a template's interpolations in order and bind its holes; returns (env, holes of the template)."""
        holes: dict[str, Span] = {}
        for part in parts:
            if isinstance(part, A.Interp):
                typ = self.expr(part.expr, env)
                if part.fmt is not None:
                    self.format_spec(part, typ)
            elif isinstance(part, A.Hole):
                if not allow_holes:
                    self.error(part.span, "observe text cannot contain holes",
                               "observe scores given text; generate with a template or gen, "
                               "or write '[[' for a literal '['")
                    continue
                if part.name in holes:
                    self.error(part.span, f"hole '{part.name}' appears twice in this template",
                               "give each hole its own name")
                    continue
                holes[part.name] = part.span
                env = self.bind(part.name, Binding("hole", "str", part.span), env, part.span, ctx)
        return env, holes

    def format_spec(self, part: A.Interp, typ: str) -> None:
        samples = {"str": "", "int": 0, "float": 0.0, "bool": 0}
        if any(len(run) > 5 for run in re.findall(r"[0-9]+", part.fmt or "")):
            self.error(part.span, f"width or precision too large in the format spec ':{part.fmt}'")
            return
        try:
            if typ in samples:
                format(samples[typ], part.fmt)
            else:
                for probe in ("", 0.0):
                    try:
                        format(probe, part.fmt)
                        return
                    except (ValueError, TypeError):
                        continue
                raise ValueError("invalid format spec")
        except (ValueError, TypeError) as exc:
            self.error(part.span, f"invalid format spec ':{part.fmt}'" + (f" for {_a(typ)}" if typ in samples else "")
                       + f": {exc}", "format specs are those of Python's format(), e.g. {x:.2f} or {name:>10}")

    # ------------------------------------------------------------------------------------------- constraints

    def constraints(self, stmt, where, holes: dict[str, Span], before: Env, after: Env, ctx: Ctx) -> None:
        if where is not None:
            self.no_lm_scores(where, "a where clause", "compute it with a let before the template")
        per_hole = check_where(self, where, holes, before, after)
        for name, c in per_hole.items():  # a json hole's value is the parsed JSON value, not its text
            if any(isinstance(t, A.JsonC) for t in conjuncts(c)) and name in after:
                after[name] = replace(after[name], type="any")
        for name, span in holes.items():
            self.holes.append(HoleSpec(name, per_hole.get(name), ctx.loops, ctx.branch, stmt, span=span))

    # -------------------------------------------------------------------------------------------------- loops

    def loop_iterable(self, s: A.For, env: Env) -> str:
        """Check a ``for`` iterable is known before the run; returns the loop variable's type."""
        it = s.iter
        if s.is_range:
            call = it
            assert isinstance(call, A.Call)
            if call.kwargs or not 1 <= len(call.args) <= 3:
                self.error(call.span, "range() takes 1 to 3 positional arguments",
                           "range(n), range(start, stop) or range(start, stop, step)")
            for arg in call.args:
                typ = self.expr(arg, env)
                if not self.require_static(arg, env, "the bound of a for loop"):
                    continue
                if typ not in ("int", "bool", "any"):
                    self.error(arg.span, f"range() needs integers, not {_a(typ)}")
                value = self.fold(arg, env)
                if len(call.args) == 3 and arg is call.args[2] and value == 0:
                    self.error(arg.span, "the step of range() must not be zero")
            return "int"
        typ = self.expr(it, env)
        if not self.require_static(it, env, "the list of a for loop"):
            return "any"
        if typ not in ("list", "any"):
            self.error(it.span, f"a for loop iterates over range(...) or a list, not {_a(typ)}")
        value = self.fold(it, env, report=False)
        if isinstance(value, list):
            kinds = {_type_of_value(v) for v in value}
            return kinds.pop() if len(kinds) == 1 else "any"
        return "any"

    # -------------------------------------------------------------------------------------------------- files

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.base_dir / p

    def import_file(self, s: A.ImportStmt) -> Optional[ImportSpec]:
        path = self.resolve(s.path)
        if not s.path.endswith(".py"):
            self.error(s.path_span, f"import expects a Python file (.py), not '{s.path}'")
            return None
        try:
            is_file = path.is_file()
        except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte in the path
            self.error(s.path_span, f"cannot use '{_short(s.path)}' as a file name: {_os_reason(exc)}",
                       "import a Python file next to the program, e.g. import \"helpers.py\" as h")
            return None
        if not is_file:
            self.error(s.path_span, f"file not found: '{_short(s.path)}'",
                       f"import paths are relative to the program's folder ({self.base_dir})")
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            self.error(s.path_span, f"cannot read '{_short(s.path)}': {_os_reason(exc)}")
            return None
        try:
            tree = pyast.parse(text, filename=str(path))
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            where = f" at line {exc.lineno}" if isinstance(exc, SyntaxError) and exc.lineno else ""
            self.error(s.path_span, f"'{s.path}' is not valid Python{where}: {getattr(exc, 'msg', exc)}")
            return None
        return ImportSpec(s.alias, str(path), _module_names(tree), span=s.span)

    # ------------------------------------------------------------------------------------------- expressions

    def expr(self, e: A.Expr, env: Env) -> str:
        """Check an expression; returns its type ('str', 'int', ..., or 'any' when not known)."""
        method = getattr(self, "e_" + type(e).__name__)
        return method(e, env)

    def e_Name(self, e: A.Name, env: Env) -> str:
        b = self.lookup(e, env)
        if b is None:
            return "any"
        if b.kind == "module":
            self.error(e.span, f"'{e.id}' is a module: call its functions as {e.id}.name(...)")
            return "any"
        if b.kind == "function":
            self.error(e.span, f"'{e.id}' is a function: call it as {e.id}(...)")
            return "any"
        if b.kind == "model":
            self.error(e.span, f"'{e.id}' is a model: score text with {e.id}.logprob_of(TEXT, given=CONTEXT)")
            return "any"
        return b.type

    def lookup(self, e: A.Name, env: Env) -> Optional[Binding]:
        """The binding of a used name, reporting undefined and maybe-undefined names."""
        b = env.get(e.id)
        if b is None:
            self.undefined(e, env)
            return None
        if b.maybe is not None:
            self.error(e.span, f"'{e.id}' may be undefined here: it is set in only some branches of the 'if' "
                       f"at line {b.maybe.line}", "set it in every branch (or before the if)")
        return b

    def undefined(self, e: A.Name, env: Env) -> None:
        """Report an unknown name (once per name: later uses would only repeat it)."""
        name = e.id
        if name in self.reported_undefined:
            return
        self.reported_undefined.add(name)
        if name in PYTHON_SPELLINGS and PYTHON_SPELLINGS[name]:
            self.error(e.span, f"unknown name '{name}' — did you mean '{PYTHON_SPELLINGS[name]}'?")
            return
        if name == "None":
            self.error(e.span, "name 'None' is not defined", "the language has no None; use a value such as \"\" or 0")
            return
        if name in BUILTINS or name == "range":
            self.error(e.span, f"'{name}' is a built-in function: call it as {name}(...)")
            return
        later = self.defined_anywhere.get(name)
        if later is not None and later.line >= e.span.line and (later.line, later.col) > (e.span.line, e.span.col):
            self.error(e.span, f"'{name}' is used before it is defined (line {later.line})",
                       "statements run in order; define it first")
            return
        if later is not None:
            self.error(e.span, f"'{name}' is not defined here (it is defined at line {later.line}, in a block "
                       "that does not enclose this line)", "let variables and the loop variable of a for loop "
                       "are local to its body; holes and samples become lists after the loop")
            return
        self.error(e.span, f"name '{name}' is not defined" + suggestion(name, env))

    def e_Str(self, e, env):
        return "str"

    def e_Int(self, e, env):
        return "int"

    def e_Float(self, e, env):
        return "float"

    def e_Bool(self, e, env):
        return "bool"

    def e_FString(self, e: A.FString, env: Env) -> str:
        for part in e.parts:
            if isinstance(part, A.Interp):
                typ = self.expr(part.expr, env)
                if part.fmt is not None:
                    self.format_spec(part, typ)
        return "str"

    def e_ListExpr(self, e: A.ListExpr, env: Env) -> str:
        for item in e.items:
            self.expr(item, env)
        return "list"

    def e_DictExpr(self, e: A.DictExpr, env: Env) -> str:
        for k, v in zip(e.keys, e.values):
            kt = self.expr(k, env)
            if kt in ("list", "dict"):
                self.error(k.span, f"a dict key cannot be {_a(kt)}")
            self.expr(v, env)
        return "dict"

    def e_UnaryOp(self, e: A.UnaryOp, env: Env) -> str:
        typ = self.expr(e.operand, env)
        if e.op == "not":
            return "bool"
        if typ in ("str", "list", "dict"):
            self.error(e.span, f"bad operand for unary {e.op}: {_a(typ)}")
            return "any"
        return "int" if typ == "bool" else typ

    def e_BinOp(self, e: A.BinOp, env: Env) -> str:
        lt, rt = self.expr(e.left, env), self.expr(e.right, env)
        result = _binop_type(e.op, lt, rt)
        if result is None:
            help = "format strings with an f-string: f\"{x}\"" if e.op == "%" and lt == "str" else None
            if e.op == "+" and "str" in (lt, rt) and (lt in NUMERIC or rt in NUMERIC):
                help = "convert with str(...), or use an f-string"
            self.error(e.span, f"unsupported operand types for {e.op}: {_a(lt)} and {_a(rt)}", help)
            return "any"
        return result

    def e_BoolOp(self, e: A.BoolOp, env: Env) -> str:
        types = {self.expr(v, env) for v in e.values}
        return types.pop() if len(types) == 1 else "any"

    def e_Compare(self, e: A.Compare, env: Env) -> str:
        left_t = self.expr(e.left, env)
        for op, right_e in zip(e.ops, e.comparators):
            right_t = self.expr(right_e, env)
            problem = _compare_problem(op, left_t, right_t)
            if problem:
                self.error(e.span, problem)
            if op == "matches":
                self.host_regex(right_e, env)
            left_t = right_t
        return "bool"

    def e_IfExp(self, e: A.IfExp, env: Env) -> str:
        self.expr(e.test, env)
        a, b = self.expr(e.body, env), self.expr(e.orelse, env)
        return a if a == b else "any"

    def e_Index(self, e: A.Index, env: Env) -> str:
        vt, it = self.expr(e.value, env), self.expr(e.index, env)
        if vt in NUMERIC:
            self.error(e.value.span, f"{_a(vt)} cannot be indexed")
        elif vt in ("str", "list") and it in ("str", "float", "list", "dict"):
            self.error(e.index.span, f"{_a(vt)} index must be an integer, not {_a(it)}")
        return "str" if vt == "str" else "any"

    def e_Slice(self, e: A.Slice, env: Env) -> str:
        vt = self.expr(e.value, env)
        for part in (e.lower, e.upper, e.step):
            if part is not None:
                pt = self.expr(part, env)
                if pt in ("str", "float", "list", "dict"):
                    self.error(part.span, f"slice bounds must be integers, not {_a(pt)}")
        if vt in NUMERIC or vt == "dict":
            self.error(e.value.span, f"{_a(vt)} cannot be sliced")
        return vt if vt in ("str", "list") else "any"

    def e_Attribute(self, e: A.Attribute, env: Env) -> str:
        self.module_attribute(e, env)
        return "any"

    def module_attribute(self, e: A.Attribute, env: Env) -> bool:
        """Check ``module.name``; reports any other attribute access. True if it is a valid module member."""
        if isinstance(e.value, A.Name):
            b = env.get(e.value.id)
            if b is not None and b.kind == "model":
                self.error(e.span, f"'{e.value.id}' is a model: its one function is "
                           f"{e.value.id}.logprob_of(TEXT, given=CONTEXT), called")
                return False
            if b is not None and b.kind == "module":
                spec = self.imports.get(e.value.id)
                if spec is not None and spec.names is not None and e.attr not in spec.names:
                    self.error(e.span, f"'{Path(spec.path).name}' defines no '{e.attr}'"
                               + suggestion(e.attr, spec.names))
                return True
            if b is None and e.value.id not in self.defined_anywhere and e.value.id not in BUILTINS:
                self.undefined(e.value, env)
                return False
            if b is not None:
                self.lookup(e.value, env)
        else:
            self.expr(e.value, env)
        help = f"write {e.attr}(...) with the value as first argument" if e.attr in BUILTINS else None
        self.error(e.span, "attribute access is only for imported modules (h.name)", help)
        return False

    def e_Call(self, e: A.Call, env: Env) -> str:
        func = e.func
        if isinstance(func, A.Attribute) and isinstance(func.value, A.Name) and self.is_model_call(func, env):
            return self.model_call(e, func, env)
        if isinstance(func, A.Attribute):
            self.module_attribute(func, env)
            self.call_args(e, env)
            return "any"
        if not isinstance(func, A.Name):
            self.expr(func, env)
            self.call_args(e, env)
            self.error(func.span, "only built-in functions and imported functions can be called")
            return "any"
        name = func.id
        b = env.get(name)
        if b is not None and b.kind == "function":
            self.call_args(e, env)
            self.python_signature(e, name)
            return "any"
        if b is not None:
            self.call_args(e, env)
            self.error(func.span, f"'{name}' is {KIND_WORD[b.kind]}, not a function")
            return "any"
        if name in BUILTINS:
            return self.builtin_call(e, name, env)
        self.call_args(e, env)
        if name == "range":
            self.error(func.span, "range() can only be the iterable of a for loop", "for i in range(n):")
        elif name in DISTRIBUTIONS:
            self.error(func.span, f"'{name}' is a distribution: draw from it with sample x ~ {name}(...)")
        elif name in CONSTRAINT_CALLS:
            help = f"use {name}(...) after 'where' on a template or gen"
            if name in ("contains", "startswith", "endswith"):
                help = None
            self.error(func.span, f"'{name}' is a constraint: it can only be used in a where clause", help)
        elif name in CATALOG:
            self.error(func.span, f"'{name}' is an inference strategy: write infer {name}(...)")
        else:
            candidates = [*BUILTINS, *(n for n, b in env.items() if b.kind == "function")]
            self.error(func.span, f"unknown function '{name}'" + suggestion(name, candidates),
                       "built-in functions: " + ", ".join(BUILTINS))
        return "any"

    def call_args(self, e: A.Call, env: Env) -> list[str]:
        types = [self.expr(a, env) for a in e.args]
        for kw in e.kwargs:
            self.expr(kw.value, env)
        return types

    def python_signature(self, e: A.Call, name: str) -> None:
        fn = self.functions.get(name)
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return
        try:
            sig.bind(*e.args, **{k.name: k.value for k in e.kwargs})
        except TypeError as exc:
            self.error(e.span, f"bad call of {name}(): {exc}", f"its signature is {name}{sig}")

    def builtin_call(self, e: A.Call, name: str, env: Env) -> str:
        spec = BUILTINS[name]
        if name == "logprob":
            return self.logprob_call(e, env)
        if name == "logprob_of":
            return self.logprob_of_call(e, "logprob_of", env)
        types = self.call_args(e, env)
        n = len(e.args) + len(e.kwargs)
        if spec.varargs:
            if e.kwargs:
                self.error(e.kwargs[0].name_span, f"{name}() takes no keyword arguments")
            if not e.args:
                self.error(e.span, f"{name}() needs at least one argument")
            if len(e.args) == 1 and types[0] not in ("list", "any", "str"):
                self.error(e.args[0].span, f"{name}() of one argument needs a list, not {_a(types[0])}")
            return "any"
        names = spec.params
        given = set()
        for i, _ in enumerate(e.args):
            if i < len(names):
                given.add(names[i])
        for kw in e.kwargs:
            if kw.name not in names:
                self.error(kw.name_span, f"{name}() has no parameter '{kw.name}'" + suggestion(kw.name, names))
            elif kw.name in given:
                self.error(kw.name_span, f"{name}() got two values for '{kw.name}'")
            given.add(kw.name)
        if len(e.args) > len(names) or n < spec.required or not all(p in given for p in names[:spec.required]):
            counts = (f"{spec.required}" if spec.required == len(names)
                      else f"{spec.required} to {len(names)}")
            self.error(e.span, f"{name}() takes {counts} argument{'s' if len(names) > 1 else ''} ({n} given)",
                       f"{name}({', '.join(names)}): {spec.doc}")
            return spec.returns if spec.returns != "same" else "any"
        self.builtin_types(e, name, types)
        if spec.returns == "same":
            return types[0] if types and types[0] in ("int", "float") else "any"
        return spec.returns

    def builtin_types(self, e: A.Call, name: str, types: list[str]) -> None:
        wanted = _BUILTIN_ARG_TYPES.get(name, ())
        for i, (arg, typ) in enumerate(zip(e.args, types)):
            if i < len(wanted) and wanted[i] and typ != "any" and typ not in wanted[i]:
                self.error(arg.span, f"{name}() needs {_one_of_types(wanted[i])} here, not {_a(typ)}")

    def logprob_call(self, e: A.Call, env: Env) -> str:
        if len(e.args) != 1 or e.kwargs or not isinstance(e.args[0], A.Name):
            self.call_args(e, env)
            self.error(e.span, "logprob() takes one hole name: logprob(answer)")
            return "float"
        arg = e.args[0]
        b = self.lookup(arg, env)
        if b is not None and b.kind != "hole":
            self.error(arg.span, f"logprob() needs a hole, and '{arg.id}' is {KIND_WORD[b.kind]}")
        return "float"

    def is_model_call(self, func: A.Attribute, env: Env) -> bool:
        """Whether ``NAME.attr(...)`` is meant as a model's call: NAME is a declared model, or NAME is bound to
        nothing (no import, no other name) and attr is ``logprob_of``."""
        b = env.get(func.value.id)
        if b is not None:
            return b.kind == "model" or (func.attr == "logprob_of" and b.kind != "module")
        return func.attr == "logprob_of" and func.value.id not in self.defined_anywhere

    def model_call(self, e: A.Call, func: A.Attribute, env: Env) -> str:
        """``M.logprob_of(TEXT, given=CONTEXT)``: M must be a model declared with ``model M = "..."``."""
        alias = func.value.id
        b = env.get(alias)
        if b is None or b.kind != "model":
            declared = [n for n, b in env.items() if b.kind == "model"]
            self.call_args(e, env)
            what = f"unknown model '{alias}'" if b is None else f"'{alias}' is {KIND_WORD[b.kind]}, not a model"
            listed = f"declared models: {', '.join(declared)}" if declared else "no model is declared"
            self.error(func.value.span, what + suggestion(alias, declared),
                       listed + ("; " + f'declare one with model {alias} = "NAME-OR-PATH"' if b is None else "")
                       + "; score under the program's model with logprob_of(TEXT, given=CONTEXT)")
            return "float"
        if func.attr != "logprob_of":
            self.call_args(e, env)
            self.error(func.span, f"a model has no function '{func.attr}'" + suggestion(func.attr, ["logprob_of"]),
                       f"{alias}.logprob_of(TEXT, given=CONTEXT) is the log-probability of TEXT after CONTEXT")
            return "float"
        return self.logprob_of_call(e, f"{alias}.logprob_of", env)

    def logprob_of_call(self, e: A.Call, name: str, env: Env) -> str:
        """``logprob_of(TEXT, given=CONTEXT)``: one positional string and the keyword ``given=``, a string."""
        types = self.call_args(e, env)
        usage = f"{name}(TEXT, given=CONTEXT): the log-probability of the string TEXT after the string CONTEXT"
        ok = True
        for kw in e.kwargs:
            if kw.name != "given":
                self.error(kw.name_span, f"{name}() has no parameter '{kw.name}'"
                           + suggestion(kw.name, ["given"]), usage)
                ok = False
        if len(e.args) != 1:
            self.error(e.span, f"{name}() takes one positional argument, the text ({len(e.args)} given)", usage)
            ok = False
        elif not any(kw.name == "given" for kw in e.kwargs) and ok:
            self.error(e.span, f"{name}() needs the context as a keyword argument given=...", usage)
        if ok and e.args and types[0] not in ("str", "any"):
            self.error(e.args[0].span, f"{name}() scores a string, not {_a(types[0])}",
                       "convert it with str(...), or use an f-string")
        for kw in e.kwargs:
            if kw.name == "given":
                typ = self.expr(kw.value, env)
                if typ not in ("str", "any"):
                    self.error(kw.value.span, f"the context given= of {name}() must be a string, not {_a(typ)}",
                               "convert it with str(...), or use an f-string")
        return "float"

    def no_lm_scores(self, node: A.Node, where: str, help: str) -> None:
        """Report a ``logprob_of`` call in ``node``: LM scores are computed in host statements (let, condition,
        factor, if, sample arguments, interpolations), batched over the particles of one step."""
        for sub in A.walk(node):
            if isinstance(sub, A.Call) and _is_logprob_of(sub.func):
                self.error(sub.span, f"logprob_of() cannot be used in {where}",
                           "it is scored for all particles at once in a statement of the program (let, "
                           f"condition, factor, if, a template); {help}")
                return

    # ----------------------------------------------------------------------------------------------- statics

    def is_static(self, e: A.Expr, env: Env) -> bool:
        """Whether every name ``e`` uses is known before the run (and it calls no host code or tokenizer)."""
        for node in A.walk(e):
            if isinstance(node, A.Name):
                b = env.get(node.id)
                if b is not None and not b.static and b.kind != "function":
                    return False
            if isinstance(node, A.Call):
                f = node.func
                if not isinstance(f, A.Name) or f.id in ("tokens", "logprob", "logprob_of") or f.id not in BUILTINS:
                    return False
        return True

    def require_static(self, e: A.Expr, env: Env, what: str) -> bool:
        """Report the first name in ``e`` whose value is not known before the run."""
        for node in A.walk(e):
            if isinstance(node, A.Name):
                b = env.get(node.id)
                if b is not None and not b.static and b.kind not in ("function", "module"):
                    why = {"hole": "a hole generated during the run", "sample": "sampled during the run",
                           "loop": "a loop variable", "let": "computed during the run"}.get(b.kind, b.kind)
                    self.error(node.span, f"{what} must be known before the run, but '{node.id}' is {why}",
                               "use literals, inputs, or lets of those (outside if/for)")
                    return False
            if isinstance(node, A.Call):
                f = node.func
                if isinstance(f, A.Attribute) or (isinstance(f, A.Name) and (
                        f.id in ("tokens", "logprob", "logprob_of") or f.id in self.functions)):
                    self.error(node.span, f"{what} must be known before the run; this call runs during the run",
                               "use literals, inputs, or lets of those (outside if/for)")
                    return False
        return True

    def fold(self, e: A.Expr, env: Env, report: bool = True) -> Any:
        """The value of ``e`` if the checker can compute it now (literals and known lets), else UNKNOWN."""
        try:
            return static_value(e, _KnownValues(env))
        except NotStatic:
            return UNKNOWN
        except StaticError as exc:
            if report:
                self.error(e.span, f"cannot evaluate this: {exc}")
            return UNKNOWN

    def host_regex(self, e: A.Expr, env: Env) -> None:
        """Validate the regex of a ``matches`` in an expression: it is matched with the constraint compiler's
        byte DFA (never a backtracking engine), so it is a constraint regex, within the automaton bounds."""
        pattern = self.fold(e, env, report=False)
        if isinstance(pattern, str):
            problem = regex_problem(pattern)
            if problem:
                message, pos, help = problem
                self.error(regex_span(self, e, pos), message, help)

    # ---------------------------------------------------------------------------------------------- returns

    def returns(self, env: Env) -> tuple[tuple[str, A.Expr], ...]:
        """(key, expression) pairs each sample reports: the return statement, else every hole."""
        s = self.return_stmt
        if s is None:
            return tuple((name, A.Name(name)) for name, b in env.items() if b.kind == "hole")
        out: list[tuple[str, A.Expr]] = []
        if any(isinstance(v, A.DictExpr) for v in s.values):
            if len(s.values) != 1:
                self.error(s.span, "return either values (return a, b) or one dict (return {\"a\": a})")
                return ()
            d = s.values[0]
            assert isinstance(d, A.DictExpr)
            for k, v in zip(d.keys, d.values):
                if not isinstance(k, A.Str):
                    self.error(k.span, "the keys of a returned dict must be strings",
                               f'write "{k.id}": ...' if isinstance(k, A.Name) else None)
                    continue
                out.append((k.value, v))
        else:
            for v in s.values:
                out.append((v.id if isinstance(v, A.Name) else expr_to_source(v), v))
        seen: set[str] = set()
        for key, v in out:
            if key in seen:
                self.error(v.span, f"'{key}' is returned twice")
            seen.add(key)
        return tuple(out)


# ---------------------------------------------------------------------------------------------- flow merging


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for a message (a 300-character path would swamp it)."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _os_reason(exc: Exception) -> str:
    """Why a file operation failed, without the (possibly huge) file name the OS repeats."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
    return str(exc)


class _KnownValues(Mapping):
    """The values the checker knows, as a read-only view of an environment (a name with an UNKNOWN value is
    absent): folding one expression looks up only the names it uses, instead of copying every binding."""

    def __init__(self, env: Env):
        self.env = env

    def __getitem__(self, name: str) -> Any:
        b = self.env[name]
        if b.value is UNKNOWN:
            raise KeyError(name)
        return b.value

    def __iter__(self):
        return (k for k, b in self.env.items() if b.value is not UNKNOWN)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:  # truth tests (``env or {}``) must not count the names
        return True


class _Before(Mapping):
    """A statement's environment as it was before the statement bound its holes (a view: ``hidden`` are the
    names the statement is about to add, which were not bound before it)."""

    def __init__(self, env: Env, hidden: frozenset):
        self.env, self.hidden = env, frozenset(n for n in hidden if n not in env)

    def __getitem__(self, name: str) -> Binding:
        if name in self.hidden:
            raise KeyError(name)
        return self.env[name]

    def __iter__(self):
        return (k for k in self.env if k not in self.hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:  # truth tests (``env or {}``) must not count the names
        return True


def _hole_names(parts) -> frozenset:
    """The names of the holes of a template."""
    return frozenset(p.name for p in parts if isinstance(p, A.Hole))


def _merge_branches(before: Env, outcomes: list[Env], if_span: Span) -> Env:
    """Environment after an ``if``: names set on every path stay defined; others become maybe-undefined."""
    merged: Env = {}
    names: dict[str, None] = {}
    for env in outcomes:
        names.update(dict.fromkeys(env))
    for name in names:
        present = [env[name] for env in outcomes if name in env]
        first = present[0]
        if len(present) == len(outcomes):
            if all(p is before.get(name) for p in present):
                merged[name] = before[name]
                continue
            types = {p.type for p in present}
            maybe = next((p.maybe for p in present if p.maybe is not None), None)
            merged[name] = replace(first, type=types.pop() if len(types) == 1 else "any", static=False,
                                   value=UNKNOWN, maybe=maybe)
        else:
            merged[name] = replace(first, static=False, value=UNKNOWN, maybe=first.maybe or if_span)
    return merged


def _merge_loop(before: Env, after: Env, var: str) -> Env:
    """Environment after a ``for``: new holes/samples become lists; loop-local lets and the variable go away."""
    merged: Env = {}
    for name, b in after.items():
        old = before.get(name)
        if old is not None:
            merged[name] = old if b is old else replace(b, static=False, value=UNKNOWN,
                                                        type=b.type if b.type == old.type else "any")
        elif b.kind in ("hole", "sample"):
            merged[name] = replace(b, type="list", static=False, value=UNKNOWN, maybe=None)
    return merged


# ---------------------------------------------------------------------------------------------------- helpers


def _is_logprob_of(f: A.Expr) -> bool:
    """Whether a call's function is ``logprob_of`` or ``M.logprob_of``."""
    return (isinstance(f, A.Name) and f.id == "logprob_of") or (isinstance(f, A.Attribute) and f.attr == "logprob_of")


def _nested_statements(body: tuple[A.Stmt, ...]):
    """Statements inside if/for blocks (not the top level)."""
    stack: list[A.Stmt] = []
    for stmt in body:
        stack.extend(_blocks_of(stmt))
    while stack:
        stmt = stack.pop()
        yield stmt
        stack.extend(_blocks_of(stmt))


def _blocks_of(stmt: A.Stmt) -> list[A.Stmt]:
    if isinstance(stmt, A.If):
        out = [s for b in stmt.branches for s in b.body]
        return out + list(stmt.orelse or ())
    if isinstance(stmt, A.For):
        return list(stmt.body)
    return []


def _all_bindings(module: A.Module) -> dict[str, Span]:
    """Every name the program binds anywhere, with its first binding's span (for better messages)."""
    out: dict[str, Span] = {}
    for node in A.walk(module):
        if isinstance(node, (A.InputStmt, A.Let, A.SampleStmt, A.Gen, A.For, A.ImportStmt, A.ModelDecl)):
            name = node.alias if isinstance(node, (A.ImportStmt, A.ModelDecl)) else (
                node.var if isinstance(node, A.For) else node.name)
            out.setdefault(name, node.name_span)
        elif isinstance(node, A.Hole):
            out.setdefault(node.name, node.span)
    return out


def _module_names(tree: pyast.Module) -> Optional[frozenset[str]]:
    """Top-level names a Python file defines, or None when it may define names dynamically."""
    names: set[str] = set()
    stack: list[pyast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (pyast.FunctionDef, pyast.AsyncFunctionDef, pyast.ClassDef)):
            if node.name == "__getattr__":
                return None
            names.add(node.name)
        elif isinstance(node, (pyast.Assign, pyast.AnnAssign, pyast.AugAssign)):
            targets = node.targets if isinstance(node, pyast.Assign) else [node.target]
            for t in targets:
                for sub in pyast.walk(t):
                    if isinstance(sub, pyast.Name):
                        names.add(sub.id)
        elif isinstance(node, (pyast.Import, pyast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    return None
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (pyast.If, pyast.Try, pyast.With, pyast.For, pyast.While)):
            for attr in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, attr, []) or []:
                    if isinstance(child, pyast.ExceptHandler):
                        stack.extend(child.body)
                    else:
                        stack.append(child)
    return frozenset(names)


def _type_of_value(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    for t in (int, float, str, list, dict):
        if isinstance(value, t):
            return t.__name__
    return "any"


def _value_fits(typ: str, value: Any) -> bool:
    actual = _type_of_value(value)
    return actual == typ or (typ == "float" and actual == "int")


def _a(typ: str) -> str:
    words = {"str": "a string", "int": "an integer", "float": "a float", "bool": "a boolean", "list": "a list",
             "dict": "a dict", "any": "a value", "module": "a module", "function": "a function"}
    return words.get(typ, typ)


def _one_of_types(types: tuple[str, ...]) -> str:
    return " or ".join(_a(t) for t in types)


_BUILTIN_ARG_TYPES: dict[str, tuple[tuple[str, ...], ...]] = {
    "len": (("str", "list", "dict"),),
    "tokens": (("str",),), "words": (("str",),), "lower": (("str",),), "upper": (("str",),),
    "strip": (("str",), ("str",)), "split": (("str",), ("str",)), "join": (("list",), ("str",)),
    "contains": (("str", "list", "dict"), ()), "startswith": (("str",), ("str",)),
    "endswith": (("str",), ("str",)), "count": (("str", "list"), ()),
    "abs": (NUMERIC,), "log": (NUMERIC, NUMERIC), "exp": (NUMERIC,),
    "int": (("str", "int", "float", "bool"),), "float": (("str", "int", "float", "bool"),),
}


def _binop_type(op: str, lt: str, rt: str) -> Optional[str]:
    """Result type of ``lt op rt``; None when the operation is certainly invalid; 'any' when unknown."""
    if "any" in (lt, rt):
        if op == "%" and lt == "str":
            return None
        return "any"
    if lt in NUMERIC and rt in NUMERIC:
        if op == "/":
            return "float"
        if op == "**":
            return "float" if "float" in (lt, rt) else "any"
        return "float" if "float" in (lt, rt) else "int"
    if op == "+" and lt == rt and lt in ("str", "list"):
        return lt
    if op == "*" and {lt, rt} in ({"str", "int"}, {"list", "int"}, {"str", "bool"}, {"list", "bool"}):
        return "str" if "str" in (lt, rt) else "list"
    return None


def _compare_problem(op: str, lt: str, rt: str) -> Optional[str]:
    if "any" in (lt, rt):
        return None
    if op in ("<", "<=", ">", ">="):
        if (lt in NUMERIC and rt in NUMERIC) or (lt == rt and lt in ("str", "list")):
            return None
        return f"cannot compare {_a(lt)} with {_a(rt)} using '{op}'"
    if op in ("in", "not in"):
        if rt not in ("str", "list", "dict"):
            return f"'{op}' needs a string, a list or a dict on its right, not {_a(rt)}"
        if rt == "str" and lt != "str":
            return f"'{op}' on a string needs a string on its left, not {_a(lt)}"
        return None
    if op == "matches":
        if lt != "str":
            return f"'matches' needs a string on its left, not {_a(lt)}"
        if rt != "str":
            return f"'matches' needs a regex string on its right, not {_a(rt)}"
    return None


# ---------------------------------------------------------------------------------------------------- entry


def check_module(module: A.Module, source: SourceFile, functions: Optional[Mapping[str, Callable]] = None,
                 base_dir: Optional[Path] = None) -> CheckedProgram:
    """Check a parsed program; raises :class:`LmpError` with every problem, else returns what was learnt.

    ``base_dir`` is where relative ``import`` / ``grammar`` / ``json`` paths are looked up (default: the program
    file's folder, or the current directory for sources that are not files).
    """
    if base_dir is None:
        name = source.name
        base_dir = Path(name).resolve().parent if not (name.startswith("<") and name.endswith(">")) else Path.cwd()
    checker = Checker(module, source, functions or {}, base_dir)
    return checker.run()


__all__ = ["Binding", "CheckedProgram", "Checker", "HoleSpec", "ImportSpec", "InputSpec", "ModelSpec", "StrategySpec",
           "check_module"]
