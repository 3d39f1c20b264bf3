"""The HTML report of a run: one self-contained page (``lmprog run --report out.html``, ``Result.report(path)``).

Everything is drawn here, in Python, as inline SVG and HTML: the page loads nothing (no scripts, styles or fonts
from a network), opens offline, and shows the same without JavaScript. A few lines of inline script only add
highlighting (a genealogy leaf and its particle row) and record script errors in the page (``#lmprog-errors``),
which the tests read back from headless Chromium.

Sections (docs/running.md, "Report"): the run's summary and log Z (with its standard error bar when the result
has ``log_evidence_se``), the posterior as bars, every particle's text with each hole's generated tokens marked
(identical histories merged), the genealogy (the tree of particle histories: particles that share their first
``t`` tokens share their history up to ``t``; resampling copies a particle's tokens into its children), the ESS
over decode steps with the resampling threshold, dead particles with their cause and the last hole they reached
(its constraint), MCMC acceptance and chain traces, and the program's source with its holes highlighted.

The size is bounded whatever the number of particles: at most ``max_rows`` merged histories are listed (the
rest are counted, with their weight), ``MAX_VALUES`` posterior bars, ``MAX_LEAVES`` genealogy leaves,
``MAX_POINTS`` points per chart and ``MAX_TEXT`` characters of one particle's text.

All functions are pure: a :class:`~lmprog.result.Result` in, an HTML string out (:func:`write` writes one).
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Iterable, Optional, Sequence

__all__ = ["render", "render_batch", "render_failure", "fragment", "section", "write", "MAX_ROWS"]

MAX_ROWS = 200  # merged particle histories listed per result
MAX_VALUES = 30  # posterior bars per result
MAX_LEAVES = 120  # genealogy leaves (merged histories) per result
MAX_GENERATIONS = 40  # resampling steps drawn in the genealogy (the last ones)
MAX_POINTS = 400  # points per line of a chart
MAX_TEXT = 2000  # characters of one particle's text
MAX_BATCH_SECTIONS = 100  # detailed sections of a batch report (the summary lists every row)
BATCH_ROW_BUDGET = 2000  # particle rows over all sections of a batch report

_PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7", "#9c755f")
_DEAD = "#d62728"

_CSS = """
.lmprog-report{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:14px;
  color:#1d2430;line-height:1.4;max-width:1200px}
.lmprog-report h1{font-size:20px;margin:0 0 8px}.lmprog-report h2{font-size:17px;margin:22px 0 6px;
  border-bottom:1px solid #dde2ea;padding-bottom:3px}.lmprog-report h3{font-size:15px;margin:14px 0 4px}
.lmprog-report .note{color:#5b6575;font-size:12.5px;margin:3px 0}
.lmprog-report table{border-collapse:collapse;margin:4px 0}
.lmprog-report td,.lmprog-report th{padding:2px 8px;border-bottom:1px solid #eef1f5;text-align:left;vertical-align:top}
.lmprog-report th{font-weight:600;background:#f5f7fa}
.lmprog-report .num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.lmprog-report .bar{height:14px;background:#4e79a7;border-radius:2px;min-width:1px}
.lmprog-report .bartrack{width:320px;background:#eef1f5;border-radius:2px}
.lmprog-report .ptext{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12.5px;
  white-space:pre-wrap;word-break:break-word;max-width:760px}
.lmprog-report .prompt{color:#8a93a3}
.lmprog-report mark.hole{border-radius:3px;padding:0 1px;color:#111}
.lmprog-report tr.dead .ptext{text-decoration:line-through;text-decoration-color:#d6272888}
.lmprog-report tr.dead td.cause{color:#b71c1c}
.lmprog-report tr.hl{background:#fff6d5}
.lmprog-report pre.source{background:#f7f8fa;border:1px solid #e3e7ee;padding:8px;font-size:12.5px;overflow:auto}
.lmprog-report svg{display:block;margin:4px 0}
.lmprog-report svg text{font-family:inherit;font-size:11px;fill:#3c4656}
.lmprog-report .kv{display:flex;flex-wrap:wrap;gap:4px 18px;margin:4px 0}
.lmprog-report .kv span b{font-weight:600}
.lmprog-report details>summary{cursor:pointer;color:#2a4d7a}
.lmprog-report .err{color:#b71c1c}
.lmprog-report .failure{border:1px solid #e3b5b5;background:#fff5f5;padding:4px 12px;border-radius:4px;margin:6px 0}
.lmprog-report pre.source .killed{background:#fde4e4}
.lmprog-report pre.source .deaths{color:#b71c1c}
"""

# The first script of the page: any error of a later script lands in #lmprog-errors (the tests read it).
_ERROR_HOOK = """(function(){var log=[];function put(m){log.push(String(m));var e=document.getElementById('lmprog-errors');
if(e){e.textContent=log.join('\\n');}}window.__lmprogErrors=log;window.addEventListener('error',function(ev){
put('error: '+ev.message);});var ce=console.error;console.error=function(){put('console.error: '+
Array.prototype.join.call(arguments,' '));return ce.apply(console,arguments);};})();"""

# Hovering a genealogy leaf highlights its particle row, and back; clicking a leaf scrolls to the row.
_SCRIPT = """(function(){function rows(id){return document.querySelectorAll('[data-hist="'+id+'"]');}
function set(id,on){rows(id).forEach(function(e){e.classList.toggle('hl',on);});}
document.querySelectorAll('[data-hist]').forEach(function(e){var id=e.getAttribute('data-hist');
e.addEventListener('mouseenter',function(){set(id,true);});e.addEventListener('mouseleave',function(){set(id,false);});
if(e.tagName.toLowerCase()==='g'){e.addEventListener('click',function(){var r=document.getElementById('row-'+id);
if(r){r.scrollIntoView({block:'center'});}});}});
document.body.setAttribute('data-lmprog-ready','1');})();"""


# ------------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------------


def render(result, *, program=None, title: Optional[str] = None, max_rows: int = MAX_ROWS) -> str:
    """The whole report of one run as a self-contained HTML page. ``program``: the
    :class:`~lmprog.program.Program` (its source is shown with the holes highlighted; default
    ``result.program`` when the run recorded it)."""
    program = program if program is not None else getattr(result, "program", None)
    title = title or _title(program, result)
    body = f"<h1>{_e(title)}</h1>" + section(result, program=program, prefix="r", max_rows=max_rows)
    if program is not None:
        body += _source_section(program, _deaths_by_line(result))
    return _document(title, body)


def render_failure(error, *, result=None, program=None, title: Optional[str] = None,
                   max_rows: int = MAX_ROWS) -> str:
    """The page of a run that failed: what happened (the error's message), where (the statement: its label,
    and its line marked in the program's source), the particles' causes of death, and ``result``, the report
    of the particles when the last one died (``Result.from_failure(error)``: an
    :class:`~lmprog.inference.InferenceError` carries them): their texts, the genealogy up to there, the ESS, the
    deaths by statement."""
    label = getattr(error, "label", "") or ""
    name = getattr(program, "filename", None)
    title = title or (f"lmprog report — {name} (failed)" if name else "lmprog report (failed)")
    causes = getattr(error, "causes", None) or {}
    body = [f"<h1>{_e(title)}</h1><div class='failure' data-role='failure'><p class='err'><b>The run failed.</b> "
            f"{_e(_short_text(str(error), 2000))}</p>"]
    if label:
        body.append(f"<p>Where: <code data-role='failure-site'>{_e(label)}</code></p>")
    if causes:
        body.append("<p>" + "; ".join(f"{k} particle(s): {_e(_cause_name_text(c))}" for c, k in causes.items())
                    + "</p>")
    body.append("</div>")
    if result is not None:
        body.append("<p class='note'>Below: the particles as they were when the last one died.</p>")
        body.append(section(result, program=program, prefix="r", max_rows=max_rows))
    if program is not None:
        deaths = _deaths_by_line(result) if result is not None else {}
        line = _label_line(label)
        if line is not None and line not in deaths:
            deaths[line] = sum(causes.values()) or None
        body.append(_source_section(program, deaths))
    return _document(title, "".join(body))


def render_batch(entries: Iterable, *, program=None, title: Optional[str] = None,
                 max_rows: Optional[int] = None, note: str = "") -> str:
    """One page for a batch: a summary table of every row, then a section per row (the first
    ``MAX_BATCH_SECTIONS`` rows; particle rows shared out so the page stays bounded). ``entries``:
    ``(row, inputs, outcome)`` with ``outcome`` a :class:`Result`, an exception or an error message, or
    ``(row, inputs, outcome, html)`` with the row's section already rendered (:func:`section`)."""
    entries = sorted((tuple(e) for e in entries), key=lambda e: e[0])
    n = max(len(entries), 1)
    per_row = max_rows if max_rows is not None else max(5, min(MAX_ROWS, BATCH_ROW_BUDGET // n))
    title = title or (f"lmprog batch report — {getattr(program, 'filename', '')}" if program is not None
                      else "lmprog batch report")
    head = ["<tr><th>row</th><th>inputs</th><th>most probable value</th><th class='num'>p</th>"
            "<th class='num'>log Z</th><th class='num'>particles (dead)</th><th>status</th></tr>"]
    sections = []
    ok = omitted = 0
    for k, entry in enumerate(entries):
        row, inputs, outcome = entry[:3]
        pre = f"row{row}"
        inputs_text = _e(_short_text(_json(inputs), 120)) if inputs is not None else "—"
        if _is_result(outcome):
            ok += 1
            top = outcome.posterior[0] if outcome.posterior else None
            st = outcome.stats
            head.append(
                f"<tr data-role='batch-row'><td class='num'><a href='#{pre}'>{row}</a></td><td><code>{inputs_text}"
                f"</code></td><td><code>{_e(_short(top[0], 80)) if top else '—'}</code></td>"
                f"<td class='num'>{_pct(top[1]) if top else ''}</td><td class='num'>{_fnum(outcome.log_evidence)}</td>"
                f"<td class='num'>{st.get('particles', '')} ({st.get('dead', 0)})</td><td>ok</td></tr>")
            if len(entry) > 3:  # rendered by the caller ("" past its MAX_BATCH_SECTIONS)
                inner = entry[3]
            else:
                inner = section(outcome, program=program, prefix=pre, max_rows=per_row) \
                    if len(sections) < MAX_BATCH_SECTIONS else ""
            if inner and len(sections) < MAX_BATCH_SECTIONS:
                sections.append(f"<h2 id='{pre}'>row {row}: <code>{inputs_text}</code></h2>{inner}")
            else:
                omitted += 1
        else:
            message = str(outcome) if outcome is not None else "no result"
            head.append(f"<tr data-role='batch-row' class='dead'><td class='num'>{row}</td><td><code>{inputs_text}"
                        f"</code></td><td colspan='4' class='err'>{_e(_short_text(message, 300))}</td>"
                        f"<td class='err'>error</td></tr>")
    body = (f"<h1>{_e(title)}</h1><p class='kv'><span><b>rows</b> {len(entries)}</span><span><b>ok</b> {ok}</span>"
            f"<span><b>failed</b> {len(entries) - ok}</span></p>"
            + (f"<p class='note'>{_e(note)}</p>" if note else "")
            + f"<h2>Summary</h2><table data-role='batch-summary'>{''.join(head)}</table>")
    if omitted:
        body += (f"<p class='note'>Detailed sections are shown for the first {MAX_BATCH_SECTIONS} rows; "
                 f"{omitted} more rows are in the summary only.</p>")
    body += "".join(sections)
    if program is not None:
        body += _source_section(program)
    return _document(title, body)


def fragment(result, *, max_rows: int = 20) -> str:
    """A compact report for notebooks (``Result._repr_html_``): summary, log Z, posterior bars, ESS and the top
    particle histories, as one ``<div>`` with its own style and no script."""
    return (f"<div class='lmprog-report'><style>{_CSS}</style>"
            + section(result, prefix="nb", max_rows=max_rows, compact=True) + "</div>")


def write(path, text: str) -> int:
    """Write a report (UTF-8); returns its size in bytes."""
    data = text.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def size_text(n: int) -> str:
    """``123 KiB``-style size of ``n`` bytes."""
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


# ------------------------------------------------------------------------------------------------------
# One result
# ------------------------------------------------------------------------------------------------------


def section(result, *, program=None, prefix: str = "r", max_rows: int = MAX_ROWS, compact: bool = False) -> str:
    """The HTML (no page around it) of one result: summary, log Z, posterior, particles, genealogy, ESS, dead
    particles, MCMC. ``prefix`` keeps element ids apart when several sections share a page."""
    hist = _histories(result)
    parts = [_summary(result), _log_z(result), _posterior(result)]
    if compact:
        parts.append(_ess(result, small=True))
        parts.append(_particles(result, hist, prefix, max_rows, heading="Top particle histories"))
        return "".join(parts)
    parts.append(_particles(result, hist, prefix, max_rows))
    parts.append(_genealogy(result, hist, prefix))
    parts.append(_ess(result))
    parts.append(_dead(result, hist, prefix))
    parts.append(_mcmc(result))
    return f"<section class='result' data-prefix='{_e(prefix)}'>{''.join(p for p in parts if p)}</section>"


def _summary(result) -> str:
    st = result.stats
    items = [("strategy", result.strategy + ("" if result.properly_weighted else " (not properly weighted)")),
             ("particles", st.get("particles", len(result.samples))), ("finished", len(result.samples)),
             ("dead", st.get("dead", 0)), ("tokens", st.get("tokens")), ("forward passes", st.get("forward_passes")),
             ("wall", _secs(st.get("wall_s"))), ("compile", _secs(st.get("compile_s"))), ("model", st.get("model"))]
    if st.get("waves"):
        items.append(("memory waves", st["waves"]))
    if result.inputs:
        items.append(("inputs", _short(result.inputs, 200)))
    kv = "".join(f"<span><b>{_e(k)}</b> {_e(v)}</span>" for k, v in items if v is not None and v != "")
    return f"<div class='kv' data-role='summary'>{kv}</div>"


def _log_z(result) -> str:
    if not result.properly_weighted or result.log_evidence is None:
        return ("<h2>log Z</h2><p class='note' data-role='logz'>No evidence estimate: "
                f"{_e(result.strategy)} is not properly weighted.</p>")
    z = float(result.log_evidence)
    se = _log_z_se(result)
    if not math.isfinite(z):
        return f"<h2>log Z</h2><p data-role='logz'>log Z = {_fnum(z)} (every particle died)</p>"
    if se is None:
        return (f"<h2>log Z</h2><p data-role='logz'>log Z = <b>{z:.4f}</b></p><p class='note'>No standard error: "
                "this result records no <code>log_evidence_se</code>, so no error bar is drawn.</p>")
    w, h, pad = 420, 46, 30
    lo, hi = z - 3 * se, z + 3 * se
    if not hi > lo:
        lo, hi = z - 1, z + 1
    x = lambda v: pad + (v - lo) / (hi - lo) * (w - 2 * pad)  # noqa: E731
    svg = (f"<svg width='{w}' height='{h}' data-role='logz-bar' role='img' aria-label='log Z with error bar'>"
           f"<line x1='{pad}' y1='30' x2='{w - pad}' y2='30' stroke='#c8cfda'/>"
           f"<line x1='{x(z - se):.1f}' y1='16' x2='{x(z + se):.1f}' y2='16' stroke='#4e79a7' stroke-width='3'/>"
           f"<line x1='{x(z - se):.1f}' y1='10' x2='{x(z - se):.1f}' y2='22' stroke='#4e79a7' stroke-width='2'/>"
           f"<line x1='{x(z + se):.1f}' y1='10' x2='{x(z + se):.1f}' y2='22' stroke='#4e79a7' stroke-width='2'/>"
           f"<circle cx='{x(z):.1f}' cy='16' r='4' fill='#1d2430'/>"
           f"<text x='{pad}' y='43'>{lo:.2f}</text><text x='{w - pad}' y='43' text-anchor='end'>{hi:.2f}</text></svg>")
    return (f"<h2>log Z</h2><p data-role='logz'>log Z = <b>{z:.4f}</b> ± {se:.4f} (one standard error)</p>{svg}")


def _log_z_se(result) -> Optional[float]:
    for src in (getattr(result, "log_evidence_se", None), result.stats.get("log_evidence_se"),
                result.extra.get("log_evidence_se")):
        if src is not None:
            try:
                v = float(src)
            except (TypeError, ValueError):
                continue
            if math.isfinite(v) and v >= 0:
                return v
    return None


def _posterior(result) -> str:
    post = result.posterior
    if not post:
        return "<h2>Posterior</h2><p class='note'>No particle finished: there is no posterior.</p>"
    rows = []
    for v, p in post[:MAX_VALUES]:
        rows.append(f"<tr data-role='posterior-bar'><td class='num'>{_pct(p)}</td><td><div class='bartrack'>"
                    f"<div class='bar' style='width:{max(p, 0) * 100:.2f}%'></div></div></td>"
                    f"<td><code>{_e(_short(v, 160))}</code></td></tr>")
    rest = post[MAX_VALUES:]
    more = (f"<p class='note'>{len(rest)} more values with probability {_pct(sum(p for _, p in rest))} in all "
            f"are not drawn.</p>" if rest else "")
    what = "weights" if result.properly_weighted else "weights (not the posterior: a baseline)"
    return (f"<h2>Posterior</h2><p class='note'>{len(post)} distinct returned values; normalized {what}.</p>"
            f"<table data-role='posterior'><tr><th class='num'>probability</th><th></th><th>value</th></tr>"
            f"{''.join(rows)}</table>{more}")


# ------------------------------------------------------------------------------------------------------
# Particle histories (identical ones merged)
# ------------------------------------------------------------------------------------------------------


@dataclass
class _History:
    """Particles with the same tokens and fate, merged."""

    tokens: tuple
    cause: int
    members: list = field(default_factory=list)
    weight: float = 0.0
    log_weight: float = -math.inf
    id: int = 0

    @property
    def alive(self) -> bool:
        return self.cause == 0


@dataclass
class _Histories:
    rows: list  # every merged history, most weight first (dead ones last)
    particles: int
    raw: Any


def _histories(result) -> _Histories:
    raw = getattr(result, "raw", None)
    if raw is None or getattr(raw, "tokens", None) is None:  # a Result without engine arrays: its samples
        rows = []
        for i, s in enumerate(result.samples):
            rows.append(_History(tokens=(s.text,), cause=0, members=[i], weight=float(s.weight),
                                 log_weight=float(s.log_weight)))
        rows.sort(key=lambda h: -h.weight)
        for k, h in enumerate(rows):
            h.id = k
        return _Histories(rows, len(rows), None)
    import numpy as np

    toks, lengths, causes = raw.tokens[0], raw.lengths[0], raw.causes[0]
    weights, lws = np.asarray(raw.weights[0], np.float64), np.asarray(raw.log_weights[0], np.float64)
    merged: dict = {}
    for i in range(toks.shape[0]):
        seq = toks[i, : int(lengths[i])]
        key = (seq.tobytes(), int(causes[i]))
        h = merged.get(key)
        if h is None:
            h = merged[key] = _History(tokens=tuple(int(t) for t in seq), cause=int(causes[i]))
        h.members.append(i)
        h.weight += float(weights[i])
        h.log_weight = float(np.logaddexp(h.log_weight, lws[i]))
    rows = sorted(merged.values(), key=lambda h: (not h.alive, -h.weight, -len(h.members), h.members[0]))
    for k, h in enumerate(rows):
        h.id = k
    return _Histories(rows, int(toks.shape[0]), raw)


def _pieces(raw, h: _History) -> list:
    """``[(kind, hole index or None, text)]`` of one history: ``prompt``, ``text`` (forced) and ``hole`` runs."""
    if raw is None:
        return [("text", None, h.tokens[0])]
    toks = list(h.tokens)
    i = h.members[0]
    spans = [(int(a), int(b), k) for k, (a, b) in enumerate(raw.spans[0, i]) if int(b) > int(a)]
    spans.sort()
    cache: dict = {}

    def dec(n):
        if n not in cache:
            cache[n] = raw.tokenizer.decode(toks[:n], skip_special=True)
        return cache[n]

    def piece(a, b):
        whole, head = dec(b), dec(a)
        return whole[len(head):] if whole.startswith(head) else raw.tokenizer.decode(toks[a:b], skip_special=True)

    out = [("prompt", None, raw.prefix_text)] if raw.prefix_text else []
    pos = 0
    for a, b, k in spans:
        a, b = max(a, pos), min(b, len(toks))
        if a > pos:
            out.append(("text", None, piece(pos, a)))
        if b > a:
            out.append(("hole", k, piece(a, b)))
        pos = max(pos, b)
    if pos < len(toks):
        out.append(("text", None, piece(pos, len(toks))))
    return out


def _text_html(raw, h: _History) -> str:
    out, left = [], MAX_TEXT
    for kind, k, text in _pieces(raw, h):
        if left <= 0:
            break
        cut = text[:left]
        left -= len(cut)
        if kind == "hole":
            hole = raw.holes[k]
            lp = raw.hole_logprobs[0, h.members[0], k]
            a, b = raw.spans[0, h.members[0], k]
            tip = f"{hole.name}: {int(b) - int(a)} token(s), log p = {float(lp):.3f}"
            out.append(f"<mark class='hole' data-hole='{_e(hole.name)}' style='background:{_hole_colour(k)}55;"
                       f"border-bottom:2px solid {_hole_colour(k)}' title='{_e(tip)}'>{_e(cut)}</mark>")
        else:
            out.append(f"<span class='{kind}'>{_e(cut)}</span>")
    if left <= 0:
        out.append("<span class='note'> … (cut)</span>")
    return "".join(out)


def _cause_text(code: int) -> str:
    if code == 0:
        return ""
    from lmprog.inference.segments import CAUSE_TEXT, Cause

    try:
        c = Cause(code)
    except ValueError:
        return f"cause {code}"
    return CAUSE_TEXT.get(c, c.name.lower())


def _cause_name_text(name: str) -> str:
    """The text of a cause given by name (``InferenceError.causes`` keys: ``"host"``, ``"constraint"``, ...)."""
    from lmprog.inference.segments import Cause

    code = Cause.__members__.get(str(name).upper())
    return _cause_text(int(code)) if code is not None else str(name)


def _death_site(raw, h: _History) -> str:
    """The last hole a dead particle reached (its constraint and source location)."""
    if raw is None:
        return ""
    i = h.members[0]
    reached = [(int(a), k) for k, (a, b) in enumerate(raw.spans[0, i]) if int(b) > int(a)]
    k = max(reached)[1] if reached else 0
    if not raw.holes:
        return ""
    return raw.holes[k].label or raw.holes[k].name


def _particles(result, hist: _Histories, prefix: str, max_rows: int, heading: str = "Particles",
               role: str = "particle") -> str:
    rows = hist.rows
    shown = rows[:max_rows]
    raw = hist.raw
    legend = ""
    if raw is not None and raw.holes:
        legend = " ".join(f"<mark class='hole' style='background:{_hole_colour(k)}55;border-bottom:2px solid "
                          f"{_hole_colour(k)}'>{_e(h.name)}</mark>" for k, h in enumerate(raw.holes[:24]))
        legend = f"<p class='note'>Generated tokens per hole: {legend}; prompt in grey.</p>"
    body = []
    for h in shown:
        cls = "alive" if h.alive else "dead"
        cause = _cause_text(h.cause)
        body.append(
            f"<tr id='row-{prefix}-{h.id}' class='{cls}' data-role='{role}-row' data-hist='{prefix}-{h.id}'>"
            f"<td class='num'>{h.id}</td><td class='num'>{len(h.members)}</td>"
            f"<td class='num'>{_pct(h.weight) if h.alive else '—'}</td>"
            f"<td class='num'>{_fnum(h.log_weight) if h.alive else '−∞'}</td>"
            f"<td class='ptext'>{_text_html(raw, h)}</td><td class='cause'>{_e(cause)}</td></tr>")
    merged = hist.particles - len(rows)
    omitted = rows[max_rows:]
    notes = [f"{hist.particles} particles in {len(rows)} distinct histories"
             + (f" ({merged} identical particles merged into their history's row)" if merged else "")]
    if omitted:
        notes.append(f"{len(omitted)} histories ({sum(len(h.members) for h in omitted)} particles, weight "
                     f"{_pct(sum(h.weight for h in omitted))}) are not listed: at most {max_rows} rows are shown")
    return (f"<h2>{_e(heading)}</h2><p class='note' data-role='{role}s-note'>{_e('; '.join(notes))}.</p>{legend}"
            f"<table data-role='{role}s'><tr><th class='num'>#</th><th class='num'>particles</th>"
            "<th class='num'>weight</th><th class='num'>log w</th><th>text</th><th>cause of death</th></tr>"
            + "".join(body) + "</table>")


# ------------------------------------------------------------------------------------------------------
# Genealogy: the tree of histories
# ------------------------------------------------------------------------------------------------------


@dataclass
class _Node:
    start: int
    end: int
    weight: float
    count: int
    alive: bool
    children: list = field(default_factory=list)
    leaves: list = field(default_factory=list)  # histories that end here
    y: float = 0.0


def _tree(leaves: list, depth: int = 0) -> _Node:
    """A compressed trie of token histories (children in order of weight)."""
    end = depth
    while True:
        if any(len(h.tokens) <= end for h in leaves):
            break
        t = leaves[0].tokens[end]
        if any(h.tokens[end] != t for h in leaves):
            break
        end += 1
    node = _Node(depth, end, sum(h.weight for h in leaves), sum(len(h.members) for h in leaves),
                 any(h.alive for h in leaves))
    node.leaves = [h for h in leaves if len(h.tokens) == end]
    groups: dict = {}
    for h in leaves:
        if len(h.tokens) > end:
            groups.setdefault(h.tokens[end], []).append(h)
    kids = [_tree(g, end) for g in groups.values()]
    node.children = sorted(kids, key=lambda n: (not n.alive, -n.weight, -n.count))
    return node


def _prefix_tree(hist: _Histories, prefix: str, why: str, heading: str = "Genealogy", role: str = "genealogy") -> str:
    """The tree of shared token prefixes of the final histories: what a run without resampling steps has for a
    genealogy (``why`` says so)."""
    leaves = hist.rows[:MAX_LEAVES]
    root = _tree(leaves)
    order: list = []  # (node, leaf history) in drawing order

    def visit(n: _Node):
        for h in n.leaves:
            order.append((n, h))
        for c in n.children:
            visit(c)

    visit(root)
    row_h, top, left, right = 14, 18, 10, 70
    longest = max((len(h.tokens) for h in leaves), default=1) or 1
    width = 860
    height = top + row_h * len(order) + 28
    xs = lambda t: left + t / longest * (width - left - right)  # noqa: E731
    ys = {}
    for k, (n, h) in enumerate(order):
        ys[h.id] = top + row_h * k + row_h / 2

    def place(n: _Node) -> float:
        pts = [ys[h.id] for h in n.leaves] + [place(c) for c in n.children]
        n.y = sum(pts) / len(pts)
        return n.y

    place(root)
    total = sum(h.weight for h in hist.rows) or 1.0
    svg: list = []

    def stroke(n: _Node) -> float:
        return 1.0 + 7.0 * math.sqrt(max(n.weight, 0.0) / total)

    def draw(n: _Node, parent: Optional[_Node]):
        colour = "#4e79a7" if n.alive else _DEAD
        dash = "" if n.alive else " stroke-dasharray='4 2'"
        x0, x1 = xs(n.start), xs(max(n.end, n.start))
        tip = (f"tokens {n.start}–{n.end}: {n.count} particle(s), final weight {_pct(n.weight)} "
               f"of the descendants")
        if parent is not None:
            svg.append(f"<line x1='{x0:.1f}' y1='{parent.y:.1f}' x2='{x0:.1f}' y2='{n.y:.1f}' stroke='#9aa5b5'/>")
        svg.append(f"<line data-role='gen-node' x1='{x0:.1f}' y1='{n.y:.1f}' x2='{max(x1, x0 + 1):.1f}' "
                   f"y2='{n.y:.1f}' stroke='{colour}' stroke-width='{stroke(n):.2f}'{dash}><title>{_e(tip)}</title></line>")
        for h in n.leaves:
            y = ys[h.id]
            if abs(y - n.y) > 0.1:
                svg.append(f"<line x1='{x1:.1f}' y1='{n.y:.1f}' x2='{x1:.1f}' y2='{y:.1f}' stroke='#9aa5b5'/>")
            fill = "#4e79a7" if h.alive else _DEAD
            label = f"#{h.id}" + (f" ×{len(h.members)}" if len(h.members) > 1 else "") + ("" if h.alive else " ✝")
            svg.append(f"<g data-role='gen-leaf' data-hist='{prefix}-{h.id}' style='cursor:pointer'>"
                       f"<circle cx='{x1:.1f}' cy='{y:.1f}' r='3.2' fill='{fill}'/>"
                       f"<text x='{x1 + 6:.1f}' y='{y + 3.5:.1f}'>{_e(label)}</text>"
                       f"<title>{_e(f'history #{h.id}: {len(h.members)} particle(s), weight {_pct(h.weight)}')}</title></g>")
        for c in n.children:
            draw(c, n)

    draw(root, None)
    axis_y = height - 14
    ticks = sorted({0, longest // 2, longest})
    axis = "".join(f"<text x='{xs(t):.1f}' y='{axis_y + 11}' text-anchor='middle'>{t}</text>" for t in ticks)
    axis += (f"<line x1='{xs(0):.1f}' y1='{axis_y}' x2='{xs(longest):.1f}' y2='{axis_y}' stroke='#c8cfda'/>"
             f"<text x='{xs(longest):.1f}' y='{axis_y - 4}' text-anchor='end'>token position</text>")
    omitted = hist.rows[MAX_LEAVES:]
    notes = (f"{why} The tree of particle histories after the prompt: particles that share their first t tokens "
             "share their history up to t (identical histories are one leaf). Line width: the final weight of a "
             "branch's descendants; red dashed: dead branches.")
    more = (f" {len(omitted)} lighter histories are not drawn (at most {MAX_LEAVES} leaves)." if omitted else "")
    return (f"<h2>{_e(heading)}</h2><p class='note'>{_e(notes + more)}</p>"
            f"<svg data-role='{role}' width='{width}' height='{height}' role='img' aria-label='genealogy'>"
            + "".join(svg) + axis + "</svg>")


def _genealogy(result, hist: _Histories, prefix: str) -> str:
    """The genealogy: the lineages of the drawn final histories through the recorded resampling steps
    (:func:`lineages`), or, for a run without resampling steps, the tree of shared prefixes."""
    if hist.raw is None or not hist.rows:
        return ""
    gen = _genealogy_of(result)
    sweep = getattr(hist.raw, "sweep", None)
    if gen is None and sweep is not None:
        return _sweep_genealogy(sweep, prefix)
    if gen is None and "chains" in hist.raw.extra:
        return _prefix_tree(hist, prefix, f"{result.strategy}'s chains do not resample: a chain's next state keeps "
                            "a prefix of its current one (or all of it, when a move is rejected); the chain traces "
                            "below follow each chain.")
    if gen is None:
        return _prefix_tree(hist, prefix, f"{result.strategy} does not resample: every particle is its own lineage.")
    if not len(gen.steps):
        return _prefix_tree(hist, prefix, "No decode step resampled: every particle is its own lineage.")
    return _draw_lineages(lineages(gen, hist), prefix)


def _sweep_genealogy(sweep, prefix: str) -> str:
    """Particle Gibbs: the particles of its last conditional SMC sweep and their genealogy (the particles above are
    the references, one per iteration; the last was drawn from these by their final weights)."""
    view = SimpleNamespace(raw=sweep)
    hist = _histories(view)
    p = f"{prefix}s"
    ref = next((h.id for h in hist.rows if 0 in h.members), None)
    lead = ("The last sweep of conditional SMC, the population the last reference was drawn from (by the final "
            "weights): particle 0 replayed the previous reference and is its own ancestor at every resampling"
            + (f" (history #{ref})." if ref is not None else "."))
    table = _particles(view, hist, p, MAX_ROWS, heading="Particles of the last sweep", role="sweep-particle")
    gen = _genealogy_of(view)
    if gen is None or not len(gen.steps):
        return table + _prefix_tree(hist, p, lead + " No decode step of it resampled.",
                                    heading="Genealogy of the last sweep", role="sweep-genealogy")
    return table + _draw_lineages(lineages(gen, hist), p, heading="Genealogy of the last sweep",
                                  role="sweep-genealogy", lead=lead)


def _genealogy_of(result):
    """The result's :class:`~lmprog.inference.samples.Genealogy` when it describes its particles, else None."""
    raw = getattr(result, "raw", None)
    gen = getattr(raw, "genealogy", None)
    if gen is None or gen.ancestors.ndim != 3 or gen.ancestors.shape[2] != raw.num_particles:
        return None
    return gen


@dataclass(eq=False)
class GenNode:
    """Particles of one generation that had the same history then, merged: ``members`` (their indices in that
    generation), their summed normalized ``weight`` then, ``parents`` (node of the previous generation -> how
    many members descend from it), ``tokens`` (the history), ``hist`` (the final generation's merged history)."""

    gen: int
    tokens: tuple
    members: list = field(default_factory=list)
    weight: float = 0.0
    parents: dict = field(default_factory=dict)
    hist: Any = None
    y: float = 0.0


@dataclass
class Lineages:
    """What the genealogy draws: ``levels[k]``, the nodes of generation ``first + k`` (the last level: the final
    particles' drawn histories); per generation before the last, its resampling step's decode ``steps`` and
    ``segments``, the particles ``dead`` then (weight 0: died since the previous resampling, never an ancestor)
    and ``extinct`` (no child at that step, the dead included)."""

    first: int
    levels: list
    steps: list
    segments: list
    dead: list
    extinct: list
    recorded: int  # resampling steps in the genealogy (the last MAX_GENERATIONS are drawn)
    dropped: int  # earlier resampling steps the engine did not keep
    particles: int


def lineages(gen, hist: _Histories) -> Lineages:
    """The ancestry of the drawn final histories (the first ``MAX_LEAVES``) through the last
    ``MAX_GENERATIONS`` resampling steps of ``gen`` (a one-group
    :class:`~lmprog.inference.samples.Genealogy`). In each generation the ancestors of the drawn particles are
    merged by their history then: their first ``lengths[r, a]`` tokens, read off a final descendant (tokens are
    only appended, so a descendant's text extends its ancestor's). Each node's weight is its particles' summed
    normalized weight before that step's resampling; the last level's are the final weights."""
    import numpy as np

    toks = hist.raw.tokens[0]
    n_gen, n = len(gen.steps), gen.ancestors.shape[2]
    leaves = hist.rows[:MAX_LEAVES]
    lineage = gen.lineage(0)  # [R + 1, N]: every final particle's ancestor in each generation
    first = max(0, n_gen - MAX_GENERATIONS)
    levels = [[GenNode(n_gen, h.tokens, list(h.members), h.weight, hist=h) for h in leaves]]
    finals = sorted(i for h in leaves for i in h.members)
    weights = np.exp(gen.log_weights[:, 0])
    for r in range(n_gen - 1, first - 1, -1):
        descendant: dict = {}  # ancestor in generation r -> one of its drawn final descendants
        for c in finals:
            descendant.setdefault(int(lineage[r, c]), c)
        nodes: dict = {}
        node_of: dict = {}
        for a in sorted(descendant):
            key = tuple(int(t) for t in toks[descendant[a], : int(gen.lengths[r, 0, a])])
            node = nodes.setdefault(key, GenNode(r, key))
            node.members.append(a)
            node.weight += float(weights[r, a])
            node_of[a] = node
        for x in levels[0]:
            for m in x.members:
                parent = node_of[int(gen.ancestors[r, 0, m])]
                x.parents[parent] = x.parents.get(parent, 0) + 1
        levels.insert(0, list(nodes.values()))
    steps = range(first, n_gen)
    return Lineages(first, levels, [int(gen.steps[r]) for r in steps], [int(gen.segments[r]) for r in steps],
                    [int(np.sum(~np.isfinite(gen.log_weights[r, 0]))) for r in steps],
                    [n - len(np.unique(gen.ancestors[r, 0])) for r in steps], n_gen, int(gen.dropped), n)


def _draw_lineages(lin: Lineages, prefix: str, heading: str = "Genealogy", role: str = "genealogy",
                   lead: str = "") -> str:
    """One column per generation (its resampling step, then the final particles): a dot per node (area and
    opacity: its weight then), a line to each of its parents' dots (width: how many of its particles descend
    from that parent), the final histories as leaves linked to their particle rows, the particles that died
    before each step in red under its column."""
    levels = lin.levels
    cols = len(levels)
    # Top to bottom: the first generation by weight, then every node after the first of its parents.
    rank: dict = {}
    for level in levels:
        level.sort(key=lambda x: (min((rank[p] for p in x.parents), default=0),
                                  x.hist is not None and not x.hist.alive, -x.weight, x.members[0]))
        rank.update((x, i) for i, x in enumerate(level))
    leaves = levels[-1]
    row_h = 14 if len(leaves) <= 60 else 10
    top, left, right, bottom = 30, 16, 150, 34
    width = 860
    height = top + row_h * max(len(leaves), 1) + bottom
    step_x = (width - left - right) / max(cols - 1, 1)
    xs = lambda k: left + k * step_x  # noqa: E731
    for i, x in enumerate(leaves):
        x.y = top + row_h * i + row_h / 2
    for k in range(cols - 2, -1, -1):  # a node sits at the mean height of its children
        kids: dict = {}
        for c in levels[k + 1]:
            for p in c.parents:
                kids.setdefault(p, []).append(c.y)
        for x in levels[k]:
            ys = kids.get(x, [top])
            x.y = sum(ys) / len(ys)
    svg: list = []
    label_every = max(1, math.ceil(cols / 16))
    for k in range(cols - 1):
        x0 = xs(k)
        t = lin.steps[k]
        if k % label_every == 0:
            svg.append(f"<text x='{x0:.1f}' y='12' text-anchor='middle'>{t}</text>")
        svg.append(f"<line x1='{x0:.1f}' y1='18' x2='{x0:.1f}' y2='{height - bottom + 4}' stroke='#eef1f5'/>")
        if lin.dead[k]:
            svg.append(f"<text data-role='gen-deaths' data-gen='{lin.first + k}' x='{x0:.1f}' y='{height - 18}' "
                       f"text-anchor='middle' style='fill:{_DEAD}'>✝{lin.dead[k]}<title>{_e(f'{lin.dead[k]} particle(s) dead before resampling step {t} (weight 0): replaced by copies of live ones')}</title></text>")
    svg.append(f"<text x='{xs(cols - 1):.1f}' y='12' text-anchor='middle'>end</text>")
    for k in range(1, cols):
        for c in levels[k]:
            for p, m in c.parents.items():
                w = 0.8 + 2.2 * math.sqrt(m / max(len(c.members), 1))
                svg.append(f"<line data-role='gen-edge' data-gen='{lin.first + k}' data-count='{m}' "
                           f"x1='{xs(k - 1):.1f}' y1='{p.y:.1f}' x2='{xs(k):.1f}' y2='{c.y:.1f}' stroke='#8fa3bf' "
                           f"stroke-width='{w:.2f}' stroke-opacity='0.8'/>")
    for k in range(cols - 1):
        t = lin.steps[k]
        for x in levels[k]:
            r = 2.0 + 5.0 * math.sqrt(max(x.weight, 0.0))
            tip = (f"before resampling at decode step {t}: {len(x.members)} particle(s) with this history, weight "
                   f"{_pct(x.weight)}, {len(x.tokens)} token(s)")
            svg.append(f"<circle data-role='gen-node' data-gen='{lin.first + k}' data-particles='{len(x.members)}' "
                       f"cx='{xs(k):.1f}' cy='{x.y:.1f}' r='{r:.2f}' fill='#4e79a7' "
                       f"fill-opacity='{0.25 + 0.75 * math.sqrt(max(x.weight, 0.0)):.2f}'><title>{_e(tip)}</title>"
                       "</circle>")
    xe = xs(cols - 1)
    for x in leaves:
        h = x.hist
        fill = "#4e79a7" if h.alive else _DEAD
        r = 2.0 + 5.0 * math.sqrt(max(h.weight, 0.0)) if h.alive else 3.0
        label = f"#{h.id}" + (f" ×{len(h.members)}" if len(h.members) > 1 else "") + ("" if h.alive else " ✝")
        svg.append(f"<g data-role='gen-leaf' data-hist='{prefix}-{h.id}' style='cursor:pointer'>"
                   f"<circle cx='{xe:.1f}' cy='{x.y:.1f}' r='{r:.2f}' fill='{fill}'/>"
                   f"<text x='{xe + 8:.1f}' y='{x.y + 3.5:.1f}'>{_e(label)}</text>"
                   f"<title>{_e(f'history #{h.id}: {len(h.members)} particle(s), final weight {_pct(h.weight)}')}"
                   "</title></g>")
    svg.append(f"<text x='{left}' y='{height - 4}'>decode step of each resampling (columns); dot area: weight then"
               "</text>")
    drawn = cols - 1
    notes = [f"The lineages of the final particles through the last {drawn} of the run's {lin.recorded} recorded "
             "resampling steps: each column is the population just before a resampling step (its decode step on "
             "top), then the final particles; particles with the same history then are one dot (area and opacity: "
             "their normalized weight then), and a line joins each dot to its ancestors' (width: the share of its "
             "particles descending from each). Red ✝k under a column: k particles had weight 0 there (died since "
             "the previous step) and were replaced; red leaves: particles dead at the end."]
    if lin.first or lin.dropped:
        notes.append(f"{lin.first + lin.dropped} earlier resampling step(s) are not drawn"
                     + (f" ({lin.dropped} not kept by the engine)" if lin.dropped else "") + ".")
    extinct = sum(lin.extinct)
    notes.append(f"Over the drawn steps {extinct} lineage(s) ended (no child at a resampling step), "
                 f"{sum(lin.dead)} of them dead.")
    omitted = lin.particles - sum(len(x.members) for x in leaves)
    if omitted:
        notes.append(f"The ancestry of {omitted} particle(s) in lighter histories is not drawn (at most "
                     f"{MAX_LEAVES} leaves).")
    return (f"<h2>{_e(heading)}</h2><p class='note'>{_e(' '.join(([lead] if lead else []) + notes))}</p>"
            f"<svg data-role='{role}' data-generations='{cols}' width='{width}' height='{height}' role='img' "
            f"aria-label='genealogy'>" + "".join(svg) + "</svg>")


# ------------------------------------------------------------------------------------------------------
# Charts: ESS, MCMC
# ------------------------------------------------------------------------------------------------------


def _line_chart(series: Sequence, *, width=620, height=170, y_max=None, y_min=None, hline=None, hline_label="",
                marks: Sequence = (), x_label="", role="chart", colours=None) -> str:
    """An SVG line chart of ``series`` (lists of y values at x = 0, 1, ...), downsampled to ``MAX_POINTS``."""
    pad_l, pad_r, pad_t, pad_b = 44, 12, 10, 26
    series = [[float(v) for v in s] for s in series if len(s)]
    if not series:
        return ""
    n = max(len(s) for s in series)
    finite = [v for s in series for v in s if math.isfinite(v)] + ([hline] if hline is not None else [])
    lo = y_min if y_min is not None else min(finite, default=0.0)
    hi = y_max if y_max is not None else max(finite, default=1.0)
    if not hi > lo:
        lo, hi = lo - 1, hi + 1
    xs = lambda i: pad_l + (i / max(n - 1, 1)) * (width - pad_l - pad_r)  # noqa: E731
    ys = lambda v: pad_t + (1 - (v - lo) / (hi - lo)) * (height - pad_t - pad_b)  # noqa: E731
    out = [f"<svg data-role='{role}' width='{width}' height='{height}' role='img'>",
           f"<rect x='{pad_l}' y='{pad_t}' width='{width - pad_l - pad_r}' height='{height - pad_t - pad_b}' "
           f"fill='#fbfcfd' stroke='#e3e7ee'/>"]
    for v in (lo, hi):
        out.append(f"<text x='{pad_l - 4}' y='{ys(v) + 4:.1f}' text-anchor='end'>{_tick(v)}</text>")
    out.append(f"<text x='{pad_l}' y='{height - 8}'>0</text><text x='{width - pad_r}' y='{height - 8}' "
               f"text-anchor='end'>{n - 1}</text><text x='{(width + pad_l) / 2:.0f}' y='{height - 8}' "
               f"text-anchor='middle'>{_e(x_label)}</text>")
    if hline is not None and lo <= hline <= hi:
        out.append(f"<line data-role='threshold' x1='{pad_l}' y1='{ys(hline):.1f}' x2='{width - pad_r}' "
                   f"y2='{ys(hline):.1f}' stroke='#e15759' stroke-dasharray='5 3'/>"
                   f"<text x='{width - pad_r - 2}' y='{ys(hline) - 3:.1f}' text-anchor='end' style='fill:#e15759'>"
                   f"{_e(hline_label)}</text>")
    for k, s in enumerate(series):
        stride = max(1, math.ceil(len(s) / MAX_POINTS))
        idx = list(range(0, len(s), stride))
        if idx[-1] != len(s) - 1:
            idx.append(len(s) - 1)
        pts = " ".join(f"{xs(i):.1f},{ys(min(max(s[i], lo), hi)):.1f}" for i in idx if math.isfinite(s[i]))
        colour = (colours or _PALETTE)[k % len(colours or _PALETTE)]
        out.append(f"<polyline data-role='series' points='{pts}' fill='none' stroke='{colour}' stroke-width='1.6'/>")
    marks = list(marks)
    stride = max(1, math.ceil(len(marks) / MAX_POINTS))
    for i, v in marks[::stride]:
        out.append(f"<circle data-role='resample-mark' cx='{xs(i):.1f}' cy='{ys(min(max(v, lo), hi)):.1f}' r='3' "
                   f"fill='#e15759'/>")
    out.append("</svg>")
    return "".join(out)


def _ess(result, small: bool = False) -> str:
    raw = getattr(result, "raw", None)
    n = result.stats.get("particles") or len(result.samples) or 1
    waves = (raw.extra.get("wave_ess") if raw is not None else None) or None
    series = [list(map(float, w)) for w in waves] if waves else [list(result.ess)]
    if not any(series):
        return "" if small else (f"<h2>ESS</h2><p class='note'>No ESS history: {_e(result.strategy)} has no "
                                 "weighted decode steps.</p>")
    thr = None
    opts = getattr(raw, "options", {}) or {}
    resampler = opts.get("resample")
    if opts.get("ess") is not None and resampler:
        per_wave = n / len(series) if waves else n
        thr = float(opts["ess"]) * per_wave
    marks = []
    if raw is not None and raw.resampled.size and not waves:
        ess_all = raw.ess[:, 0]
        finite = [float(x) for x in ess_all if math.isfinite(float(x))]
        if len(finite) == len(ess_all):
            marks = [(i, float(ess_all[i])) for i in range(len(ess_all)) if bool(raw.resampled[i, 0])]
    y_max = max([max(s) for s in series if s] + [thr or 0])
    chart = _line_chart(series, width=420 if small else 620, height=120 if small else 170, y_min=0, y_max=y_max,
                        hline=thr, hline_label=f"resampling threshold {thr:.1f}" if thr is not None else "",
                        marks=marks, x_label="decode step", role="ess")
    note = (f"ESS before resampling at each decode step ({len(series[0])} steps); red dots: steps that resampled "
            f"({len(marks)})." + (f" One line per memory wave ({len(series)})." if waves else ""))
    if thr is None:
        note += " This strategy never resamples."
    return f"<h{3 if small else 2}>ESS</h{3 if small else 2}><p class='note'>{_e(note)}</p>{chart}"


def _dead(result, hist: _Histories, prefix: str) -> str:
    """The dead particles by cause and by the statement that killed them (``InferenceResult.died_in``: the
    ``condition``/``factor``/``observe`` or the hole whose constraint did; for a result that does not record it,
    the last hole the particle reached), and the deaths the genealogy saw before resampling steps."""
    dead = [h for h in hist.rows if not h.alive]
    gen = _genealogy_of(result)
    earlier = 0 if gen is None else int(sum((~(gen.log_weights[:, 0] > -math.inf)).sum(axis=1)))
    replaced = (f" Before the recorded resampling steps {earlier} particle(s) had died and were replaced by copies "
                "of live ones (✝ in the genealogy)." if earlier else "")
    kills = (result.stats or {}).get("killed") or []
    killed = ""
    if kills:
        killed = ("<h3>Killed during the run, by statement</h3><p class='note'>Every particle found dead at the end "
                  "of each statement, those that resampling replaced later by copies of live ones included (a hole "
                  "counts the particles dead at its end).</p><table data-role='killed'><tr><th class='num'>"
                  "particles</th><th>statement</th></tr>"
                  + "".join(f"<tr data-role='killed-row'><td class='num'>{int(d['particles'])}</td><td><code>"
                            f"{_e(d.get('statement') or '')}</code></td></tr>" for d in kills) + "</table>")
    if not dead:
        return f"<h2>Dead particles</h2><p class='note'>No particle is dead at the end.{_e(replaced)}</p>{killed}"
    raw = hist.raw
    by_site: dict = {}
    for d in _deaths(raw, dead):
        key = (d["cause"], d["statement"] or "")
        by_site[key] = by_site.get(key, 0) + d["particles"]
    rows = "".join(f"<tr data-role='dead-row'><td class='num'>{c}</td><td>{_e(cause)}</td><td><code>{_e(site)}</code>"
                   f"</td></tr>" for (cause, site), c in sorted(by_site.items(), key=lambda kv: -kv[1]))
    what = ("the statement that killed them (source location and statement: a condition, factor or observe, or "
            "the hole whose constraint or budget allowed no token)" if getattr(raw, "died_in", None) is not None
            else "the last hole they reached (its source location and constraint)")
    return (f"<h2>Dead particles</h2><p class='note'>Particles dead at the end, by cause and {_e(what)}; their "
            f"histories are the struck-out rows above.{_e(replaced)}</p>"
            "<table data-role='dead'><tr><th class='num'>particles</th><th>cause</th><th>where</th></tr>"
            f"{rows}</table>{killed}")


def _deaths(raw, dead: list) -> list:
    """``[{"cause", "statement", "particles"}]`` of the dead histories ``dead``: by the engine's record of where
    each particle died (``InferenceResult.deaths``), else by the last hole each reached."""
    if raw is not None and getattr(raw, "died_in", None) is not None and hasattr(raw, "deaths"):
        return raw.deaths(0)
    return [{"cause": _cause_text(h.cause), "statement": _death_site(raw, h), "particles": len(h.members)}
            for h in dead]


def _mcmc(result) -> str:
    diag = result.extra.get("mcmc")
    raw = getattr(result, "raw", None)
    parts = []
    if diag:
        acc = diag.get("acceptance") or []
        bars = "".join(f"<tr data-role='acceptance-bar'><td class='num'>chain {c}</td><td><div class='bartrack'>"
                       f"<div class='bar' style='width:{max(0.0, min(1.0, a)) * 100:.1f}%;background:"
                       f"{_PALETTE[c % len(_PALETTE)]}'></div></div></td><td class='num'>{a:.2f}</td></tr>"
                       for c, a in enumerate(acc))
        parts.append(f"<p class='kv'><span><b>R-hat</b> {_fnum(diag.get('r_hat'))}</span><span><b>ESS</b> "
                     f"{_fnum(diag.get('ess'))}</span></p><h3>Acceptance per chain</h3><table>{bars}</table>")
    if raw is not None and "chains" in raw.extra and "kept" in raw.extra:
        chains, kept = int(raw.extra["chains"]), int(raw.extra["kept"])
        scores = raw.scores[0]
        samples = raw.samples
        if chains * kept <= len(scores) and kept > 0:
            traces = [[float(scores[c * kept + k]) for k in range(kept)] for c in range(chains)]
            parts.append("<h3>Chain traces: log target density</h3>"
                         + _line_chart(traces, x_label="kept step", role="chain-trace"))
            labels = {}
            for v, _ in result.posterior:
                labels.setdefault(_short(v, 60), len(labels))
            returned = _returned_values(result, samples)
            vals = []
            for c in range(chains):
                row = []
                for k in range(kept):
                    key = _short(returned[c * kept + k], 60)
                    row.append(float(labels.setdefault(key, len(labels))))
                vals.append(row)
            legend = ", ".join(f"{i}: {_e(v)}" for v, i in list(labels.items())[:12])
            parts.append("<h3>Chain traces: value (by posterior rank)</h3>"
                         + _line_chart(vals, x_label="kept step", role="chain-values", y_min=0)
                         + f"<p class='note'>{legend}{' …' if len(labels) > 12 else ''}</p>")
    rj = result.extra.get("rejuvenation")
    if rj:
        acc = rj.get("acceptance")
        parts.append(f"<p class='kv'><span><b>rejuvenation</b> {rj.get('moves')} moves in {rj.get('rounds')} rounds"
                     f"</span><span><b>acceptance</b> {_fnum(acc)}</span></p>")
    if not parts:
        return ""
    return "<h2>MCMC</h2>" + "".join(parts)


def _returned_values(result, particles) -> list:
    """The returned values of every engine particle, as the result reports them: the finished particles are
    ``result.samples`` in particle order (``Result.from_inference``); a dead one shows its hole values."""
    alive = iter(result.samples)
    out = []
    for p in particles:
        s = next(alive, None) if p.alive else None
        out.append(s.values if s is not None else dict(p.values))
    return out


# ------------------------------------------------------------------------------------------------------
# The program's source
# ------------------------------------------------------------------------------------------------------


def _label_line(label) -> Optional[int]:
    """The line of a segment label (``"file.lmp:3:1: condition ..."``), or None."""
    import re

    m = re.match(r"(.+?):(\d+):(\d+): ", label or "")
    return int(m.group(2)) if m else None


def _deaths_by_line(result) -> dict:
    """``{source line: particles}``: the particles each statement killed during the run (``stats["killed"]``),
    else those dead at the end (``stats["deaths"]``)."""
    out: dict = {}
    stats = getattr(result, "stats", None) or {}
    for d in stats.get("killed") or stats.get("deaths", ()):
        line = _label_line(d.get("statement"))
        if line is not None:
            out[line] = out.get(line, 0) + int(d.get("particles") or 0)
    return out


def _source_section(program, deaths: Optional[dict] = None) -> str:
    """The program's source with its holes highlighted; the lines in ``deaths`` (``{line: particles}``: the
    statements that killed particles) marked, with their count of dead particles."""
    deaths = deaths or {}
    source = getattr(program, "source", None)
    if not source:
        return ""
    lines = source.split("\n")
    marks: dict = {}  # line -> [(col0, col1, hole index)]
    names = {}
    for spec in getattr(program, "hole_definitions", ()):
        sp = spec.span
        if sp is None or sp.line < 1 or sp.end_line != sp.line:
            continue
        k = names.setdefault(spec.name, len(names))
        marks.setdefault(sp.line, []).append((sp.col - 1, sp.end_col - 1, k, spec.name))
    out = []
    for no, line in enumerate(lines, 1):
        pos, buf = 0, []
        for a, b, k, name in sorted(marks.get(no, [])):
            if a < pos or b > len(line) or b <= a:
                continue
            buf.append(_e(line[pos:a]))
            buf.append(f"<mark class='hole' data-role='source-hole' title='hole {_e(name)}' style='background:"
                       f"{_hole_colour(k)}55;border-bottom:2px solid {_hole_colour(k)}'>{_e(line[a:b])}</mark>")
            pos = b
        buf.append(_e(line[pos:]))
        text = f"<span class='prompt'>{no:>3} </span>" + "".join(buf)
        if no in deaths:
            k = deaths[no]
            text = (f"<span class='killed' data-role='source-deaths' data-line='{no}'>{text}</span>"
                    f"<span class='deaths'>  ✝ {'' if k is None else f'{k} particle(s) killed here'}</span>")
        out.append(text)
    note = "; the statements that killed particles in red" if deaths else ""
    return (f"<h2>Program</h2><p class='note'>{_e(getattr(program, 'filename', ''))}; holes highlighted{note}.</p>"
            f"<pre class='source' data-role='source'>" + "\n".join(out) + "</pre>")


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def _document(title: str, body: str) -> str:
    """A page around ``body``; the footer states the page's own size (and the bounds that keep it small)."""
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            "content='width=device-width,initial-scale=1'>"
            f"<title>{_e(title)}</title><script>{_ERROR_HOOK}</script><style>{_CSS}body{{margin:18px;background:#fff}}"
            f"</style></head><body><div class='lmprog-report'>{body}"
            f"<p class='note' data-role='size'>This file: @@SIZE@@, self-contained (it loads nothing). At most "
            f"{MAX_ROWS} particle histories, {MAX_VALUES} posterior bars, {MAX_LEAVES} genealogy leaves and "
            f"{MAX_POINTS} points per chart line are drawn per run; the rest are counted.</p>"
            "<pre id='lmprog-errors' data-role='errors' hidden></pre></div>"
            f"<script>{_SCRIPT}</script></body></html>")
    size = len(page.encode("utf-8"))
    for _ in range(3):  # the size's own digits change the size: settle it
        text = page.replace("@@SIZE@@", f"{size_text(size)} ({size} bytes)")
        new = len(text.encode("utf-8"))
        if new == size:
            break
        size = new
    return text


def _title(program, result) -> str:
    name = getattr(program, "filename", None)
    return f"lmprog report — {name} ({result.strategy})" if name else f"lmprog report ({result.strategy})"


def _is_result(x) -> bool:
    return hasattr(x, "posterior") and hasattr(x, "samples") and hasattr(x, "stats")


def _hole_colour(k: int) -> str:
    return _PALETTE[k % len(_PALETTE)]


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _pct(p) -> str:
    p = float(p)
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.1e}"


def _fnum(x) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.3f}"


def _secs(x) -> Optional[str]:
    return None if x is None else f"{float(x):.2f} s"


def _tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"


def _short(v, limit: int = 80) -> str:
    from lmprog.jsonvalues import json_value

    if isinstance(v, dict) and len(v) == 1:
        v = next(iter(v.values()))
    text = v if isinstance(v, str) else json.dumps(json_value(v), ensure_ascii=False)
    return _short_text(text, limit)


def _json(v) -> str:
    from lmprog.jsonvalues import json_value

    return json.dumps(json_value(v), ensure_ascii=False)


def _short_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
