"""Exact enumeration of finite holes: every completion scored at once, the value drawn from its exact
conditional, the weight multiplied by the total mass.

A hole's *token language* is the set of token paths the token-by-token kernel can generate for it: from its
start state, every token of ``table.mask(state, counts, max_tokens)`` while fewer than ``max_steps`` tokens
were taken, ending on the first token after which ``table.done`` holds (automaton, counters, budget and the
terminator, text or EOS, included: a token that straddles into the following text is one of the paths). When
that set is finite and small (:func:`build_trie`, at most :data:`MAX_NODES` trie nodes), the hole is
*enumerated*: for every particle ``i`` (history ``h_i``) the engine computes

    log p(x | h_i)   for every path x          (a token trie shared by the paths: one batched LM call per
                                                trie level and block, all particles at once)
    Z_i = sum_x p(x | h_i)                     (the total mass of the hole's language)

then draws ``x_i ~ p(x | h_i) / Z_i`` and sets ``log_weight += log Z_i``. This is the exact conditional of the
hole given the history, so the proposal has zero variance for that hole, and the weight ``Z_i`` is the
token-by-token kernel's expected weight (the sum over the same paths of their probabilities): the target does
not change. Paths through a token the LM gives probability 0 have mass 0, as token by token.

Particles with the same history (equal ``(row, last, position)``: :class:`~lmprog.inference.state.Particles`)
share one set of trie rows (a *class*): the scratch cache holds ``classes x fed nodes`` rows (root and inner
nodes; leaves are scored from their parent's logits and never fed). After the draw each particle gets its own
cache row, the copy of its drawn path's last fed node, and its tokens go through
:meth:`~lmprog.inference.kernel.Kernels._advance` one by one (automaton, counters, spans, scores and the MCMC
trace are those of the token loop).

Where it applies (:func:`plan`): properly weighted strategies that sample (``importance``, ``smc``, ``mcmc``,
``particle_gibbs``; not ``sample``, the locally-constrained baseline, nor ``greedy``/``beam``, which are not
samplers of the target), holes on the device path without a per-token host check, every entering particle at
the same start state, the strategy's ``enumerate`` option on (default). Particle Gibbs'
reference replays its own path (the one that matches its recorded tokens) with the same total-mass weight.
MCMC suffix moves cut an enumerated hole only at its start (:mod:`lmprog.inference.moves`: the hole is one
site).

**Pruning** (untraced runs, :data:`PRUNE`): only trie nodes that carry mass are fed; a particle draws among the
complete paths under them and the *frontier* nodes left unexpanded (in proportion to their probabilities,
``log_weight += log M`` with ``M`` their total), and a frontier draw goes on token by token from its node
(``engine.token_loop``): unbiased and properly weighted, with proposal variance only in the frontier's share
of ``M`` (docs/inference.md, "Pruning").

**Rao-Blackwellization.** Each enumerated particle keeps its table ``p(x | h_i) / Z_i`` (aggregated over paths
with the same value) in its host data under :data:`TABLE_KEY`. When nothing after the hole is scored (only
text follows it), that table is the exact conditional of the hole given everything else in the particle, so the
posterior of the hole is ``sum_i w_i table_i`` instead of ``sum_i w_i [x_i = v]``
(:meth:`lmprog.result.Result.distribution`).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lmprog.backends.jax_setup import round_pow2, to_device
from lmprog.inference.aot import DiskJit
from lmprog.inference import holes, resampling
from lmprog.inference.kernel import NEG_INF, TRACE_COUNTS
from lmprog.inference.segments import Cause, Hole, Text
from lmprog.paths import cache_dir, save_npz

__all__ = ["MAX_NODES", "MAX_ROWS", "TABLE_KEY", "Trie", "build_trie", "plan", "rao_blackwell_holes",
           "walk_hole"]

#: The most trie nodes a hole may have to be enumerated (paths and inner nodes; SmolLM2's three-way choice
#: " positive"/" negative"/" neutral" + "\n" has 1244: every tokenization of every label).
MAX_NODES = 4096
#: The most scratch cache rows (``classes x fed nodes``) an enumerated hole may use; the memory pre-flight
#: counts this many rows (``memory.estimate``).
MAX_ROWS = 1024
#: The most fed nodes per LM call (rows of one block).
BLOCK = 256
#: The most tokens of one path (longer languages are left to the token loop).
MAX_DEPTH = 32
#: Untraced runs expand a trie node only when its probability is at least this fraction of the likeliest node
#: or path of its class (:func:`_enumerate`); what falls under it continues token by token. Chosen by
#: measurement (benchmarks/bench_enumerate.py, docs/performance.md): every tokenisation of a label is a path,
#: and all but the canonical few carry almost no mass.
PRUNE = 1e-4
#: Traced runs expand the whole trie (one fixed proposal per site): only tries of at most this many fed nodes,
#: about the rows a token loop of a few dozen particles feeds for a short hole; larger ones go token by token.
TRACED_MAX_FED = 128
#: Host data key of a particle's conditional tables: ``{hole name: (values, probabilities)}``.
TABLE_KEY = "__enumerated__"


class Trie(NamedTuple):
    """A hole's token language from one start state, as a trie (host arrays, root = node 0).

    ``parent [N]`` (-1 for the root), ``token [N]``, ``depth [N]``; ``fed [F]``: the nodes fed to the LM (the
    root, then every node with children, by depth), ``fed_of [N]`` their index in ``fed`` (-1: not fed);
    ``leaves [K]``: the complete paths' last nodes; ``path_tokens [K, L]`` / ``path_nodes [K, L]`` their tokens
    and nodes (padded with 0), ``path_len [K]``; ``fed_tokens [F, L]`` / ``fed_nodes [F, L]`` the same for the
    path to every fed node (``depth[fed]`` long: where a pruned walk hands a particle to the token loop);
    ``values``: the distinct values of the paths, ``value_of [K]`` the index of each path's value."""

    parent: np.ndarray
    token: np.ndarray
    depth: np.ndarray
    fed: np.ndarray
    fed_of: np.ndarray
    leaves: np.ndarray
    path_tokens: np.ndarray
    path_nodes: np.ndarray
    path_len: np.ndarray
    fed_tokens: np.ndarray
    fed_nodes: np.ndarray
    values: tuple
    value_of: np.ndarray

    @property
    def num_nodes(self) -> int:
        return int(self.parent.shape[0])

    @property
    def max_len(self) -> int:
        return int(self.path_len.max(initial=0))


