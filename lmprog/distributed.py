"""Batch rows over processes and hosts, with ``jax.distributed``.

``lmprog batch ... --coordinator HOST:PORT --num-processes K --process-id I`` starts (or joins) JAX's distributed
runtime: process ``I`` of ``K`` runs the rows ``n`` with ``n % K == I`` (strided, so rows of every kind spread
over the processes) on its own local devices, and writes each record, as soon as the row is done, to its own
part file ``OUT.partIofK``. When it has finished (or failed) it waits at a barrier of the *live* processes
(the coordination service's ``get_live_nodes``: a process that crashed or was killed drops out of it once its
heartbeats stop); process 0 then merges the part files into ``OUT`` in input order. A row that no part file
holds (its process died, or stopped before writing it) gets an error record naming the process, and the
command exits 1: rows are reported, never silently missing.

The runtime is started with JAX's recoverability on, so that the death of one process does not terminate the
others (by default the coordination service aborts every process when one stops sending heartbeats).
Unset options come from the environment: ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; with a coordinator but no count or id, JAX's own cluster
detection (SLURM, Open MPI, Kubernetes, Cloud TPU) fills them in.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping, NamedTuple

__all__ = ["Processes", "initialize", "leave", "merge_parts", "part_path", "wait_for_peers"]

#: Seconds without heartbeats after which a process counts as dead (JAX's default is 100;
#: ``LMPROG_HEARTBEAT_S`` overrides it).
HEARTBEAT_S = 60


class Processes(NamedTuple):
    """This process's place among the batch's: ``index`` of ``count``."""

    count: int = 1
    index: int = 0

    def mine(self, row: int) -> bool:
        """Whether row ``row`` is this process's (rows are dealt out in turn: ``row % count == index``)."""
        return row % self.count == self.index

    def owner(self, row: int) -> int:
        return row % self.count


def _int_option(value, name: str, env: str, environ: Mapping[str, str]):
    if value is None and environ.get(env, "") != "":
        text = environ[env]
        if not re.fullmatch(r"\s*\d+\s*", text):
            raise ValueError(f"{env}={text!r}: expected a non-negative integer")
        value = int(text)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def resolve(coordinator=None, num_processes=None, process_id=None, environ: Mapping[str, str] = os.environ):
    """The distributed options from the arguments, else the environment: ``(coordinator, count, index)``, or
    ``None`` when no process option is set at all (one process, no runtime). ``ValueError`` for bad values."""
    coordinator = coordinator or environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = _int_option(num_processes, "--num-processes", "JAX_NUM_PROCESSES", environ)
    index = _int_option(process_id, "--process-id", "JAX_PROCESS_ID", environ)
    if coordinator is None and count is None and index is None:
        return None
    if count == 0:
        raise ValueError("--num-processes must be at least 1")
    if count is not None and index is not None and index >= count:
        raise ValueError(f"--process-id {index} is out of range: processes are numbered 0 to {count - 1}")
    if count not in (None, 1) and coordinator is None:
        raise ValueError(f"--num-processes {count} needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS): "
                         "the address of process 0, which every process connects to")
    if coordinator is not None and not re.fullmatch(r"[^\s:]+:\d+|\[[0-9a-fA-F:.]+\]:\d+", coordinator):
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. localhost:1234 or 10.0.0.1:1234")
    return coordinator, count, index


def initialize(coordinator=None, num_processes=None, process_id=None, *,
               environ: Mapping[str, str] = os.environ) -> Processes:
    """Join the batch's processes (``jax.distributed.initialize``; once per process), or, with no process option
    set (arguments or environment), run as the only process. Returns this process's :class:`Processes`."""
    opts = resolve(coordinator, num_processes, process_id, environ)
    if opts is None or opts[1] == 1:
        return Processes()
    import jax
    from jax._src.distributed import global_state

    if global_state.client is None:
        # One dying process must not abort the others: their rows are written, and its own reported.
        jax.config.update("jax_enable_recoverability", True)
        jax.distributed.initialize(coordinator_address=opts[0], num_processes=opts[1], process_id=opts[2],
                                   heartbeat_timeout_seconds=int(environ.get("LMPROG_HEARTBEAT_S") or HEARTBEAT_S))
    return Processes(jax.process_count(), jax.process_index())


def part_path(out: str, procs: Processes) -> str:
    """Process ``procs.index``'s part of the output ``out``."""
    return f"{out}.part{procs.index}of{procs.count}"


def wait_for_peers(procs: Processes) -> set[int]:
    """Wait until every live process has called this (a process that died drops out once its heartbeats stop);
    returns the processes that did."""
    from jax._src.distributed import global_state

    return set(global_state.client.get_live_nodes(list(range(procs.count))))


def leave(procs: Processes) -> None:
    """Leave the batch in order: the others disconnect, and process 0, whose process hosts the coordination
    service, waits until they have (a process still connected when the service stops is aborted by JAX)."""
    if procs.index != 0:
        import jax

        jax.distributed.shutdown()
    else:
        wait_for_peers(procs)  # returns once every other process has disconnected (or died)


def merge_parts(out: str, procs: Processes, lines: Mapping[int, int], live: set[int]) -> list[int]:
    """Merge the part files of ``out`` into ``out``, one record per row of ``lines`` (row -> input line), in
    input order; remove the parts. A row no part holds gets an error record naming its process (dead: not in
    ``live``, or stopped early). Returns those rows."""
    records: dict[int, str] = {}
    for i in range(procs.count):
        path = part_path(out, Processes(procs.count, i))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.split("\n"):
            try:
                n = json.loads(line)["row"]
            except (ValueError, KeyError, TypeError):
                continue  # a last line cut short by a crash: the row is reported missing below
            if isinstance(n, int) and n in lines:
                records.setdefault(n, line)
    missing = [n for n in sorted(lines) if n not in records]
    for n in missing:
        who = procs.owner(n)
        why = "died (its heartbeats stopped)" if who not in live else "stopped before writing it"
        records[n] = json.dumps({"row": n, "line": lines[n], "error_kind": "run",
                                 "error": f"lmprog: run failed: process {who} of {procs.count}, which ran this row, "
                                          f"{why}; run the row again"})
    tmp = f"{out}.merging"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(records[n] + "\n" for n in sorted(records)))
    os.replace(tmp, out)
    for i in range(procs.count):
        try:
            os.unlink(part_path(out, Processes(procs.count, i)))
        except OSError:
            pass
    return missing
