"""What ``Program.run`` returns: :class:`Result` (LANGUAGE.md, "Result").

``Result.to_dict()`` / ``to_json()`` give exactly the documented object::

    {"strategy", "properly_weighted", "samples": [{"values", "text", "log_weight", "weight"}],
     "posterior": [{"value", "probability"}], "log_evidence", "ess", "stats": {"tokens", "forward_passes",
     "wall_s", "compile_s", ...}}

``samples`` lists the particles that finished (dead particles are counted in ``stats["dead"]``), ``values`` is
what the program's ``return`` reports (default: every hole), and ``posterior`` aggregates the normalized
weights over those values (sorted by probability, summing to 1).

The JSON is strict (``allow_nan=False``: no ``NaN`` / ``Infinity`` tokens, which JSON does not have). A number
of the run that is not finite (a log-weight, ``log_evidence``, a statistic) is written as ``null``; a non-finite
float inside the returned values is written as the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``
(``float()`` reads each back); NumPy numbers become plain numbers, tuples lists, and any other object its
``str()`` (docs/running.md, "JSON").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from lmprog.inference.diagnostics import diagnostics
from lmprog.jsonvalues import from_numpy, dumps, json_value
from lmprog.inference.samples import tally

__all__ = ["Result", "Sample", "dumps", "json_value"]


@dataclass
class Sample:
    """One finished particle: ``values`` (returned), ``text`` (the whole text, prompt included),
    ``log_weight`` (absolute), ``weight`` (normalized), ``holes`` (every hole's value, by engine name),
    ``messages`` (a chat program's conversation, ``[{"role", "content"}]`` with the holes filled in; None for a
    program without chat turns)."""

    values: dict
    text: str
    log_weight: float
    weight: float
    holes: dict = field(default_factory=dict)
    messages: Optional[list] = None

    def to_dict(self) -> dict:
        out = {"values": json_value(self.values), "text": self.text, "log_weight": _num(self.log_weight),
               "weight": _num(self.weight)}
        if self.messages is not None:
            out["messages"] = json_value(self.messages)
        return out


@dataclass
class Result:
    """The outcome of a run.

    Attributes:
        strategy: the strategy's name; ``properly_weighted``: whether the weights target the posterior.
        samples: finished particles (:class:`Sample`), in particle order.
        posterior: ``[(value dict, probability)]`` sorted by probability (descending), summing to 1.
        log_evidence: ``log Z`` estimate (``None`` unless properly weighted); ``log_evidence_se`` its standard
            error from the run's genealogy (lmprog.inference.evidence; ``None`` when unknown).
        ess: ESS at every decode step (before resampling).
        stats: ``tokens``, ``forward_passes``, ``wall_s``, ``compile_s``, ``particles``, ``dead``, ``deaths`` (when
            some died: ``[{"statement", "segment", "cause", "particles"}]``, the dead particles by the statement
            that killed them: a ``condition``/``factor``/``observe`` or the hole whose constraint did), ``killed``
            (``[{"statement", "segment", "particles"}]``: every particle each statement killed during the run,
            those that resampling replaced by copies of live ones included), ...
        inputs: the input values of the run. extra: strategy-specific tables (``vote``, ``winner``).
        raw: the engine's :class:`~lmprog.inference.InferenceResult` (arrays, every particle).
        program: the :class:`~lmprog.program.Program` that ran (set by ``Program.run`` and the CLI; the HTML
            report shows its source), or None. Not part of the JSON.
    """

    strategy: str
    properly_weighted: bool
    samples: list
    posterior: list
    log_evidence: Optional[float]
    ess: list
    stats: dict
    inputs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    raw: Any = field(default=None, repr=False)
    program: Any = field(default=None, repr=False, compare=False)
    log_evidence_se: Optional[float] = None  # standard error of log_evidence (None: unknown or not weighted)

    @classmethod
    def from_inference(cls, raw, returns: Callable[[Any], dict], inputs: dict, *,
                       conversation: Optional[Callable[[list], list]] = None, **stats) -> "Result":
        """The one path from the engine's particles (a one-group
        :class:`~lmprog.inference.samples.InferenceResult`) to a Result: each finished particle's returned
        values (``returns(decoded particle)``), the posterior tallied over them, the ESS history, the counters
        (``stats`` adds or overrides them: ``wall_s``, ``lower_s``, ``model``, ...) and, for MCMC, the
        convergence diagnostics of the returned values. ``conversation``: a chat program's messages of
        particles (``Lowered.conversation``: a list per particle)."""
        decoded = raw.samples
        alive = [s for s in decoded if s.alive]
        dead = len(decoded) - len(alive)
        messages = conversation(alive) if conversation is not None else [None] * len(alive)
        samples = [Sample(returns(s), s.text, s.log_weight, s.weight, dict(s.values), m)
                   for s, m in zip(alive, messages)]
        rb = rao_blackwellized(raw)
        if rb:  # the exact conditional table of each particle instead of its one draw (module docstring)
            pairs, distributions = _rao_blackwell(raw, returns, rb)
        else:
            pairs, distributions = ((x.values, x.weight) for x in samples), {}
        posterior = tally(pairs, ident=_canonical, tie=lambda v: json.dumps(json_value(v), ensure_ascii=False))
        ess = [float(x) for x in raw.ess[:, 0] if math.isfinite(float(x))] if raw.ess.size else []
        out_stats = dict(raw.stats)
        out_stats["engine_wall_s"] = out_stats.get("wall_s")
        out_stats.update(particles=raw.num_particles, dead=dead)
        if dead and hasattr(raw, "deaths"):
            out_stats["deaths"] = raw.deaths()
        if getattr(raw, "killed", None):
            out_stats["killed"] = raw.kills()
        out_stats.update({k: v for k, v in stats.items() if v is not None})
        extra = {k: raw.extra[k] for k in ("vote", "winner", "rejuvenation") if k in raw.extra}
        if distributions:
            extra["distributions"] = {k: [{"value": v, "probability": p} for v, p in d]
                                      for k, d in distributions.items()}
        if "chains" in raw.extra:
            extra["mcmc"] = diagnostics(raw, key=lambda s: _diagnostic_key(returns(s)))
        return cls(raw.strategy, bool(raw.properly_weighted), samples, posterior,
                   raw.log_evidence if raw.properly_weighted else None, ess, out_stats, dict(inputs), extra, raw,
                   log_evidence_se=getattr(raw, "log_evidence_se", None) if raw.properly_weighted else None)

    @classmethod
    def from_failure(cls, error, inputs: Optional[dict] = None) -> Optional["Result"]:
        """The particles of a run where every particle died, as a Result (for the HTML report:
        ``report.render_failure``): an :class:`~lmprog.inference.InferenceError` raised by the engine's walk
        carries them as they were then (``error.partial``); None for any other error. No particle finished, so
        the samples and the posterior are empty; the values of the dead particles are their holes'."""
        partial = getattr(error, "partial", None)
        if partial is None:
            return None
        return cls.from_inference(partial, lambda s: dict(s.values), dict(inputs or {}))

    # ---- convenience ------------------------------------------------------------------------------------

    @property
    def genealogy(self):
        """Who descends from whom at each resampling step, with the weights before it
        (:class:`~lmprog.inference.samples.Genealogy`: ``ancestors [R, 1, N]``, ``log_weights``, ``lengths``,
        ``steps``; the last ``engine.GENEALOGY_STEPS`` resampling steps are kept, ``dropped`` counts the others).
        ``None`` for strategies that do not resample in the engine's token loop. Not part of the JSON (it is
        ``[R, N]``): the HTML report draws it."""
        return getattr(self.raw, "genealogy", None)

    @property
    def map(self) -> Optional[dict]:
        """The most probable returned value (``None`` when no particle finished)."""
        return self.posterior[0][0] if self.posterior else None

    @property
    def value(self) -> Any:
        """The most probable value: the bare value when the program returns one thing, else the dict."""
        m = self.map
        if m is not None and len(m) == 1:
            return next(iter(m.values()))
        return m

    @property
    def conversation(self) -> Optional[list]:
        """A chat program's conversation (``[{"role", "content"}]``) in its most probable sample (the finished
        particle of greatest weight); None without chat turns or finished particles."""
        best = max(self.samples, key=lambda s: s.weight, default=None)
        return best.messages if best is not None else None

    def distribution(self, hole: str) -> list:
        """The posterior of one enumerated hole, ``[(value, probability)]`` sorted by probability, computed from
        every particle's exact conditional table (Rao-Blackwellized: ``sum_i w_i p(value | particle i's
        history)``, LMQL's ``distribution`` conditioned on everything else in the program). Only for the holes
        listed with ``"rao_blackwellized": true`` in ``stats["enumerated"]`` (nothing after them is scored);
        ``KeyError`` naming those holes otherwise."""
        tables = self.extra.get("distributions", {})
        if hole not in tables:
            have = ", ".join(sorted(tables)) or "none in this run"
            raise KeyError(f"no exact distribution for hole {hole!r} (Rao-Blackwellized holes: {have})")
        return [(d["value"], d["probability"]) for d in tables[hole]]

    def probability(self, **value) -> float:
        """Posterior probability of the returned values ``value`` (e.g. ``r.probability(answer="Paris")``)."""
        total = 0.0
        for v, p in self.posterior:
            if all(v.get(k) == x for k, x in value.items()):
                total += p
        return total

    # ---- output --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        out = {
            "strategy": self.strategy,
            "properly_weighted": bool(self.properly_weighted),
            "samples": [s.to_dict() for s in self.samples],
            "posterior": [{"value": json_value(v), "probability": _num(p)} for v, p in self.posterior],
            "log_evidence": _num(self.log_evidence) if self.properly_weighted else None,
            "log_evidence_se": _num(self.log_evidence_se) if self.properly_weighted else None,
            "ess": [_num(x) for x in self.ess],
            "stats": {k: _plain(v) for k, v in self.stats.items()},
        }
        for k, v in self.extra.items():
            out.setdefault(k, _plain(v))
        return out

    def to_json(self, indent: Optional[int] = None) -> str:
        """:meth:`to_dict` as strict JSON (never ``NaN`` or ``Infinity``)."""
        return dumps(self.to_dict(), indent=indent)

    def __repr__(self) -> str:
        lines = [f"Result(strategy={self.strategy!r}, properly_weighted={self.properly_weighted}, "
                 f"particles={self.stats.get('particles', len(self.samples))}, "
                 f"log_evidence={_fmt(self.log_evidence)}, tokens={self.stats.get('tokens')}, "
                 f"wall_s={_fmt(self.stats.get('wall_s'))})"]
        for v, p in self.posterior[:8]:
            lines.append(f"  {p:7.3f}  {_short(v)}")
        if len(self.posterior) > 8:
            lines.append(f"  ... {len(self.posterior) - 8} more values")
        if not self.posterior:
            lines.append("  (no particle finished)")
        return "\n".join(lines)

    def report(self, path=None, *, program=None, max_rows: Optional[int] = None) -> str:
        """The HTML report of this run (:mod:`lmprog.report`): one self-contained page (posterior, particles with
        their holes marked, genealogy, ESS, dead particles, log Z, MCMC traces, the program's source). With
        ``path``: written there, and the path is returned; without: the HTML is returned. ``program``: whose
        source to show (default ``self.program``); ``max_rows``: merged particle histories listed (default
        ``report.MAX_ROWS``)."""
        from lmprog import report

        text = report.render(self, program=program, max_rows=max_rows or report.MAX_ROWS)
        if path is None:
            return text
        report.write(path, text)
        return str(path)

    def _repr_html_(self) -> str:
        """Notebooks: summary, log Z, posterior bars, ESS and the top particle histories (no script)."""
        from lmprog import report

        return report.fragment(self)