BLOCK_SIZES = (16, 64, BLOCK)


def _blocks(entries: int) -> list:
    """Rows of the LM calls for a trie level of ``entries`` fed nodes: sizes from :data:`BLOCK_SIZES` (few shapes
    to compile), each call at least half full (the smallest size that holds the rest if it is, else the largest
    that the rest fills), so padding stays under 2x and small levels take small calls."""
    out, rest = [], entries
    while rest > 0:
        fits = [b for b in BLOCK_SIZES if b >= rest]
        full = [b for b in BLOCK_SIZES if b <= rest]
        b = fits[0] if fits and (fits[0] <= 2 * rest or not full) else max(full)
        out.append(b)
        rest -= b
    return out


def _pad(a: np.ndarray, n: int, fill) -> np.ndarray:
    out = np.full((n,) + a.shape[1:], fill, a.dtype)
    out[: a.shape[0]] = a
    return out


@jax.jit
def _table_mask(table, states, counts, max_tokens):
    return table.mask(states, counts, max_tokens)


@jax.jit
def _table_step(table, states, counts, tokens):
    ns, nc = table.step(states, counts, tokens)
    return ns, nc, table.done(ns, nc)


def _allowed(table, states: np.ndarray, counts: np.ndarray, max_tokens: int, chunk: int = 256):
    """``(row, token)`` of every allowed token of every ``(state, counts)`` row (``table.mask``), in row order,
    ``chunk`` rows per call (bounds the ``[rows, V]`` mask)."""
    rows, toks = [], []
    for a in range(0, states.shape[0], chunk):
        st, cn = states[a : a + chunk], counts[a : a + chunk]
        n = round_pow2(st.shape[0], 8)
        m = np.asarray(_table_mask(table, jnp.asarray(_pad(st, n, -1)), jnp.asarray(_pad(cn, n, 0)),
                                   jnp.int32(max_tokens)))[: st.shape[0]]
        r, t = np.nonzero(m)
        rows.append(r + a)
        toks.append(t)
    return np.concatenate(rows), np.concatenate(toks)


