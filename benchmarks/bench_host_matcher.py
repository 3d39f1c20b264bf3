"""Per-token cost of the host matcher (context-free holes through llguidance) on the default model's vocabulary.

    python benchmarks/bench_host_matcher.py [--particles 64] [--steps 40] [--model smollm2-135m] [--no-decode]
                                            [--pool-steps 2000]

Prints (medians), per decode step for ``--particles`` particles (each a random walk through the language, so the states
are distinct): the host pool's batched mask call (llguidance's thread pool, masks for every distinct state in
one call), its step call (one matcher copy + consume per distinct (state, token)), and the whole jitted
``HostTable.mask`` (callback, packed-bit transfer and unpacking on the device), for

* a recursive JSON Schema (a tree of nodes: the host path, the only one it can take);
* a regular JSON Schema on the device path (``TokenTable.mask``, jitted) and the same schema forced onto the
  host path (``compile_hole(..., path="host")``).

With the model (unless ``--no-decode``): one decode step of the LM at batch ``--particles`` (``lm.apply`` of one
token per row, jitted, cache warm), the reference the mask cost is compared with (target: <= 10 %).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

TREE = {"$defs": {"node": {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
    "required": ["name"], "additionalProperties": False}}, "$ref": "#/$defs/node"}
FLAT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                                  "maxItems": 3}},
        "required": ["name", "age"], "additionalProperties": False}


def _timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return time.perf_counter() - t0, out


def host_walk(tok, schema, particles, steps, seed=0, path="host", restart=False):
    """Random walks of ``particles`` particles through the host hole; per-step mask / step / jitted-mask times
    (``restart``: a walk that ends starts the hole again, so every step has ``particles`` live walks)."""
    import jax
    import jax.numpy as jnp

    from lmprog.compiler.constraint_ir import JsonSchema
    from lmprog.compiler.constraints import compile_hole
    from lmprog.compiler.host_hole import stack_compiled

    t0 = time.perf_counter()
    hole = compile_hole([JsonSchema("s.json", json.dumps(schema))], tok, following_text="\n", cache=False, path=path)
    table, starts = stack_compiled([hole], tok)
    bound, pool = table.bind()
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    states = np.full(particles, starts[0], np.int64)
    zeros = np.zeros(particles, np.int64)
    big = np.full(particles, 1 << 20, np.int64)
    jmask = jax.jit(lambda t, s, c: t.mask(s, c, 1 << 20))
    counts = jnp.zeros((particles, 3), jnp.int32)
    jmask(bound, jnp.asarray(states, jnp.int32), counts).block_until_ready()
    mask_t, step_t, jit_t, distinct = [], [], [], []
    for _ in range(steps):
        if restart:
            states = np.where((states - pool.base) % 2 == 1, starts[0], states)
        live = (states - pool.base) % 2 == 0
        if not live.any():
            break
        # fresh states (the last step's children): the pool has no mask for them yet, this call computes them
        dt, packed = _timed(pool.masks, states, zeros, big)
        mask_t.append(dt)
        distinct.append(len(set(states[live].tolist())))
        # the jitted protocol call on the same states, masks now cached: callback + transfer + unpack
        s_dev = jnp.asarray(states, jnp.int32)
        dt, out = _timed(lambda: jmask(bound, s_dev, counts).block_until_ready())
        jit_t.append(dt)
        bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, : pool.vocab].astype(bool)
        toks = np.array([rng.choice(np.flatnonzero(b)) if b.any() else 0 for b in bits])
        dt, new = _timed(pool.step, np.where(live, states, -1), toks)
        step_t.append(dt)
        states = np.where(live & (new >= 0), new, starts[0] if restart else states)
    return {"compile_s": compile_s, "mask_ms": 1e3 * np.median(mask_t), "step_ms": 1e3 * np.median(step_t),
            "jit_mask_ms": 1e3 * np.median(jit_t), "distinct": float(np.mean(distinct)), "steps": len(mask_t)}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def pool_growth(tok, schema, particles, steps, hold_min, seed=0):
    """A long run's host pool: ``particles`` random walks for ``steps`` tokens, each walk starting the hole again
    when it ends (a loop of many holes); with ``HostPool.HOLD_MIN = hold_min`` (huge: never free). Returns the
    states made, the most held at once, the process's RSS growth and the mean mask + step time per token."""
    from lmprog.automata.host import HostPool
    from lmprog.compiler.constraint_ir import JsonSchema
    from lmprog.compiler.constraints import compile_hole
    from lmprog.compiler.host_hole import stack_compiled

    hole = compile_hole([JsonSchema("s.json", json.dumps(schema))], tok, following_text="\n", cache=False,
                        path="host")
    table, starts = stack_compiled([hole], tok)
    old, HostPool.HOLD_MIN = HostPool.HOLD_MIN, hold_min
    try:
        _, pool = table.bind()
        rng = np.random.default_rng(seed)
        states = np.full(particles, starts[0], np.int64)
        zeros = np.zeros(particles, np.int64)
        big = np.full(particles, 1 << 20, np.int64)
        rss0, t0 = _rss_mb(), time.perf_counter()
        for _ in range(steps):
            states = np.where((states - pool.base) % 2 == 1, starts[0], states)  # ended: the next hole
            packed = pool.masks(states, zeros, big)
            bits = np.unpackbits(packed.view(np.uint8), axis=1, bitorder="little")[:, : pool.vocab].astype(bool)
            toks = np.array([rng.choice(np.flatnonzero(b)) if b.any() else 0 for b in bits])
            new = pool.step(states, toks)
            states = np.where(new >= 0, new, starts[0])
        dt = time.perf_counter() - t0
        return {"states": len(pool), "held_max": pool.stats["held_max"], "rss_mb": _rss_mb() - rss0,
                "ms_per_token": 1e3 * dt / steps, "rebuilt": pool.stats["rebuilt"]}
    finally:
        HostPool.HOLD_MIN = old


