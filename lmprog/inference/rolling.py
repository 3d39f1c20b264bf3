"""Rolling suffix moves: every MCMC chain at its own place in the program.

``mcmc(move="suffix")`` makes ``steps`` suffix MH moves per chain (:mod:`lmprog.inference.moves` states the
move and its ratio ``alpha = min(1, W(x') n(x) / (W(x) n(x')))``). In lock step (``moves.suffix_moves``) every
chain makes one move per walk and the walk lasts until the chain cut earliest has regenerated its suffix, so one
MH step of 64 chains costs about as many LM calls as the whole program has tokens.

Here every chain makes its moves one after another, each chain where its own move is: particle ``i`` is at
segment ``at[i]`` of the program, either *inside* a hole (its token loop running) or *arriving* at a segment
(from its cut, or from the segment before). The scheduler repeats:

1. **Arrivals.** Take the earliest segment ``j`` some chain arrives at, and run it for those chains only:
   forced text is fed to their rows alone (``Kernels.feed_some``: ``K`` LM rows, not ``P``), a host step calls
   the program's host code with only them alive in the view (:attr:`lmprog.inference.engine.Run.only`), a
   hole is begun for them (``begin_hole`` with ``rows``) and they join the token loop. A hole the token loop
   cannot share (exact enumeration, a per-prefix host check) runs at once for the arrivals while the chains
   inside other holes are held (``Kernels.hold`` / ``release``). A chain reaching the end of the program is
   accepted or rejected (:meth:`Schedule.settle`), its state recorded, and its next cut drawn: it arrives there
   next, which may be any segment. Joining a hole and settling cost no LM call and run at once; a segment
   that costs one waits until enough chains wait (:data:`FLUSH`) or none is left decoding.
2. **One decode step** (``moves.MOVE_CHUNK``) for every chain inside a hole, whichever hole it is: hole
   parameters are per particle (``HoleParams.max_tokens`` / ``max_steps`` ``[P]``), automaton states global. A
   chain whose hole ended arrives at the next segment; one that died goes to the end (a rejection).

So LM calls follow the longest *sum* of one chain's regenerated lengths, not the sum over moves of the longest
one, for every program, and text and host steps cost what the chains that reach them need.

Exactness: each move is the chain's own MH move (its cut, never redrawn; its regeneration from fresh
randomness: the decode step's uniforms, host keys, the host generator's draws; its accept draw). Only *when* a
move runs depends on the other chains, and every chain makes exactly ``steps`` moves (no stopping rule depends
on a state), so the states recorded after each move are those of an exact MH chain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.jax_setup import round_pow2, to_device
from lmprog.inference import engine, enumeration
from lmprog.inference.engine import FEED_CHUNK, Part, Run, Setup, snapshot
from lmprog.inference.holes import BIG, budget, hole_params
from lmprog.inference.moves import Recorder, Sites, aside, exchange
from lmprog.inference.segments import Hole, Observe, Text
from lmprog.inference.state import HoleParams, RunState

__all__ = ["FLUSH", "Schedule", "rolling_moves"]

FLUSH = 0.5  # chains wait at a segment that costs an LM call until this share of the moving chains waits there


def shares_token_loop(run: Run, seg) -> bool:
    """Whether hole ``seg`` runs in the token loop shared by chains in different holes: not exactly enumerated
    (``enumeration.traced_enumerates``), no host check after every token."""
    return type(seg) is Hole and seg.prefix_check is None and not enumeration.traced_enumerates(run, seg)


class Schedule:
    """Per chain: moves left, acceptances, the current state's ``lw_total``, site count, hole spans and host
    data; where its move is (``at``, ``inside``, the token ``tok`` it resumes at, ``cut``); the chains' states
    kept aside (``saved``: a rejected proposal goes back to it)."""

    def __init__(self, run: Run, s: Setup, rng: np.random.Generator, sites: Sites, steps: int, burn_in: int,
                 rec: Recorder):
        num = run.num
        self.run, self.s, self.rng, self.sites, self.steps, self.burn_in, self.rec = run, s, rng, sites, steps, burn_in, rec
        self.segs = run.program.segments
        self.end = len(self.segs)
        self.left = np.full((num,), int(steps), np.int64)
        self.accepted = np.zeros((num,), np.int64)
        self.lw = np.zeros((num,), np.float64)
        self.n = np.zeros((num,), np.int64)
        self.spans: np.ndarray | None = None
        self.kept_data: list = [{} for _ in range(num)]
        self.at = np.full((num,), -1, np.int64)  # -1: no move under way
        self.inside = np.zeros((num,), bool)
        self.tok = np.full((num,), -1, np.int64)
        self.cut = np.zeros((num,), bool)
        self.hole_of = np.zeros((num,), np.int32)
        self.max_tokens = np.zeros((num,), np.int32)
        self.max_steps = np.zeros((num,), np.int32)
        self.saved: RunState | None = None
        self.chunks = 0
        self.first_hole = np.cumsum([0] + [type(g) is Hole for g in self.segs]).astype(np.int64)
        self.joins_at_once = np.array([shares_token_loop(run, g) for g in self.segs] + [True])
        self.no_start, self.no_pause = to_device(np.full((num,), -1, np.int32)), to_device(BIG, np.int32)

    # ---- the loop ---------------------------------------------------------------------------------

    def run_moves(self, state: RunState, progress=None) -> RunState:
        run = self.run
        state = run.sync_data(state)
        spans, lw = (np.asarray(a) for a in jax.device_get((state.particles.spans, state.particles.lw_total)))
        self.spans, self.lw, self.n = spans.copy(), lw.astype(np.float64), self.sites.count(spans)
        state, self.saved = run.call(aside(run.kern), state)
        self.kept_data = [dict(d) for d in run.data]
        state = self._next_moves(state, self.left > 0)
        while True:
            state = self._arrivals(state)
            if not self.inside.any():
                break
            state = self._step(state)
            if progress is not None:
                progress(engine.Progress("mcmc", int(self.steps - self.left.max()), int(self.steps),
                                         int(np.sum(self.left > 0))))
        self.saved = None
        return state

    def _arrivals(self, state: RunState) -> RunState:
        """Run segments for the chains arriving at them, earliest segment first.

        Joining the token loop and settling cost no LM call and run at once. A segment that does (forced text,
        a host step, a hole run on its own) waits until its group is worth a call: until the chains waiting at
        such segments are at least ``FLUSH`` of the moving chains, or no chain is left decoding; then every
        waiting chain is run (a *flush*). Waiting only changes when a move runs, never what it draws."""
        flushing = False
        while True:
            pend = (self.at >= 0) & ~self.inside
            if not pend.any():
                return state
            cheap = pend & self.joins_at_once[np.minimum(self.at, self.end)]
            if cheap.any():
                j = int(self.at[cheap].min())
                rows = cheap & (self.at == j)
                state = self.settle(state, rows) if j >= self.end else self._enter(state, j, rows)
                continue
            moving = int(np.sum(self.at >= 0))
            flushing = flushing or not self.inside.any() or pend.sum() >= FLUSH * moving
            if not flushing:
                return state
            j = int(self.at[pend].min())
            state = self._enter(state, j, pend & (self.at == j))

    def _step(self, state: RunState) -> RunState:
        """One chunk of the token loop for every chain inside a hole."""
        run = self.run
        hp = HoleParams(start=self.no_start, hole=to_device(self.hole_of), max_tokens=to_device(self.max_tokens),
                        max_steps=to_device(self.max_steps), pause=self.no_pause)
        state = run.call(run.kern.hole_chunk, run.lm.params, run.consts, hp, state)[0]
        self.chunks += 1
        done, cause = (np.asarray(a) for a in jax.device_get((state.particles.done, state.particles.cause)))
        fin = self.inside & (done | (cause != 0))
        self.inside &= ~fin
        self.at[fin] = np.where(cause[fin] == 0, self.at[fin] + 1, self.end)
        return state

    # ---- one segment for the chains arriving at it ------------------------------------------------------

    def _enter(self, state: RunState, j: int, rows: np.ndarray) -> RunState:
        run, s, seg = self.run, self.s, self.segs[j]
        at_start = rows & self.cut & (self.tok < 0)
        if at_start.any():  # a cut at a host step: back to the segment's start, host data as it was there
            state = run.call(run.kern.resume_segment, state, jnp.asarray(at_start), jnp.int32(j),
                             jnp.int32(self.first_hole[j]), jnp.int32(s.prefix[-1]))
            ids = np.asarray(jax.device_get(state.particles.trace.seg_data[:, j]))
            state = run.sync_data(state)
            for i in np.flatnonzero(at_start):
                run.data[i] = dict(run.registry[int(ids[i])])
        resume = rows & (self.tok >= 0)  # a cut inside hole j, just before token tok
        fresh = rows & ~resume
        tok = self.tok.copy()
        self.cut[rows], self.tok[rows] = False, -1
        if fresh.any():
            state = snapshot(run, state, j, fresh)
        run.only = rows
        try:
            if self.joins_at_once[j]:
                state = self._begin(state, j, seg, fresh, resume, tok)
            elif type(seg) is Hole:
                held = self.inside.copy()
                state, kept = run.call(run.kern.hold, state, jnp.asarray(held))
                part = Part(running=fresh, resume=resume if resume.any() else None, resume_at=tok)
                state, _ = engine.WALKERS[Hole](run, state, s, j, seg, part, s.pos0, False, None)
                state = run.call(run.kern.release, state, kept, jnp.asarray(held))
                self.at[rows] = j + 1
            elif type(seg) in (Text, Observe):
                state = self._feed(state, seg, fresh)
                self.at[rows] = j + 1
            else:
                state, _ = engine.WALKERS[type(seg)](run, state, s, j, seg, Part(running=fresh), s.pos0, False, None)
                self.at[rows] = j + 1
        finally:
            run.only = None
        dead = rows & ~self.inside & (np.asarray(jax.device_get(state.particles.cause)) != 0)
        self.at[dead] = self.end  # a proposal that died: rejected at the end, nothing more to run for it
        return state

    def _begin(self, state: RunState, j: int, seg: Hole, fresh, resume, tok) -> RunState:
        """Chains arriving at hole ``seg`` join the shared token loop (``resume``: inside it, at ``tok``)."""
        run, s = self.run, self.s
        h = run.program.hole_index(seg.name)
        budget_ = budget(seg, run.strategy)
        rows = fresh | resume
        self.hole_of[rows], self.max_tokens[rows], self.max_steps[rows] = h, budget_, budget_ + s.slack
        if fresh.any():
            state, hp = hole_params(run, state, h, seg, budget_, s.slack)
            hp = hp._replace(max_tokens=to_device(self.max_tokens), max_steps=to_device(self.max_steps))
            state = run.call(run.kern.begin_hole, state, hp, jnp.asarray(fresh))
        if resume.any():
            state = run.call(run.kern.resume_hole, state, jnp.asarray(resume), jnp.asarray(tok, jnp.int32),
                             jnp.full((run.num,), h, jnp.int32), jnp.int32(s.prefix[-1]))
        done = np.asarray(jax.device_get(state.particles.done))
        self.inside |= rows & ~done
        self.at[rows & done] = j + 1  # the hole skipped (a branch not taken) or a chain dead on arrival
        return state

    def _feed(self, state: RunState, seg, fresh: np.ndarray) -> RunState:
        """Forced text for the chains in ``fresh`` only: their rows through the LM, in blocks of a power of two."""
        run, s = self.run, self.s
        state, rows = engine.forced_rows(run, state, seg)
        idx = np.flatnonzero(fresh)
        longest = max((len(rows[i]) for i in idx), default=0)
        if longest == 0:
            return state
        k = min(round_pow2(len(idx), 1), run.num)
        pos = np.asarray(jax.device_get(state.particles.position))
        for c0 in range(0, longest, FEED_CHUNK):
            width = min(FEED_CHUNK, longest - c0)
            tpad = min(round_pow2(width, 8), s.cache_len - int(pos[idx].max()) - c0)
            for b0 in range(0, len(idx), k):
                block = idx[b0 : b0 + k]
                ids = np.full((k,), run.num, np.int32)
                ids[: len(block)] = block
                toks = np.zeros((k, tpad), np.int32)
                lens = np.zeros((k,), np.int32)
                for r, i in enumerate(block):
                    piece = rows[i][c0 : c0 + width]
                    toks[r, : len(piece)] = piece
                    lens[r] = len(piece)
                state = run.call(run.kern.feed_some, run.lm.params, run.consts, state, to_device(ids),
                                 to_device(toks), to_device(lens), observe=type(seg) is Observe)
        return state

    # ---- the end of a move -------------------------------------------------------------------------

    def settle(self, state: RunState, fin: np.ndarray) -> RunState:
        """Accept or reject the chains in ``fin`` (their proposals have reached the end of the program), record
        their states and start their next moves."""
        run, num = self.run, self.run.num
        state = snapshot(run, state, self.end, fin)
        p = state.particles
        cause, p_lw, p_spans = (np.asarray(a) for a in jax.device_get((p.cause, p.lw_total, p.spans)))
        n_y = self.sites.count(p_spans)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_alpha = (p_lw.astype(np.float64) - self.lw) + np.log(self.n) - np.log(np.maximum(n_y, 1))
        log_alpha = np.where((cause == 0) & np.isfinite(p_lw), log_alpha, -np.inf)
        u = np.ones((num,))
        u[fin] = self.rng.random(int(fin.sum()))
        acc = fin & (np.log(np.maximum(u, 1e-300)) < log_alpha)
        rej = fin & ~acc
        self.accepted += acc
        self.left[fin] -= 1
        self.at[fin] = -1
        self.lw[acc], self.n[acc], self.spans[acc] = p_lw[acc], n_y[acc], p_spans[acc]
        for i in np.flatnonzero(rej):
            run.data[i] = self.kept_data[i]
        state, self.saved = run.call(exchange(run.kern), state, self.saved, jnp.asarray(rej), jnp.asarray(acc))
        for i in np.flatnonzero(acc):
            self.kept_data[i] = dict(run.data[i])
        state = self._record(state, fin)
        return self._next_moves(state, fin & (self.left > 0))

    def _next_moves(self, state: RunState, rows: np.ndarray) -> RunState:
        """Draw the next cut of the chains in ``rows``; a chain without sites has every move rejected at once
        (its proposal is its state)."""
        idle = rows & (self.n == 0)
        while idle.any():
            self.left[idle] -= 1
            state = self._record(state, idle)
            idle &= self.left > 0
        go = rows & (self.n > 0)
        cuts = self.sites.choose(self.rng, self.spans, self.n, go)
        self.at[go], self.tok[go], self.cut[go] = cuts.seg[go], cuts.tok[go], True
        return state

    def _record(self, state: RunState, rows: np.ndarray) -> RunState:
        """Record the chains in ``rows`` whose last finished move is kept (past ``burn_in``)."""
        keep = rows & (self.steps - self.left - 1 >= self.burn_in)
        if keep.any():
            state = self.rec.add_chains(self.run, state, np.flatnonzero(keep))
        return state


def rolling_moves(run: Run, state: RunState, s: Setup, rng: np.random.Generator, sites: Sites, steps: int,
                  burn_in: int, rec: Recorder, progress=None) -> tuple[RunState, Schedule]:
    """``steps`` suffix MH moves for every chain, rolling (module docstring); the state after each move past
    the first ``burn_in`` goes to ``rec`` (:meth:`Recorder.add_chains`). ``run``'s kernels must trace and must
    not resample; their ``chunk`` is how often the host looks at the chains (``moves.MOVE_CHUNK``). Returns
    the state and the :class:`Schedule` (acceptances, decode chunks)."""
    sched = Schedule(run, s, rng, sites, steps, burn_in, rec)
    return sched.run_moves(state, progress), sched
