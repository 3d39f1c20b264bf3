"""Lowering: a checked :class:`~lmprog.program.Program` plus input values -> an engine :class:`SegmentProgram`.

The lowering walks the program's statements once, in order, for *all* particles at once:

* template text is merged into runs and tokenized (``Text`` segments; static where it only interpolates
  inputs and static ``let`` s, else rendered per particle at run time);
* each ``[hole]`` / ``gen`` becomes a ``Hole`` segment with its ``where`` constraints compiled by
  :func:`~lmprog.compiler.constraints.compile_hole`; its terminator is the literal run of the template that
  follows it (then that text is generated *by the hole*, so it is not forced again), a ``stop_at`` string,
  a fixed length, or EOS; a space ending the prompt before it moves into the hole
  (:mod:`lmprog.compiler.healing`);
* a chat turn (``system``/``user``/``assistant``) is a template between the header and the tail that the
  model's chat template gives it (:mod:`lmprog.compiler.chat`); a hole that ends an assistant turn is
  terminated by the end-of-turn token, which it generates;
* ``observe`` becomes an ``Observe`` segment; ``let`` / ``condition`` / ``factor`` / ``sample``
  (:mod:`lmprog.compiler.distributions`) and Python predicate constraints (:mod:`lmprog.compiler.predicates`)
  become ``Host`` segments: one batched Python call for all particles at a segment boundary (never per token);
* ``if``/``elif``/``else`` is per particle: a ``Host`` segment records each particle's branch, and every
  segment inside a branch is *guarded* (text rendered empty, holes skipped with start ``-1``, host work
  skipped) for the particles that did not take it;
* ``for`` loops are unrolled (their bound is known before the run); a hole ``[item]`` in iteration ``i`` is
  the engine hole ``item[i]``, and after the loop the name ``item`` is the list of the iterations' values.

Names resolve through *references* (:class:`~lmprog.compiler.runtime_eval.Ref`), evaluated per particle at run
time by :mod:`lmprog.compiler.runtime_eval`. Input values come from :func:`lmprog.compiler.inputs.resolve_inputs`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Optional

import numpy as np

from lmprog.automata.values import ValueRule
from lmprog.compiler import constraint_ir as IR
from lmprog.compiler.constraints import compile_hole
from lmprog.compiler.automaton import stack_holes
from lmprog.compiler.host_hole import stack_compiled
from lmprog.compiler.distributions import bind_params, dist_params, draw
from lmprog.compiler.errors import HostAbort, RunError, error_message, file_span, lowering_error
from lmprog.compiler.healing import heal_space
from lmprog.compiler.predicates import (is_predicate_tree, predicate_atoms, predicate_label, prefix_check,
                                        prefixes_check, value_check)
from lmprog.compiler.runtime_eval import (ParticleContext, Ref, Runtime, active, check_factor, guarded_ref,
                                          short_value, static_ref, to_text)
from lmprog.dsl import ast as A
from lmprog.dsl.constraints import conjuncts
from lmprog.dsl.printer import constraint_to_source
from lmprog.dsl.static import NotStatic, StaticError, static_value

__all__ = ["Lowered", "Lowering", "lower", "structure_key"]


# ------------------------------------------------------------------------------------------------- output


@dataclass
class Lowered:
    """A lowered program: the engine program, how to compute each sample's returned values, and strategy
    callables (``best_of`` score, ``vote`` key).

    ``structure_key``: a hashable value, equal for two lowerings of the same program (with different inputs)
    exactly when their segment programs can run as groups of one engine call (:func:`structure_key`)."""

    program: Any  # SegmentProgram
    returns: Callable[[Any], dict]  # engine Sample -> {key: value}
    display: dict[str, str]  # engine hole name -> name shown to users
    inputs: dict[str, Any]
    evaluate: Callable[[A.Expr, Any], Any]  # (expr, engine Sample) -> value (final scope)
    compile_s: float = 0.0
    structure_key: Hashable = ()
    conversation: Optional[Callable[[list], list]] = None  # engine Samples -> [[{"role", "content"}]] (chat turns)


def structure_key(segments, hole_keys) -> tuple:
    """What must agree for segment programs to run as groups of one engine call: the segment kinds in order;
    for holes their names, budgets (``max_tokens``), value rules, start states (a static start, or that the
    start is per particle), whether they have a ``prefix_check``, and their ``reach`` (buffer sizes); for text
    and observations whether they are static or rendered (their tokens may differ: they are rendered per row);
    and the token table, as the content keys of its compiled holes in order (``hole_keys``: the keys
    :func:`compile_hole` caches them under, which name the constraints, the tokenizer and the compiler
    version), so no device arrays are compared."""
    from lmprog.inference import Hole, Host

    shape = []
    for s in segments:
        if isinstance(s, Hole):
            start = "per particle" if callable(s.start) else int(s.start)
            shape.append(("hole", s.name, s.max_tokens, s.value, start, s.prefix_check is not None, s.reach))
        elif isinstance(s, Host):
            shape.append(("host",))
        else:
            shape.append((type(s).__name__, "rendered" if s.tokens is None else "static"))
    return tuple(shape), tuple(hole_keys)


def _hole_key(compiled) -> str:
    """A compiled hole's content key: the one :func:`~lmprog.compiler.constraints.compile_hole` caches it
    under (its normalised constraints, the tokenizer's fingerprint, the compiler version)."""
    return compiled.plan.key(compiled.tokenizer_fingerprint)


# ------------------------------------------------------------------------------------------------ lowering


def lower(program, tokenizer, inputs: Mapping[str, Any], *, seed: int = 0,
          default_max_tokens: int = 256, heal: bool = True, scorers=None) -> Lowered:
    """Lower ``program`` with the (already resolved) ``inputs`` for ``tokenizer``. ``heal``: move a space that
    ends the prompt before a hole into the hole (see :func:`~lmprog.compiler.healing.heal_space`).
    ``default_max_tokens``: the token budget of a hole without a ``tokens(X)`` bound (the strategy's
    ``max_tokens``); it bounds the text that interpolates such a hole's value. ``scorers``: what ``logprob_of``
    scores with, ``{None: the program's model's, alias: each declared model's}``
    (:class:`lmprog.backends.scoring.Scorer`)."""
    return Lowering(program, tokenizer, dict(inputs), seed, default_max_tokens, heal=heal, scorers=scorers).run()


@dataclass
class _Pending:
    parts: list = field(default_factory=list)  # str or (expr, fmt, scope)
    guard: tuple = ()
    node: Any = None  # the statement of the first part


@dataclass(frozen=True)
class _Start:
    """A hole's start before the table is stacked: its index among the compiled holes, and its guard."""

    index: int
    guard: tuple


def unencodable_message(ch: str) -> str:
    """The message for a character of the prompt that the model's tokenizer would drop."""
    return f"the model's tokenizer cannot encode U+{ord(ch):04X} (it would be dropped)"


def unencodable_help(ch: str) -> str:
    """What to write instead of a character the tokenizer drops."""
    esc = f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"
    return f"remove it, or escape it as visible text (write \\{esc} in a template for the characters {esc})"


def _truth_logw(v) -> float:
    """The log-weight increment of a condition: 0 where true, -inf (the particle dies) where false."""
    return 0.0 if v else -math.inf


class Lowering:
    """The lowering visitor: one walk over a checked program's statements, collecting the engine segments,
    the compiled holes (``compiled``, in table order) and the display names of the engine holes."""

    def __init__(self, program, tokenizer, inputs, seed, default_max_tokens, *, heal: bool = True, scorers=None):
        self.p = program
        self.tokenizer = tokenizer
        self.inputs = inputs
        self.seed = int(seed)
        self.default_max_tokens = int(default_max_tokens)
        self.healing = bool(heal)
        self.runtime = Runtime(program, tokenizer, scorers)
        self.segments: list = []
        self.compiled: list = []  # CompiledHole per engine hole, in order
        self.hole_index: dict[str, int] = {}  # engine hole name -> index into compiled
        self.display: dict[str, str] = {}
        self.pending = _Pending()
        self.counter = 0
        self.compile_s = 0.0
        self.max_hole_tokens = 0
        self.first_node = None  # the AST node that produced the first segment (for the no-BOS diagnostic)
        self._dropped: dict[str, bool] = {}  # character -> whether the tokenizer drops it (unencodable)
        self.last_terminator = None  # the terminator of the hole lowered last
        self.conversation = None  # the chat turns so far (lmprog.compiler.chat.Conversation), once there is one
        self.turns: list = []  # (role, [("text", s) | ("expr", expr, fmt, scope) | ("hole", engine name)])

    # ---- helpers --------------------------------------------------------------------------------------

    def error(self, span, message, help=None):
        return lowering_error(self.p, span, message, help)

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"__{prefix}{self.counter}"

    def label(self, node) -> str:
        span = node.span
        text = ""
        if span is not None and span.line > 0:
            lines = self.p.source.split("\n")
            if span.line == span.end_line:  # the node's own text
                text = lines[span.line - 1][span.col - 1:span.end_col - 1]
            else:
                text = lines[span.line - 1][span.col - 1:] + " ..."
        return f"{span}: {text.strip()}" if text else str(span)

    def encode(self, text: str, first: bool = False) -> list[int]:
        """Token ids of ``text`` (BOS only at the very start of the program, if the model asks for it)."""
        ids = self.tokenizer.encode(text, add_bos=False)
        if first and getattr(self.tokenizer, "add_bos", False) and self.tokenizer.bos_id is not None:
            ids = [int(self.tokenizer.bos_id), *ids]
        return ids

    def unencodable(self, text: str) -> Optional[str]:
        """The first character of ``text`` that the model's tokenizer drops (its encoding loses it without
        a trace: a byte-level vocabulary without that byte, e.g. U+0004 in SmolLM2's), or None. A character
        the tokenizer replaces by an unknown/special token is not reported, and neither are the changes a
        tokenizer makes legitimately (a SentencePiece space prefix, special-token markup)."""
        tok = self.tokenizer
        if not text or not hasattr(tok, "decode_bytes"):
            return None
        got = tok.decode_bytes(tok.encode(text, add_bos=False))
        data = text.encode("utf-8", "surrogatepass")
        if got == data or (got.endswith(data) and not got[:len(got) - len(data)].strip()):
            return None
        for ch in dict.fromkeys(text):
            dropped = self._dropped.get(ch)
            if dropped is None:
                ids = tok.encode(ch, add_bos=False)
                dropped = (ch.encode("utf-8", "surrogatepass") not in tok.decode_bytes(ids)
                           and not any(int(i) in tok.special_ids for i in ids))
                self._dropped[ch] = dropped
            if dropped:
                return ch
        return None

    def check_encodable(self, text: str, span) -> None:
        """Raise a :class:`LoweringError` at ``span`` if the tokenizer would silently drop a character of
        ``text`` (the model would never see it)."""
        ch = self.unencodable(text)
        if ch is not None:
            raise self.error(span, unencodable_message(ch), unencodable_help(ch))

    def static(self, expr, scope) -> Any:
        """The value of ``expr`` if it only depends on static references (raises NotStatic otherwise)."""
        env = {}
        for name, ref in scope.items():
            if ref.kind == "static":
                env[name] = ref.value
        return static_value(expr, env)

    def is_static(self, expr, scope) -> bool:
        try:
            self.static(expr, scope)
            return True
        except (NotStatic, StaticError):
            return False

    # ---- driver ---------------------------------------------------------------------------------------

    def run(self) -> Lowered:
        from lmprog.inference import SegmentProgram

        scope: dict[str, Ref] = {name: static_ref(v) for name, v in self.inputs.items()}
        scope = self.block(self.p.ast.body, scope, (), ())
        self.flush()
        self.check_starts_with_text()
        if not self.compiled:  # the engine needs a token table: a trivial one
            table, hole_keys = self._empty_table()
        else:
            table, starts = stack_compiled(self.compiled, self.tokenizer)
            self.segments = [self._fix_start(s, starts) for s in self.segments]
            hole_keys = [_hole_key(c) for c in self.compiled]
        prog = SegmentProgram(self.segments, table)
        final_scope = dict(scope)
        returns = self.p.returns
        runtime = self.runtime

        def evaluate(expr, sample):
            ctx = ParticleContext(sample.values, sample.data, getattr(sample, "hole_logprobs", None))
            return runtime.evaluate(expr, final_scope, ctx)

        def ret(sample):
            return {key: _jsonable(evaluate(expr, sample)) for key, expr in returns}

        return Lowered(prog, ret, dict(self.display), dict(self.inputs), evaluate, self.compile_s,
                       structure_key(prog.segments, hole_keys), self._conversation())

    def _conversation(self):
        """The function giving samples' chat messages (a list per sample: role and content, holes and
        interpolations filled in), or None for a program without turns. The turns' ``logprob_of`` are scored
        for all the samples at once (the run scored them already: the scorer remembers them)."""
        if not self.turns:
            return None
        turns, runtime = list(self.turns), self.runtime

        scored = [(piece[1], piece[3]) for _, pieces in turns for piece in pieces
                  if piece[0] not in ("text", "hole")]

        def messages(sample, ctx):
            out = []
            for role, pieces in turns:
                text = []
                for piece in pieces:
                    if piece[0] == "text":
                        text.append(piece[1])
                    elif piece[0] == "hole":
                        text.append(str(sample.values.get(piece[1], "")))
                    else:
                        _, expr, fmt, sc = piece
                        try:
                            v = runtime.evaluate(expr, sc, ctx)
                            text.append(format(v, fmt) if fmt else to_text(v))
                        except Exception:  # noqa: BLE001 - display only (the run rendered it already)
                            text.append("?")
                out.append({"role": role, "content": "".join(text)})
            return out

        def conversations(samples):
            samples = list(samples)
            contexts = [ParticleContext(s.values, s.data, getattr(s, "hole_logprobs", None)) for s in samples]
            try:
                runtime.prefetch_contexts(scored, contexts)  # a no-op without logprob_of in the turns
            except Exception:  # noqa: BLE001 - display only: an interpolation it could not score shows "?"
                pass
            return [messages(s, ctx) for s, ctx in zip(samples, contexts)]

        return conversations

    def check_starts_with_text(self):
        """On a model without a BOS token the engine conditions on the program's leading static prompt text,
        so there must be some: report the first statement that comes before any, located."""
        from lmprog.inference import Text

        if self.tokenizer.bos_id is not None:
            return
        first = self.segments[0] if self.segments else None
        if isinstance(first, Text) and first.tokens:
            return
        node = self.first_node
        if node is None:
            body = [s for s in self.p.ast.body
                    if not isinstance(s, (A.ModelStmt, A.ModelDecl, A.InferStmt, A.InputStmt, A.ImportStmt))]
            node = body[0] if body else None
        what = _describe_start(node, first)
        span = node.span if node is not None else file_span(self.p)
        raise self.error(
            span, f"the program starts with {what}, but the model has no BOS token to condition on: "
                  "it must start with prompt text",
            "put prompt text before it (a template string such as \"Q: \" as the first statement); "
            "the prompt must be known before the run (no holes, samples or Python values in it)")

    def _empty_table(self):
        """A trivial token table (and its content keys) for a program without holes."""
        hole = compile_hole([IR.Choices(("x",))], self.tokenizer, name="__none")
        table, _ = stack_holes([hole])
        return table, [_hole_key(hole)]

    def _fix_start(self, seg, starts):
        from lmprog.inference import Hole

        if isinstance(seg, Hole) and isinstance(seg.start, _Start):
            st = seg.start
            start = int(starts[st.index])
            if not st.guard:
                return dataclasses.replace(seg, start=start)
            guard = st.guard
            return dataclasses.replace(
                seg, start=lambda view: np.where(active(guard, view), start, -1).astype(np.int32))
        return seg

    def block(self, body, scope, guard, loop_index) -> dict:
        for s in body:
            scope = self.stmt(s, scope, guard, loop_index)
        return scope

    def stmt(self, s, scope, guard, loop_index) -> dict:
        if isinstance(s, (A.ModelStmt, A.ModelDecl, A.InferStmt, A.InputStmt, A.ImportStmt, A.Return)):
            return scope
        method = getattr(self, "s_" + type(s).__name__)
        if not self.pending.parts:
            self.pending.node = s
        was_empty = not self.segments
        out = method(s, scope, guard, loop_index)
        if was_empty and self.segments and self.first_node is None:
            self.first_node = s
        return out

    # ---- text -----------------------------------------------------------------------------------------

    def add_text(self, part, guard):
        if self.pending.parts and self.pending.guard != guard:
            self.flush()
        self.pending.guard = guard
        self.pending.parts.append(part)

    def flush(self):
        from lmprog.inference import Text

        parts, guard, node = self.pending.parts, self.pending.guard, self.pending.node
        self.pending = _Pending()
        if not parts:
            return
        seg = self.forced(Text, parts, guard, "text")
        if seg is not None:
            if not self.segments and self.first_node is None:
                self.first_node = node
            self.segments.append(seg)

    def forced(self, cls, parts, guard, what, label=""):
        """A Text/Observe segment for ``parts`` (strings and ``(expr, fmt, scope)`` interpolations)."""
        if all(isinstance(p, str) for p in parts):
            text = "".join(parts)
            if not text:
                return None
            ids = self.encode(text, first=not self.segments and not guard)
            if not guard:
                return cls(tokens=tuple(ids), label=label)
            return cls(render=lambda view: [list(ids) if a else [] for a in active(guard, view)],
                       max_tokens=len(ids), label=label)
        static_len = len(self.encode("".join(p for p in parts if isinstance(p, str))))
        n_dyn = sum(1 for p in parts if not isinstance(p, str))
        bound = static_len + n_dyn * (2 * max(self.max_hole_tokens, 32) + 32)
        runtime = self.runtime

        def render(view):
            act = active(guard, view)
            runtime.prefetch([(p[0], p[2]) for p in parts if not isinstance(p, str)], view, np.flatnonzero(act))
            out = []
            for i in range(len(view)):
                if not act[i]:
                    out.append([])
                    continue
                pieces = []
                for p in parts:
                    if isinstance(p, str):
                        pieces.append(p)
                    else:
                        expr, fmt, sc = p
                        try:
                            v = runtime.eval_for(expr, sc, view, i)
                            piece = format(v, fmt or "") if fmt else to_text(v)
                        except Exception as exc:
                            raise RunError(f"{expr.span}: cannot interpolate: {error_message(exc)}") from None
                        ch = self.unencodable(piece)
                        if ch is not None:
                            raise RunError(f"{expr.span}: cannot interpolate {short_value(piece)}: "
                                           f"{unencodable_message(ch)}")
                        pieces.append(piece)
                ids = self.encode("".join(pieces))
                if len(ids) > bound:
                    ids = ids[:bound]
                out.append(list(ids))
            return out

        return cls(render=render, max_tokens=bound, label=label)

    def template_parts(self, parts, scope, guard, holes_ok: bool):
        """Yield ('text', part) and ('hole', name, following_text) items, folding static interpolations."""
        out = []
        for k, part in enumerate(parts):
            if isinstance(part, A.Text):
                self.check_encodable(part.value, part.span)
                out.append(("text", part.value))
            elif isinstance(part, A.Interp):
                try:
                    v = self.static(part.expr, scope)
                    text = format(v, part.fmt) if part.fmt else to_text(v)
                except (NotStatic, StaticError):
                    out.append(("dyn", (part.expr, part.fmt, dict(scope))))
                else:
                    self.check_encodable(text, part.span)
                    out.append(("text", text))
            elif isinstance(part, A.Hole):
                following = []
                for q in parts[k + 1:]:
                    if isinstance(q, A.Text):
                        following.append(q.value)
                    else:
                        break
                out.append(("hole", part, "".join(following)))
        return out

    # ---- statements -----------------------------------------------------------------------------------

    def s_Template(self, s: A.Template, scope, guard, loop_index):
        def on_hole(k, hole, following, scope):
            scope, consumed = self.hole(hole.name, hole, s.where, following, scope, guard, loop_index)
            return scope, len(following) if consumed else 0

        return self.emit_parts(self.template_parts(s.parts, scope, guard, True), scope, guard, on_hole)

    def emit_parts(self, items, scope, guard, on_hole, pieces=None):
        """Emit a template's items in order: text (less the characters the hole before it consumed as its
        terminator), interpolations, and holes through ``on_hole(k, hole, following, scope) -> (scope,
        consumed characters)``. ``pieces`` (a chat turn's) collects the text and interpolations."""
        skip = 0
        for k, item in enumerate(items):
            if item[0] == "text":
                if pieces is not None:
                    pieces.append(item)
                text = item[1]
                if skip:
                    cut = min(skip, len(text))
                    text, skip = text[cut:], skip - cut
                if text:
                    self.add_text(text, guard)
            elif item[0] == "dyn":
                if pieces is not None:
                    pieces.append(("expr", *item[1]))
                skip = 0
                self.add_text(item[1], guard)
            else:
                _, hole, following = item
                scope, skip = on_hole(k, hole, following, scope)
        return scope

    def s_Turn(self, s: A.Turn, scope, guard, loop_index):
        """A chat turn: the chat template's header, the content (a template), its tail (see
        :mod:`lmprog.compiler.chat`). A hole that ends an assistant turn is terminated by the end-of-turn
        token (or by the tail's text when that is not a special token), which it then generates."""
        from lmprog.compiler.chat import ChatError, Conversation

        if self.conversation is None:
            self.conversation = Conversation(self.tokenizer)
        try:
            turn = self.conversation.turn(s.role)
        except ChatError as exc:
            raise self.error(s.role_span if s.role_span.line else s.span, exc.message, exc.help) from None
        if turn.header:
            self.check_encodable(turn.header, s.role_span)
            self.add_text(turn.header, guard)
        items = self.template_parts(s.parts, scope, guard, True)
        tail = turn.tail
        pieces: list = []
        self.turns.append((s.role, pieces))

        def on_hole(k, hole, following, scope):
            nonlocal tail
            ends_turn = k == len(items) - 1
            end_token = turn.end_token if ends_turn and s.role == "assistant" else None
            if ends_turn and end_token is None:
                following = tail  # the turn's literal end terminates the hole
            scope, consumed = self.hole(hole.name, hole, s.where, following, scope, guard, loop_index,
                                        end_token=end_token)
            pieces.append(("hole", scope[hole.name].value))
            skip = len(following) if consumed else 0
            if ends_turn:
                ended = end_token is not None and self.last_terminator.kind == "eos"
                tail = tail[len(turn.end_text):] if ended else tail[skip:]
            return scope, skip

        scope = self.emit_parts(items, scope, guard, on_hole, pieces)
        if tail:
            self.add_text(tail, guard)
        return scope

    def s_Gen(self, s: A.Gen, scope, guard, loop_index):
        scope, _ = self.hole(s.name, s, s.where, "", scope, guard, loop_index)
        return scope

    def hole(self, name, node, where, following, scope, guard, loop_index, end_token=None):
        """Lower one hole. ``end_token``: the hole ends an assistant turn and is terminated by that token (the
        end-of-turn token, generated by the hole) instead of EOS or following text."""
        from lmprog.inference import Hole

        end_tokens = () if end_token is None else (int(end_token),)
        if end_tokens:
            following = ""

        mine = [c for c in conjuncts(where) if _constraint_hole(c) == name]
        ir, preds = [], []
        for c in mine:
            if is_predicate_tree(c):
                preds.append(c)
                continue
            try:
                conv = self.to_ir(c, scope)
            except (NotStatic, StaticError) as exc:
                raise self.error(c.span, "this constraint's arguments must be known before the run "
                                         f"({error_message(exc)})",
                                 "use literals, inputs or lets of those") from None
            ir.append(conv)
        engine_name = name + "".join(f"[{i}]" for i in loop_index)
        if engine_name in self.hole_index:
            k = 2
            while f"{engine_name}#{k}" in self.hole_index:
                k += 1
            engine_name = f"{engine_name}#{k}"
        rule = None  # ValueRule of the hole: the compiled hole's, with the healed space as its head
        pending = self.pending
        healed = heal_space(ir, pending.parts if self.healing and pending.guard == guard else [], following,
                            program_start_without_bos=not self.segments and not guard and
                            self.tokenizer.bos_id is None)
        compiled = None
        if healed is not None:
            try:
                compiled = compile_hole(healed, self.tokenizer, following_text=following or None, name=name,
                                        loc=node.span, end_tokens=end_tokens)
                ir, rule = healed, ValueRule(head=1, stop=compiled.value_rule.stop)
                pending.parts[-1] = pending.parts[-1][:-1]  # the space moves into the hole
            except IR.ConstraintError:  # e.g. a token bound the extra space no longer fits: keep the space
                pass
        try:
            if compiled is None:
                compiled = compile_hole(ir, self.tokenizer, following_text=following or None, name=name,
                                        loc=node.span, end_tokens=end_tokens)
        except IR.ConstraintError as exc:
            msg = str(exc)
            prefix = f"{exc.loc}: " if exc.loc is not None else ""
            if prefix and msg.startswith(prefix):
                msg = msg[len(prefix):]
            raise self.error(exc.loc if hasattr(exc.loc, "line") else node.span, msg) from None
        rule = rule or compiled.value_rule
        self.compile_s += compiled.compile_s
        index = len(self.compiled)
        self.compiled.append(compiled)
        self.hole_index[engine_name] = index
        self.display[engine_name] = engine_name.split("#")[0]
        term = self.last_terminator = compiled.terminator
        consumed = bool(following) and term.kind == "text" and term.text == following and \
            not any(isinstance(c, IR.StopAt) for c in ir)
        budget = None
        for c in ir:
            if isinstance(c, IR.Count) and c.kind == "tokens" and c.op in ("<=", "<", "=="):
                n = c.n - 1 if c.op == "<" else c.n
                budget = n if budget is None else min(budget, n)
        self.max_hole_tokens = max(self.max_hole_tokens, budget or self.default_max_tokens)
        where_text = " and ".join(constraint_to_source(c) for c in mine)
        label = f"{node.span}: hole '{engine_name}'" + (f" where {where_text}" if where_text else "")
        self.flush()  # the prompt text before the hole (after healing took its trailing space)
        prefix_trees = [c for c in preds if any(a.prefix for a in predicate_atoms(c))]
        check = None
        if prefix_trees:
            check = prefix_check(self.runtime, self.tokenizer, prefix_trees, dict(scope), guard, engine_name,
                                 rule, label)
        if not self.segments and self.first_node is None:
            self.first_node = node
        self.segments.append(Hole(engine_name, _Start(index, guard), budget, rule, label, check,
                                  reach=compiled.reach, path=getattr(compiled, "path", "device")))
        scope = dict(scope)
        # a json() hole's value is the parsed JSON value (its text is what the hole generated)
        scope[name] = Ref("json" if any(isinstance(c, IR.JsonSchema) for c in ir) else "hole", engine_name)
        for c in preds:
            if not any(a.prefix for a in predicate_atoms(c)):  # on the complete value, after the hole
                self.host(_truth_logw, None, scope, guard, predicate_label([c]),
                          compute=value_check(self.runtime, c))
        if prefix_trees:  # every prefix of the complete value not yet accepted, after the hole
            self.host(_truth_logw, None, scope, guard, predicate_label(prefix_trees),
                      compute=prefixes_check(self.runtime, prefix_trees, engine_name))
        return scope, consumed

    def to_ir(self, c, scope):
        """The IR of an AST constraint (its arguments folded with the static references of ``scope``)."""
        st = lambda e: self.static(e, scope)  # noqa: E731
        loc = c.span
        if isinstance(c, A.Matches):
            return IR.Regex(st(c.pattern), loc=loc)
        if isinstance(c, A.InChoices):
            return IR.Choices(tuple(str(x) for x in st(c.choices)), loc=loc)
        if isinstance(c, A.StopAt):
            return IR.StopAt(st(c.text), c.keep, loc=loc)
        if isinstance(c, A.CountBound):
            return IR.Count(c.kind, c.op, int(st(c.n)), loc=loc)
        if isinstance(c, A.IsInt):
            return IR.IsInt(loc=loc)
        if isinstance(c, A.IsFloat):
            return IR.IsFloat(loc=loc)
        if isinstance(c, A.Contains):
            return IR.Contains(st(c.text), loc=loc)
        if isinstance(c, A.StartsWith):
            return IR.StartsWith(st(c.text), loc=loc)
        if isinstance(c, A.EndsWith):
            return IR.EndsWith(st(c.text), loc=loc)
        if isinstance(c, (A.GrammarC, A.JsonC)):
            return structured_ir(self.p, c, st, loc, self.error)
        if isinstance(c, A.PyPredicate) or (isinstance(c, (A.Not, A.And, A.Or)) and predicate_atoms(c)):
            raise self.error(c.span, "a Python predicate cannot be combined with other kinds of constraints "
                                     "under `or`/`not`",
                             "combine predicates with predicates (checked on the host), and the other "
                             "constraints with each other")
        if isinstance(c, A.Not):
            return IR.Not(self.to_ir(c.operand, scope), loc=loc)
        if isinstance(c, (A.And, A.Or)):
            items = [self.to_ir(x, scope) for x in c.operands]
            return (IR.And if isinstance(c, A.And) else IR.Or)(tuple(items), loc=loc)
        raise self.error(c.span, f"unsupported constraint {type(c).__name__}")

    def host(self, to_logw, expr, scope, guard, label, store: Optional[str] = None, compute=None):
        """A Host segment evaluating ``expr`` (or ``compute(view, i, scope)``) for every active particle;
        ``to_logw(value)`` -> log-weight increment; ``store``: data key to write the value to. An error kills
        that particle; an error for every active particle is a :class:`RunError`."""
        from lmprog.inference import Host

        self.flush()
        scope = dict(scope)
        runtime = self.runtime

        def fn(view):
            act = active(guard, view)
            inc = np.zeros(len(view), np.float64)
            errors = []
            if compute is None:  # logprob_of in the expression: scored for every active particle at once
                runtime.prefetch([(expr, scope)], view, np.flatnonzero(act))
            for i in np.flatnonzero(act):
                try:
                    v = runtime.eval_for(expr, scope, view, i) if compute is None else compute(view, i, scope)
                except Exception as exc:
                    errors.append(exc)
                    inc[i] = -math.inf
                    continue
                if store is not None:
                    view.data[i][store] = v
                if to_logw is not None:
                    inc[i] = to_logw(v)
            if errors and len(errors) == int(act.sum()):
                raise RunError(f"{label}: failed for every particle: {error_message(errors[0])}")
            return inc

        self.segments.append(Host(fn, label))

    def s_Observe(self, s: A.Observe, scope, guard, loop_index):
        from lmprog.inference import Observe

        self.flush()
        parts = [p[1] for p in self.template_parts(s.parts, scope, guard, False)]
        seg = self.forced(Observe, parts, guard, "observe", self.label(s))
        if seg is not None:
            self.segments.append(seg)
        return scope

    def s_Let(self, s: A.Let, scope, guard, loop_index):
        scope = dict(scope)
        if not guard and self.is_static(s.value, scope):
            scope[s.name] = static_ref(self.static(s.value, scope))
            return scope
        key = self.fresh(f"let_{s.name}_")
        previous = scope.get(s.name)
        self.host(None, s.value, scope, guard, self.label(s), store=key)
        if guard and previous is not None:
            # particles outside the branch keep the old value
            scope[s.name] = guarded_ref(guard, Ref("data", key), previous)
        else:
            scope[s.name] = Ref("data", key)
        return scope

    def s_Condition(self, s: A.Condition, scope, guard, loop_index):
        self.host(_truth_logw, s.test, scope, guard, self.label(s))
        return scope

    def s_Factor(self, s: A.Factor, scope, guard, loop_index):
        runtime = self.runtime

        def logw(v):
            # a number, finite or -inf; anything else (NaN, +inf, a bool, a string) stops the run, located
            problem = check_factor(v)
            if problem is not None:
                raise HostAbort(runtime.factor_error(s.value, problem))
            return float(v)

        self.host(logw, s.value, scope, guard, self.label(s))
        return scope

    def s_SampleStmt(self, s: A.SampleStmt, scope, guard, loop_index):
        from lmprog.inference import Host

        self.flush()
        key = self.fresh(f"sample_{s.name}_")
        sc = dict(scope)
        seg_no = len(self.segments)
        label = self.label(s)
        dist_name = s.dist
        params = dist_params(dist_name)
        runtime, seed = self.runtime, self.seed

        def fn(view):
            act = active(guard, view)
            idx = np.flatnonzero(act)
            if idx.size == 0:
                return None
            runtime.prefetch([(a, sc) for a in s.args] + [(k.value, sc) for k in s.kwargs], view, idx)
            args = []
            for i in idx:
                try:
                    pos = [runtime.eval_for(a, sc, view, i) for a in s.args]
                    kw = {k.name: runtime.eval_for(k.value, sc, view, i) for k in s.kwargs}
                except Exception as exc:
                    raise RunError(f"{label}: {error_message(exc)}") from None
                args.append(bind_params(params, pos, kw))
            values = draw(dist_name, args, seed, seg_no, view)
            for i, v in zip(idx, values):
                view.data[i][key] = v
            return None

        self.segments.append(Host(fn, label))
        scope = dict(scope)
        scope[s.name] = Ref("data", key)
        return scope

    def s_If(self, s: A.If, scope, guard, loop_index):
        from lmprog.inference import Host

        self.flush()
        key = self.fresh("if")
        tests = [b.test for b in s.branches]
        sc = dict(scope)
        label = self.label(s.branches[0]).split("\n")[0]
        runtime = self.runtime

        def choose(view):
            act = active(guard, view)
            inc = np.zeros(len(view))
            errors = 0
            runtime.prefetch([(t, sc) for t in tests], view, np.flatnonzero(act))
            for i in np.flatnonzero(act):
                chosen = len(tests)
                try:
                    for k, t in enumerate(tests):
                        if runtime.eval_for(t, sc, view, i):
                            chosen = k
                            break
                except Exception as exc:
                    errors += 1
                    inc[i] = -math.inf
                    last = exc
                    continue
                view.data[i][key] = chosen
            if errors and errors == int(act.sum()):
                raise RunError(f"{label}: the condition failed for every particle: {error_message(last)}")
            return inc

        self.segments.append(Host(choose, label))
        outcomes = []
        bodies = [b.body for b in s.branches] + [s.orelse or ()]
        for k, body in enumerate(bodies):
            out = self.block(body, dict(scope), guard + ((key, k),), loop_index)
            self.flush()
            outcomes.append(out)
        merged = dict(scope)
        names = set().union(*[set(o) for o in outcomes])
        for name in names:
            refs = [o.get(name) for o in outcomes]
            if all(r == refs[0] for r in refs) and refs[0] is not None:
                merged[name] = refs[0]
            else:
                merged[name] = Ref("branch", (key, {k: r for k, r in enumerate(refs) if r is not None},
                                             scope.get(name)))
        return merged

    def s_For(self, s: A.For, scope, guard, loop_index):
        try:
            if s.is_range:
                args = [self.static(a, scope) for a in s.iter.args]
                items = list(range(*args))
            else:
                items = list(self.static(s.iter, scope))
        except (NotStatic, StaticError) as exc:
            raise self.error(s.iter.span, "the loop's iterable must be known before the run "
                                          f"({error_message(exc)})") from None
        indexed = _indexed_names(s.body)
        per_iter: dict[str, list] = {n: [] for n in indexed}
        current = dict(scope)
        for i, item in enumerate(items):
            current = dict(current)
            current[s.var] = static_ref(item)
            current = self.block(s.body, current, guard, loop_index + (i,))
            for n in indexed:
                per_iter[n].append(current.get(n, static_ref(None)))
        out = dict(current)
        out.pop(s.var, None)
        if s.var in scope:
            out[s.var] = scope[s.var]
        for n in indexed:
            out[n] = Ref("list", tuple(per_iter[n]))
        return out


def _constraint_hole(c) -> Optional[str]:
    """The hole a constraint names (the first one, for a tree)."""
    h = getattr(c, "hole", None)
    if isinstance(h, A.Name):
        return h.id
    for attr in ("operand",):
        if hasattr(c, attr):
            return _constraint_hole(getattr(c, attr))
    for x in getattr(c, "operands", ()):
        name = _constraint_hole(x)
        if name is not None:
            return name
    return None


def _describe_start(node, seg) -> str:
    """What comes first in a program, for the no-BOS diagnostic."""
    from lmprog.inference import Hole, Observe, Text

    if node is None:
        return "no prompt text"
    if isinstance(seg, Hole) or isinstance(node, (A.Hole, A.Gen)):
        return "a hole"
    if isinstance(seg, Observe):
        return "observed text (`observe` scores text given what comes before it)"
    if isinstance(seg, Text):
        return "text computed during the run"
    words = {A.Let: "`let`", A.SampleStmt: "`sample`", A.Condition: "`condition`", A.Factor: "`factor`",
             A.If: "`if`", A.For: "`for`"}
    return f"host work ({words.get(type(node), type(node).__name__)})"


def _indexed_names(body) -> list[str]:
    """Holes and samples defined inside a loop body (their names become lists after the loop)."""
    out: list[str] = []

    def visit(stmts):
        for s in stmts:
            if isinstance(s, A.Template):
                out.extend(p.name for p in s.parts if isinstance(p, A.Hole))
            elif isinstance(s, A.Gen):
                out.append(s.name)
            elif isinstance(s, A.SampleStmt):
                out.append(s.name)
            elif isinstance(s, A.If):
                for b in s.branches:
                    visit(b.body)
                visit(s.orelse or ())
            elif isinstance(s, A.For):
                visit(s.body)

    visit(body)
    return list(dict.fromkeys(out))


def _jsonable(v):
    """A returned value as JSON sees it (NumPy scalars as Python numbers, tuples as lists, other objects as
    their ``str``)."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)


def structured_ir(program, c, st, loc, error):
    """The IR of ``grammar(X, "f.lark")`` / ``json(X, schema="f.json")``: the file (relative to the program's
    folder) is read here, so its text is part of the constraint (and of the compiled hole's cache key)."""
    import os
    from pathlib import Path

    from lmprog.compiler.structured import resolve_path
    from lmprog.dsl.source import normalize_source

    path_expr = c.path if isinstance(c, A.GrammarC) else c.schema
    if path_expr is None:
        return IR.JsonSchema("", loc=loc)
    path = str(st(path_expr))
    base = getattr(program, "base_dir", None) or os.getcwd()
    try:
        text = normalize_source(Path(resolve_path(str(base), path)).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(path_expr.span, f"cannot read '{path}': {exc}") from None
    if isinstance(c, A.JsonC):
        return IR.JsonSchema(path, text, loc=loc)
    shown = resolve_path(os.path.dirname(program.filename), path)
    return IR.Grammar(path, text, shown, loc=loc)