def build_trie(table, start: int, max_tokens: int, max_steps: int, max_nodes: int = MAX_NODES):
    """The trie of the token paths from ``start`` (see the module docstring), or ``None`` when it has more than
    ``max_nodes`` nodes, a path longer than :data:`MAX_DEPTH`, or no complete path. Level by level: one batched
    ``table.mask`` / ``table.step`` / ``table.done`` per level for the whole frontier."""
    parent, token, depth, leaf = [-1], [-1], [0], [False]
    front = np.array([0], np.int64)
    states = np.array([start], np.int32)
    counts = np.zeros((1, 3), np.int32)
    d = 0
    while front.size:
        if d >= max_steps:  # the hard cap: these prefixes cannot finish (the token loop would die there)
            break
        if d >= MAX_DEPTH:
            return None
        rows, toks = _allowed(table, states, counts, max_tokens)
        if len(parent) + rows.size > max_nodes:
            return None
        if rows.size == 0:
            break
        k = round_pow2(rows.size, 8)
        ns, nc, done = _table_step(table, jnp.asarray(_pad(states[rows], k, -1)), jnp.asarray(_pad(counts[rows], k, 0)),
                                   jnp.asarray(_pad(toks.astype(np.int32), k, 0)))
        done = np.asarray(done)[: rows.size]
        ns, nc = np.asarray(ns)[: rows.size], np.asarray(nc)[: rows.size]
        ids = np.arange(len(parent), len(parent) + rows.size)
        parent += front[rows].tolist()
        token += toks.tolist()
        depth += [d + 1] * rows.size
        leaf += done.tolist()
        front, states, counts = ids[~done], ns[~done].astype(np.int32), nc[~done].astype(np.int32)
        d += 1
    parent, token, depth, leaf = (np.asarray(x) for x in (parent, token, depth, leaf))
    leaves = np.flatnonzero(leaf)
    if leaves.size == 0:
        return None
    has_child = np.zeros(parent.size, bool)
    has_child[parent[1:]] = True
    fed = np.flatnonzero(has_child)
    fed = fed[np.argsort(depth[fed], kind="stable")]
    fed_of = np.full(parent.size, -1, np.int64)
    fed_of[fed] = np.arange(fed.size)
    length = depth[leaves]
    width = int(length.max())

    def paths(ends):
        toks, nodes = np.zeros((ends.size, width), np.int32), np.zeros((ends.size, width), np.int32)
        for k, node in enumerate(ends):
            x = node
            for t in range(depth[node] - 1, -1, -1):
                toks[k, t], nodes[k, t] = token[x], x
                x = parent[x]
        return toks, nodes

    path_tokens, path_nodes = paths(leaves)
    fed_tokens, fed_nodes = paths(fed)
    return Trie(parent.astype(np.int32), token.astype(np.int32), depth.astype(np.int32), fed.astype(np.int32),
                fed_of.astype(np.int32), leaves.astype(np.int32), path_tokens, path_nodes,
                length.astype(np.int32), fed_tokens, fed_nodes, (), np.zeros(leaves.size, np.int32))


def _with_values(trie: Trie, tokenizer, hole: Hole) -> Trie:
    """The trie with its paths' values (``hole.value``'s rule), the distinct ones in order of first path."""
    index: dict = {}
    value_of = np.zeros(trie.leaves.size, np.int32)
    for k in range(trie.leaves.size):
        v = hole.value.of_tokens(tokenizer, [int(t) for t in trie.path_tokens[k, : trie.path_len[k]]])
        value_of[k] = index.setdefault(v, len(index))
    return trie._replace(values=tuple(index), value_of=value_of)


_TRIES: dict = {}
_DIGESTS: dict = {}


def _digest(table) -> str:
    """A content hash of a token table (every program lowering builds its own table object: equal tables of
    successive runs share their tries), memoized per table object."""
    hit = _DIGESTS.get(id(table))
    if hit is not None and hit[0] is table:
        return hit[1]
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(table):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    out = h.hexdigest()[:32]
    if len(_DIGESTS) > 64:
        _DIGESTS.clear()
    _DIGESTS[id(table)] = (table, out)
    return out


def _trie_path(key: str) -> Path:
    here = Path(__file__).resolve()
    source = b"".join(p.read_bytes() for p in (here, here.parents[1] / "automata" / "table.py",
                                               here.parents[1] / "automata" / "counters.py"))
    return cache_dir() / "tries" / f"{key}-{hashlib.sha256(source).hexdigest()[:12]}.npz"


def _load_trie(path: Path):
    """``(found, trie or None)`` from the disk cache (a trie too large to enumerate is cached as ``None``)."""
    try:
        with np.load(path) as z:
            if "none" in z.files:
                return True, None
            arrays = {f: z[f] for f in Trie._fields if f != "values"}
        return True, Trie(**arrays, values=())
    except Exception:  # missing, damaged or from an older layout: build it
        return False, None


def _save_trie(path: Path, trie) -> None:
    save_npz(path, {"none": np.zeros(0)} if trie is None else {f: getattr(trie, f) for f in Trie._fields if f != "values"})