def device_mask(tok, schema, particles, steps, seed=0):
    """The device path's mask (jitted ``TokenTable.mask``) for ``particles`` random-walk states."""
    import jax
    import jax.numpy as jnp

    from lmprog.compiler.automaton import stack_holes
    from lmprog.compiler.constraint_ir import JsonSchema
    from lmprog.compiler.constraints import compile_hole

    t0 = time.perf_counter()
    hole = compile_hole([JsonSchema("s.json", json.dumps(schema))], tok, following_text="\n", cache=False,
                        path="device")
    table, offs = stack_holes([hole])
    compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    jmask = jax.jit(lambda t, s, c: t.mask(s, c, 1 << 20))
    dense = hole.automaton
    states = np.full(particles, offs[0] + dense.start, np.int64)
    counts = jnp.zeros((particles, 3), jnp.int32)
    jmask(table, jnp.asarray(states, jnp.int32), counts).block_until_ready()
    times = []
    for _ in range(steps):
        s_dev = jnp.asarray(states, jnp.int32)
        dt, ok = _timed(lambda: jmask(table, s_dev, counts).block_until_ready())
        times.append(dt)
        ok = np.asarray(ok)
        toks = np.array([rng.choice(np.flatnonzero(b)) if b.any() else 0 for b in ok])
        nxt = np.array([dense.step(int(s) - offs[0], int(t)) for s, t in zip(states, toks)])
        if (nxt < 0).all() or dense.final[np.maximum(nxt, 0)].all():
            break
        states = np.where((nxt >= 0) & ~dense.final[np.maximum(nxt, 0)], nxt + offs[0], states)
    return {"compile_s": compile_s, "jit_mask_ms": 1e3 * np.median(times), "steps": len(times)}


def decode_step(model, particles, repeats=20):
    import jax
    import jax.numpy as jnp

    from lmprog.backends import load_model

    lm = load_model(model)
    cache = lm.init_cache(particles, 64)
    step = jax.jit(lambda p, c, t, pos: lm.apply(p, c, t, pos))
    tok = jnp.zeros((particles, 1), jnp.int32)
    pos = jnp.zeros((particles,), jnp.int32)
    logits, cache = step(lm.params, cache, tok, pos)
    logits.block_until_ready()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        logits, cache = step(lm.params, cache, tok, pos + i + 1)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times)), jax.devices()[0].platform


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--particles", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--pool-steps", type=int, default=0,
                    help="also measure the host pool over a long run of this many tokens (freeing on / off)")
    args = ap.parse_args(argv)

    from lmprog.backends.registry import load_tokenizer

    tok = load_tokenizer(args.model)
    p = args.particles
    print(f"vocabulary {len(tok.token_bytes)}, {p} particles, up to {args.steps} steps")
    if args.pool_steps:
        from lmprog.automata.host import HostPool

        print(f"host pool over {args.pool_steps} tokens (recursive schema, walks restart when they end):")
        print(f"{'':16s} {'states':>8s} {'held max':>9s} {'RSS +MB':>8s} {'ms/token':>9s} {'rebuilt':>8s}")
        for name, hold in (("freeing", HostPool.HOLD_MIN), ("never freeing", 1 << 40)):
            r = pool_growth(tok, TREE, p, args.pool_steps, hold)
            print(f"{name:16s} {r['states']:8d} {r['held_max']:9d} {r['rss_mb']:8.1f} {r['ms_per_token']:9.2f} "
                  f"{r['rebuilt']:8d}")
    rows = [("recursive schema, host", host_walk(tok, TREE, p, args.steps)),
            ("regular schema, host (forced)", host_walk(tok, FLAT, p, args.steps)),
            ("regular schema, device", device_mask(tok, FLAT, p, args.steps))]
    print(f"{'hole':32s} {'compile s':>9s} {'mask ms':>8s} {'step ms':>8s} {'jit mask ms':>11s} {'distinct':>8s}")
    for name, r in rows:
        print(f"{name:32s} {r['compile_s']:9.2f} {r.get('mask_ms', float('nan')):8.2f} "
              f"{r.get('step_ms', float('nan')):8.2f} {r['jit_mask_ms']:11.2f} {r.get('distinct', float('nan')):8.1f}")
    if not args.no_decode:
        ms, platform = decode_step(args.model, p)
        host = rows[0][1]
        per_token = host["mask_ms"] + host["step_ms"]
        print(f"decode step at batch {p} ({platform}): {ms:.2f} ms; recursive host mask + step = {per_token:.2f} ms "
              f"= {100 * per_token / ms:.0f} % of it")


if __name__ == "__main__":
    main()