def rao_blackwellized(raw) -> list:
    """The holes of ``raw`` (an InferenceResult) whose posterior comes from the particles' conditional tables:
    enumerated, nothing scored after them (``stats["enumerated"]``), in a run whose posterior is the weighted
    particles' (properly weighted; not ``vote``/``best_of``, which tally otherwise)."""
    if not raw.properly_weighted or "weights" in raw.extra or "key" in raw.extra:
        return []
    return [k for k, v in raw.stats.get("enumerated", {}).items() if v.get("rao_blackwellized")]


def _rao_blackwell(raw, returns, holes: list) -> tuple[list, dict]:
    """``(pairs, distributions)``: the ``(returned values, weight)`` pairs of the posterior with every finished
    particle's draw of ``holes`` replaced by its conditional table (value ``v`` with weight ``w_i p_i(v)``; a
    particle that did not run the hole, or left its pruned enumeration for the token loop, keeps its values), and
    per hole the tallied table ``sum_i w_i p_i``.
    Only one hole can qualify (nothing is scored after it), but any number is handled in turn."""
    from dataclasses import replace

    from lmprog.inference.enumeration import TABLE_KEY

    pairs, per_hole = [], {h: [] for h in holes}
    for s in raw.samples:
        if not s.alive or not s.weight > 0:
            continue
        tables = s.data.get(TABLE_KEY, {})
        variants = [(s.values, 1.0)]
        for h in holes:
            if h not in s.values:
                continue
            if h not in tables:  # a pruned enumeration's frontier draw: its own value, an unbiased one-point table
                per_hole[h].append((s.values[h], s.weight))
                continue
            values, probs = tables[h]
            variants = [({**vals, h: v}, q * float(p)) for vals, q in variants for v, p in zip(values, probs) if p > 0]
            per_hole[h] += [(v, s.weight * float(p)) for v, p in zip(values, probs) if p > 0]
        pairs += [(returns(replace(s, values=vals)), s.weight * q) for vals, q in variants]
    return pairs, {h: tally(d) for h, d in per_hole.items() if d}


def _canonical(values) -> str:
    """Equal returned values tally together: canonical JSON."""
    return json.dumps(json_value(values), sort_keys=True, ensure_ascii=False)


def _diagnostic_key(values):
    """A returned value as R-hat/ESS see it: a lone number as a number, anything else as a category."""
    if isinstance(values, dict) and len(values) == 1:
        (v,) = values.values()
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        return values
    return _canonical(values)


def _num(x):
    """A number of the run for JSON: a float, or None when it is missing or not finite."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _plain(v):
    """Statistics and strategy tables for JSON: plain Python values, non-finite numbers as None."""
    v = from_numpy(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _short(v, limit: int = 80) -> str:
    if isinstance(v, dict) and len(v) == 1:
        v = next(iter(v.values()))
    text = json.dumps(json_value(v), ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