def trie_for(table, tokenizer, hole: Hole, start: int, budget: int, max_steps: int):
    """:func:`build_trie` for ``hole`` of a program whose token table is ``table``, with its paths' values:
    cached in memory (per table content, start, budget, cap and value rule) and on disk (``cache_dir()/tries``,
    the trie without its values), ``None`` cached too. Building one calls the table level by level (about a
    second for a label choice on SmolLM2's vocabulary); a warm run finds it."""
    key = f"{_digest(table)}-{start}-{budget}-{max_steps}-{MAX_NODES}"
    mem_key = (key, id(tokenizer), repr(hole.value))
    hit = _TRIES.get(mem_key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    path = _trie_path(key)
    found, trie = _load_trie(path)
    if not found:
        trie = build_trie(table, start, budget, max_steps)
        _save_trie(path, trie)
    if trie is not None:
        trie = _with_values(trie, tokenizer, hole)
    if len(_TRIES) > 256:
        _TRIES.clear()
    _TRIES[mem_key] = (tokenizer, trie)
    return trie


def _run_trie(run, hole: Hole, start: int, budget: int):
    return trie_for(run.program.table, run.lm.tokenizer, hole, start, budget, budget + holes.slack(run.program.table))


# ------------------------------------------------------------------------------------------------------
# Where it applies
# ------------------------------------------------------------------------------------------------------


def strategy_enumerates(strategy, cfg) -> bool:
    """Whether runs of ``strategy`` with kernels ``cfg`` enumerate finite holes: properly weighted samplers
    (weighted, select ``sample``), with the strategy's ``enumerate`` option on."""
    return (bool(getattr(strategy, "enumerate", True)) and bool(strategy.properly_weighted)
            and cfg.weighted and cfg.select == "sample")


def enumerable(hole: Hole, program=None) -> bool:
    """Holes the enumeration may take: on the device path, without a per-token host check, in a program whose
    holes all run on the device (a host-matcher table is bound per run)."""
    return (hole.path == "device" and hole.prefix_check is None
            and (program is None or not hasattr(program.table, "bind")))


def rao_blackwell_holes(program) -> set:
    """Names of the holes whose conditional table is the exact conditional given the rest of the program:
    nothing after them is scored (only text follows)."""
    out = set()
    segs = program.segments
    for j, seg in enumerate(segs):
        if type(seg) is Hole and all(type(s) is Text for s in segs[j + 1:]):
            out.add(seg.name)
    return out


class Plan(NamedTuple):
    trie: Trie
    hp: object  # HoleParams
    budget: int


def static_start(hole: Hole) -> int | None:
    """The hole's start state when it is the same for every particle (no guard), else ``None``."""
    return int(hole.start) if isinstance(hole.start, (int, np.integer)) else None


def traced_enumerates(run, hole: Hole) -> bool:
    """For kernels that trace (MCMC moves, particle Gibbs, rejuvenation): whether ``hole`` is enumerated in
    every walk. The decision depends on the hole and the particle count only (a static start, the trie within
    :data:`MAX_NODES`, every particle its own class within :data:`MAX_ROWS`), never on the particles' states,
    so the moves' proposal is one fixed kernel and the hole is one site (:class:`lmprog.inference.moves.Sites`)."""
    if not (strategy_enumerates(run.strategy, run.kern.cfg) and enumerable(hole, run.program)):
        return False
    start = static_start(hole)
    if start is None:
        return False
    budget = holes.budget(hole, run.strategy)
    trie = _run_trie(run, hole, start, budget)
    return trie is not None and trie.fed.size <= TRACED_MAX_FED and trie.fed.size * run.num <= MAX_ROWS


def plan(run, state, s, j: int, seg: Hole, part):
    """``(state, Plan or None)``: whether hole ``seg`` (segment ``j``) is enumerated in this walk: the strategy
    and the hole allow it, every entering particle starts in the same state, the trie is small enough and its
    classes fit :data:`MAX_ROWS` scratch rows, and no particle resumes inside the hole or pauses in it."""
    if not (strategy_enumerates(run.strategy, run.kern.cfg) and enumerable(seg, run.program)):
        return state, None
    traced = run.kern.cfg.trace
    if traced and not traced_enumerates(run, seg):
        return state, None
    h = run.program.hole_index(seg.name)
    budget = holes.budget(seg, run.strategy)
    state, hp = holes.hole_params(run, state, h, seg, budget, s.slack)
    p = state.particles
    start, cause, row, last, position, spans = (np.asarray(a) for a in jax.device_get(
        (hp.start, p.cause, p.row, p.last, p.position, p.spans)))
    resume = part.resume if part.resume is not None else np.zeros(run.num, bool)
    enter = part.running & (start >= 0) & (cause == 0)
    starts = np.unique(start[(enter | resume) & (start >= 0)])
    if starts.size != 1:
        return state, None
    trie = _run_trie(run, seg, int(starts[0]), budget)
    if trie is None:
        return state, None
    if part.pause is not None and part.pause < trie.max_len:
        return state, None  # a move that stops inside the hole: the token loop's intermediate targets
    if resume.any() and np.any(resume & (np.asarray(part.resume_at) != spans[:, h, 0])):
        return state, None  # a cut inside the hole: the token loop resumes it there
    if not traced:
        classes = len({(int(row[i]), int(last[i]), int(position[i])) for i in np.flatnonzero(enter)})
        if trie.fed.size * (classes + int(resume.sum())) > MAX_ROWS:
            return state, None
    return state, Plan(trie, hp, budget)


# ------------------------------------------------------------------------------------------------------
# The walker
# ------------------------------------------------------------------------------------------------------


def walk_hole(run, state, s, j: int, seg: Hole, part, pos_bound: int, check: bool, on_resample, pl: Plan,
              token_loop):
    """Generate hole ``seg`` by enumeration for every running particle (``engine._walk_hole``'s contract);
    ``token_loop`` (``engine.token_loop``) continues the particles a pruned enumeration left inside the hole."""
    kern, num, trie = run.kern, run.num, pl.trie
    h = run.program.hole_index(seg.name)
    hp = pl.hp
    if not part.everyone:
        hp = hp._replace(start=jnp.where(jnp.asarray(part.running), hp.start, -1))
    state = run.call(kern.begin_hole, state, hp)
    if part.resume is not None and part.resume.any():
        state = run.call(kern.resume_hole, state, jnp.asarray(part.resume), jnp.asarray(part.resume_at, jnp.int32),
                         jnp.full((num,), h, jnp.int32), jnp.int32(s.prefix[-1]))
    fns = _functions(kern)
    rb = seg.name in rao_blackwell_holes(run.program)
    # Traced kernels (MCMC moves, particle Gibbs, rejuvenation) keep one fixed proposal per site and may resume
    # a chain inside the hole: they enumerate the whole trie.
    untraced = not run.kern.cfg.trace
    prune = PRUNE if untraced else 0.0
    info = run.enumerated.setdefault(seg.name, {"paths": int(trie.leaves.size), "values": len(trie.values),
                                                "trie_nodes": trie.num_nodes, "rao_blackwellized": rb,
                                                "lm_calls": 0, "lm_rows": 0, "prune": prune, "token_loop": 0,
                                                "frontier_mass": 0.0})
    k_paths = int(trie.leaves.size)
    if untraced and kern.cfg.resampler is not None:  # SMC: resample on the weights the previous segments set
        state, ess, res, gen = run.call(kern.resample_check, run.consts, hp, state)
        run.note_genealogy(j, res, 1, gen)
        run.ess.append((ess, res, 1))
        if on_resample is not None and bool(np.asarray(res).any()):
            state = on_resample(state, j, 0)
    p = state.particles
    done, cause, row, last, position = (np.asarray(a) for a in jax.device_get(
        (p.done, p.cause, p.row, p.last, p.position)))
    going = ~done & (cause == 0)
    left = np.zeros(num, bool)
    if going.any():
        state = run.sync_data(state)  # tables are written by pre-resampling index (follow `origin`)
        state, table, alive, left, share, calls, rows = _enumerate(run, fns, state, hp, trie, going, row, last,
                                                                   position, prune)
        info["frontier_mass"] = max(info["frontier_mass"], share)
        info["lm_calls"] += calls
        info["lm_rows"] += rows
        info["token_loop"] += int(left.sum())
        ess, res = table[1], table[2]
        run.ess.append((ess, res, 1))
        probs = table[0][:, :k_paths]
        by_value = np.zeros((num, len(trie.values)))
        np.add.at(by_value.T, trie.value_of, probs.T)
        for i in np.flatnonzero(alive):
            tables = {k: v for k, v in run.data[i].get(TABLE_KEY, {}).items() if k != seg.name}
            if not left[i]:  # a frontier draw has no table: its own value stands for its conditional
                tables[seg.name] = (trie.values, by_value[i])
            run.data[i] = {**run.data[i], TABLE_KEY: tables}
    if left.any():
        state = token_loop(run, state, s, j, seg, hp, pl.budget, on_resample)
    if run.progress is not None:
        run.progress(holes.Progress(seg.name, trie.max_len, pl.budget, 0))
    pos_bound += holes.room(seg, run.strategy, s.slack)
    if np.any(np.asarray(jax.device_get(state.particles.cause)) == int(Cause.DEAD)):
        state = run.call(kern.refine_causes, run.consts, hp, state)
    if check:
        run.check_alive(state, j, seg)
    return state, pos_bound


def _enumerate(run, fns, state, hp, trie: Trie, going, row, last, position, prune: float = 0.0):
    """One enumeration for the particles in ``going``: returns ``(state, (table [P, K], ess, resampled),
    alive [P], left [P], frontier share, LM calls, LM rows)``; ``left``: particles handed to the token loop inside
    the hole; the largest share of a particle's ``M`` its frontier nodes hold.

    ``prune > 0`` expands only the trie nodes whose probability (from the hole's start, given the class's
    history) is at least ``prune`` times the likeliest node or path scored so far in the class; the others are
    the *frontier*. A particle draws among the complete paths under expanded nodes and the frontier nodes, with
    probabilities proportional to ``p(path)`` and ``p(node)``, and its weight is multiplied by their total ``M``.
    A frontier draw continues token by token from its node (the token loop's masked proposal and weights), so
    its weight estimates ``M`` times the node's completion mass: the estimate of ``Z`` stays unbiased and the
    particles properly weighted; only the frontier's share of ``M`` has proposal variance."""
    num = run.num
    keys = np.stack([row, last, position], axis=1)[going]
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    n_cls = uniq.shape[0]
    f, n_nodes = trie.fed.size, trie.num_nodes
    cls = np.full((num,), 0, np.int32)
    cls[going] = inv.reshape(-1)
    rep_row, rep_last, rep_pos = uniq[:, 0], uniq[:, 1], uniq[:, 2]
    s_rows = round_pow2(n_cls * f, 8)
    n_lp = round_pow2(n_cls * n_nodes, 8)
    # Scratch row c * F + q starts as a copy of class c's cache row (its history before `last`).
    init_rows = _pad(np.repeat(rep_row, f).astype(np.int32), s_rows, 0)
    scratch = run.call(fns["init"], state.cache, to_device(init_rows))
    node_lp = jnp.zeros((n_lp,), jnp.float32)
    # Blocks: fed nodes level by level (a child copies its parent's row, fed in an earlier block).
    fed, fed_of, parent, depth, token = trie.fed, trie.fed_of, trie.parent, trie.depth, trie.token
    children = [[] for _ in range(f)]
    for node in range(1, n_nodes):
        children[fed_of[parent[node]]].append(node)
    max_children = max(len(c) for c in children)
    expanded = np.zeros((n_cls, f), bool)  # fed node q of class c was fed (its children scored)
    scored = np.zeros((n_cls, n_nodes), bool)  # node_lp holds the node's log-probability
    scored[:, 0] = True
    log_cut = math.log(prune) if prune > 0 else -math.inf
    calls = rows = 0
    for d in np.unique(depth[fed]):
        level = fed[depth[fed] == d]
        take = scored[:, level]
        if prune > 0 and d > 0:
            lp = np.asarray(jax.device_get(node_lp), np.float64)[: n_cls * n_nodes].reshape(n_cls, n_nodes)
            best = np.where(scored[:, 1:], lp[:, 1:], -np.inf).max(axis=1, initial=-np.inf)
            take = take & (lp[:, level] >= best[:, None] + log_cut)
        cs, qs = np.nonzero(take)
        entries = list(zip(cs.tolist(), level[qs].tolist()))
        for c, q in entries:
            expanded[c, fed_of[q]] = True
            scored[c, children[fed_of[q]]] = True
        e0 = 0
        for b in _blocks(len(entries)):
            blk = entries[e0 : e0 + b]
            e0 += b
            cw = round_pow2(max_children * b, 8)  # per block size: one shape per trie and block size
            src = np.full(b, s_rows, np.int32)
            dst = np.full(b, s_rows, np.int32)
            tok = np.zeros(b, np.int32)
            pos = np.zeros(b, np.int32)
            lp_at = np.zeros(b, np.int32)
            ch_local = np.zeros(cw, np.int32)
            ch_tok = np.zeros(cw, np.int32)
            ch_node = np.full(cw, n_lp, np.int32)
            k = 0
            for r, (c, q) in enumerate(blk):
                fq = fed_of[q]
                dst[r] = c * f + fq
                src[r] = dst[r] if q == 0 else c * f + fed_of[parent[q]]
                tok[r] = rep_last[c] if q == 0 else token[q]
                pos[r] = rep_pos[c] + depth[q]
                lp_at[r] = c * n_nodes + q
                for m in children[fq]:
                    ch_local[k], ch_tok[k], ch_node[k] = r, token[m], c * n_nodes + m
                    k += 1
            scratch, node_lp = run.call(fns["block"], run.lm.params, run.consts, scratch, node_lp,
                                        *map(to_device, (src, dst, tok, pos, lp_at, ch_local, ch_tok, ch_node)))
            calls += 1
            rows += b
    # Candidates: the complete paths (K), then the fed nodes (F) as frontier nodes.
    leaf_parent = fed_of[parent[trie.leaves]].astype(np.int32)
    fed_parent = np.where(fed == 0, 0, fed_of[np.maximum(parent[fed], 0)]).astype(np.int32)
    cand_tokens = np.concatenate([trie.path_tokens, trie.fed_tokens])
    cand_nodes = np.concatenate([trie.path_nodes, trie.fed_nodes])
    cand_len = np.concatenate([trie.path_len, depth[fed]]).astype(np.int32)
    cand_node = np.concatenate([trie.leaves, fed]).astype(np.int32)
    cand_from = np.concatenate([leaf_parent, fed_parent])  # the fed node whose scratch row the cache copies
    exp_flat = _pad(expanded.reshape(-1), s_rows, False)
    state, table, alive, left, share, ess, res = run.call(
        fns["finish"], run.consts, hp, state, scratch, node_lp, to_device(cls), to_device(np.asarray(going)),
        to_device(exp_flat), to_device(cand_node), to_device(cand_from), to_device(cand_tokens),
        to_device(cand_nodes), to_device(cand_len), to_device(np.int32(trie.leaves.size)),
        to_device(np.int32(n_nodes)), to_device(np.int32(f)), to_device(np.int32(calls)), to_device(np.int32(rows)))
    table, alive, left, share = (np.asarray(a) for a in jax.device_get((table, alive, left, share)))
    return state, (table, ess, res), alive, left, float(share.max(initial=0.0)), calls, rows


# ------------------------------------------------------------------------------------------------------
# Device functions
# ------------------------------------------------------------------------------------------------------

_FUNCTIONS: dict = {}


def _functions(kern) -> dict:
    """The jitted enumeration functions of kernels ``kern`` (cached): ``init``, ``block``, ``finish``."""
    hit = _FUNCTIONS.get(id(kern))
    if hit is not None and hit[0] is kern:
        return hit[1]
    lm, cfg = kern.lm, kern.cfg
    aot_key = getattr(lm, "aot_key", None)
    key = None if aot_key is None else f"{aot_key}|{cfg!r}|enumerate"

    def init(cache, rows):
        """Scratch rows: copies of the cache's ``rows``."""
        TRACE_COUNTS["enum_init"] += 1
        return lm.reorder(cache, rows)

    def block(params, consts, scratch, node_lp, src, dst, tok, pos, lp_at, ch_local, ch_tok, ch_node):
        """Feed one block of trie nodes: row ``dst[b]`` becomes a copy of its parent's row ``src[b]`` plus node
        ``b``'s token at ``pos[b]``; the log-probability of each child ``m`` of a fed node ``b`` is
        ``node_lp[b's node] + log p(token[m] | ...)`` (``ch_*``: ``(b, token, node)`` per child)."""
        TRACE_COUNTS["enum_block"] += 1
        v = consts.table.vocab_size
        scratch = lm.copy_rows(scratch, src, dst)
        logits, scratch = lm.apply(params, scratch, tok[:, None], pos, prefix=consts.prefix, rows=dst)
        logp = jax.nn.log_softmax(logits[:, 0, :v].astype(jnp.float32) / consts.temperature, axis=-1)
        base = node_lp[jnp.clip(lp_at, 0, node_lp.shape[0] - 1)]
        node_lp = node_lp.at[ch_node].set(base[ch_local] + logp[ch_local, ch_tok], mode="drop")
        return scratch, node_lp

    def finish(consts, hp, state, scratch, node_lp, cls, going, expanded, cand_node, cand_from, cand_tokens,
               cand_nodes, cand_len, n_paths, n_nodes, n_fed, n_calls, n_rows):
        """Per particle: the candidates' log-probabilities (complete paths under expanded nodes; frontier nodes:
        fed nodes not expanded under an expanded parent), ``log M = logsumexp``, a candidate drawn in proportion
        (or the one the recorded tokens follow), its tokens applied, its cache row copied from the scratch; then
        the ESS check of the token loop. A drawn frontier node leaves its particle inside the hole (``left``).
        Returns ``(state, table [P, K + F], alive [P], left [P], share [P], ess [1, G], resampled [1, G])``:
        ``table`` the particle's conditional over the complete paths of its expanded part (zero for a frontier
        draw; the first K columns), ``share`` the frontier nodes' share of ``M``."""
        TRACE_COUNTS["enum_finish"] += 1
        state = kern._compact(state)  # every particle in its own row i
        p = state.particles
        num = p.last.shape[0]
        rows = jnp.arange(num)
        k_all = cand_node.shape[0]
        key, k_draw = jax.random.split(state.key)
        at = lambda nodes: node_lp[jnp.clip(cls[:, None] * n_nodes + nodes, 0, node_lp.shape[0] - 1)]  # noqa: E731
        grown = lambda fq: expanded[jnp.clip(cls[:, None] * n_fed + fq, 0, expanded.shape[0] - 1)]  # noqa: E731
        is_path = jnp.arange(k_all)[None, :] < n_paths
        own = jnp.arange(k_all) - n_paths  # a frontier candidate's fed index
        ok = grown(cand_from[None, :]) & (is_path | ~grown(jnp.clip(own, 0, None)[None, :]) & (own > 0)[None, :])
        lps = jnp.where(ok, at(cand_node[None, :]), NEG_INF)  # [P, K + F]
        log_total = jax.nn.logsumexp(lps, axis=1)
        # Replay (particle Gibbs' reference, given sequences): the candidate the recorded tokens go through.
        width = cand_tokens.shape[1]
        ahead = p.tokens[rows[:, None], jnp.clip(p.length[:, None] + jnp.arange(width)[None, :], 0,
                                                 p.tokens.shape[1] - 1)]  # [P, L]
        inside = jnp.arange(width)[None, None, :] < cand_len[None, :, None]
        match = jnp.all((ahead[:, None, :] == cand_tokens[None]) | ~inside, axis=-1) & ok  # [P, K + F]
        forced = p.length < p.force_len
        drawn = jax.random.categorical(k_draw, jnp.where(jnp.isfinite(lps), lps, NEG_INF), axis=1)
        k = jnp.where(forced, jnp.argmax(match, axis=1), drawn).astype(jnp.int32)
        hit = jnp.where(forced, jnp.any(match, axis=1), True)
        alive = going & (log_total > NEG_INF) & hit
        died = going & ~alive
        left = alive & (k >= n_paths)
        path_lps = jnp.where(is_path, lps, NEG_INF)
        path_total = jax.nn.logsumexp(path_lps, axis=1)
        keep = alive & ~left
        table = jnp.where(keep[:, None], jnp.exp(path_lps - jnp.where(keep, path_total, 0.0)[:, None]), 0.0)
        # The drawn candidate's cache: its last fed node's scratch row (history, `last`, every token but the last).
        src = cls * n_fed + cand_from[k]
        dst = jnp.where(alive, rows, num)
        cache = jax.tree.map(lambda a, b: a.at[dst].set(b[jnp.clip(src, 0, b.shape[0] - 1)], mode="drop"),
                             state.cache, scratch)
        tokens, nodes, length = cand_tokens[k], cand_nodes[k], cand_len[k]
        inc0 = log_total if cfg.weighted else jnp.zeros_like(log_total)
        prev = jnp.zeros((num,), jnp.float32)
        cause = jnp.full_like(p.cause, int(Cause.DEAD))
        for t in range(width):
            on = alive & (t < length)
            cur = at(nodes[:, t : t + 1])[:, 0]
            lp_tok = jnp.where(on, cur - prev, 0.0)
            prev = cur
            p = kern._advance(consts, p, on, tokens[:, t], lp_tok, inc0 if t == 0 else jnp.zeros_like(inc0),
                              died if t == 0 else jnp.zeros_like(died), cause)
        state = state._replace(particles=p, cache=cache, key=key,
                               n_tokens=state.n_tokens + jnp.sum(jnp.where(alive, length, 0)),
                               n_forward=state.n_forward + n_calls, n_rows=state.n_rows + n_rows)
        # The token loop's ESS check after its last step: no particle runs any more, so it never resamples
        # here (weight changes are taken into account at the next hole's first step).
        g = cfg.groups
        ess = resampling.ess(p.log_weight.reshape(g, num // g))
        share = jnp.where(alive, -jnp.expm1(jnp.minimum(path_total - log_total, 0.0)), 0.0)  # the frontier's share of M
        return state, table, alive, left, share, ess[None], jnp.zeros((1, g), bool)

    fns = {"init": DiskJit(init, "enum_init", key),
           "block": DiskJit(block, "enum_block", key, donate_argnames=("scratch", "node_lp")),
           "finish": DiskJit(finish, "enum_finish", key, donate_argnames=("state", "scratch"))}
    _FUNCTIONS[id(kern)] = (kern, fns)
    return fns


def preflight_bytes(program, tokenizer, strategy, cfg, num: int, slot: int, own_len: int) -> int:
    """Device bytes enumerated holes may add to a run (the memory pre-flight, :mod:`lmprog.inference.memory`):
    the scratch cache of the largest trie (``min(num x fed nodes, MAX_ROWS)`` rows of ``own_len`` slots of
    ``slot`` bytes; :data:`MAX_ROWS` for a hole whose start is per particle), the copy that gives every particle
    its own row, and one block's logits (``BLOCK x V`` float32, x3)."""
    if not strategy_enumerates(strategy, cfg):
        return 0
    slack = holes.slack(program.table)
    rows = 0
    for hole in program.holes:
        if not enumerable(hole, program):
            continue
        start = static_start(hole)
        if start is None:
            rows = MAX_ROWS
            continue
        budget = holes.budget(hole, strategy)
        trie = trie_for(program.table, tokenizer, hole, start, budget, budget + slack)
        if trie is not None:
            rows = max(rows, min(MAX_ROWS, num * int(trie.fed.size)))
    if not rows:
        return 0
    return (rows + num) * own_len * slot + BLOCK * program.vocab * 4 * 3
