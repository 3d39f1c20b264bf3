"""Particles over devices: a ``Mesh`` of the local devices, the particle axis sharded, the weights replicated
(or split over a ``model`` axis: tensor parallel).

A run's device state is a pytree whose per-particle leaves have the particle axis first (``Particles``, the
own KV caches: ``[P, ...]``). Placing those leaves with ``NamedSharding(mesh, P("particles"))`` and everything
else replicated (the shared prompt's KV, ``Consts``, the weights: one copy per device) is all the engine does:
the jitted kernels are the same functions, and XLA's SPMD partitioner splits them. Partitioning never changes
what a program computes, only where: the per-group sums of the weights, ESS and log Z are global reductions,
and resampling's gather by ancestor index (``Particles`` and cache rows taken at ``ancestors[i]``, which may live
on another device) moves exactly the rows that are gathered. So resampling stays globally exact, not an island
scheme, and with ``jax_threefry_partitionable`` (on by default) the random bits do not depend on the sharding
either: the same seed gives the same particles on 1 or 4 devices (up to the order of float reductions).

Weights that do not fit one device go over a second mesh axis, ``model`` (:func:`weight_spec`): the
column-parallel maps (Q, K, V, gate, up, the output head) split their output axis, the row-parallel ones (O,
down) their input axis, the embedding its vocabulary axis; XLA inserts the reductions. The own KV caches then
split their KV-head axis over ``model`` too, when it divides.

The device count must divide the particle count (``groups x particles``): :func:`plan` refuses a requested
count that does not, and by default picks the most local devices that do.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["DeviceRequest", "Placement", "devices", "plan", "requested", "weight_spec"]

PARTICLES, MODEL = "particles", "model"
#: Column-parallel weights (``[in, out]``, the output axis split) and row-parallel ones (the input axis split).
COLUMN = ("wq", "wk", "wv", "w_gate", "w_up", "lm_head", "bq", "bk", "bv")
ROW = ("wo", "w_down")


class DeviceRequest(NamedTuple):
    """What a run asks for: ``count`` local devices for the particles (``None``: as many as divide the particle
    count) and ``model`` devices per particle shard for the weights."""

    count: int | None = None
    model: int = 1


_REQUEST: contextvars.ContextVar[DeviceRequest] = contextvars.ContextVar("lmprog_devices", default=DeviceRequest())


@contextlib.contextmanager
def devices(count: int | None = None, model: int = 1):
    """Runs inside use ``count`` local devices for the particle axis, each particle shard's weights split over
    ``model`` devices (``count x model`` devices). ``devices()`` (no request) keeps the enclosing request (by
    default: the most local devices that divide the particle count, weights replicated)."""
    if count is None and model == 1:
        yield
        return
    check_request(count, model)
    token = _REQUEST.set(DeviceRequest(count, model))
    try:
        yield
    finally:
        _REQUEST.reset(token)


def requested() -> DeviceRequest:
    return _REQUEST.get()


def check_request(count: int | None, model: int = 1) -> None:
    """``ValueError`` for a device request this process cannot serve."""
    have = jax.local_device_count()
    for name, v in (("devices", count), ("model devices", model)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ValueError(f"{name} must be a positive integer, not {v!r}")
    if (count or 1) * model > have:
        raise ValueError(f"{count or 1} x {model} devices requested but this process has {have} "
                         f"({jax.local_devices()[0].platform}); use --devices {max(1, have // model)} or fewer")


class Placement(NamedTuple):
    """Where one run's arrays live: ``mesh`` (``particles x model``) and ``num``, the length of the particle axis."""

    mesh: Mesh
    num: int

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def leaf_sharding(self, x) -> NamedSharding:
        """A run-state leaf's sharding: the particle axis split when the leading axis is the particles'; a
        ``[P, KV, S, D]`` KV cache's heads also over ``model`` when they divide; the rest replicated."""
        shape = np.shape(x)
        if not shape or shape[0] != self.num:
            return self.replicated
        m = self.mesh.shape[MODEL]
        if m > 1 and len(shape) == 4 and shape[1] % m == 0:
            return NamedSharding(self.mesh, P(PARTICLES, MODEL))
        return NamedSharding(self.mesh, P(PARTICLES))

    def place(self, tree):
        """``tree`` (a run state, constants) with every leaf placed by :meth:`leaf_sharding`. Leaves already
        placed so are not copied."""
        return jax.tree.map(lambda x: jax.device_put(x, self.leaf_sharding(x)), tree)

    def place_weights(self, params):
        """The weights: replicated, or split over ``model`` (:func:`weight_spec`)."""
        m = self.mesh.shape[MODEL]
        if m == 1:
            return jax.device_put(params, self.replicated)
        return jax.tree_util.tree_map_with_path(
            lambda path, x: jax.device_put(x, NamedSharding(self.mesh, weight_spec(path, np.shape(x), m))), params)

    def model(self, lm) -> "PlacedModel":
        """``lm`` with its weights placed on this mesh (:meth:`place_weights`), copied once per model and mesh."""
        key = (id(lm), self.mesh.devices.shape, tuple(d.id for d in self.mesh.devices.flat))
        hit = _PLACED.get(key)
        if hit is None or hit.base is not lm:
            while len(_PLACED) >= MAX_PLACED:  # the oldest placement's copies go first
                _PLACED.pop(next(iter(_PLACED)))
            hit = _PLACED[key] = PlacedModel(lm, self.place_weights(lm.params))
        return hit

    def zeros(self, make):
        """``make()`` (e.g. an empty KV cache) computed straight into its sharding: never whole on one device."""
        shapes = jax.eval_shape(make)
        return jax.jit(make, out_shardings=jax.tree.map(self.leaf_sharding, shapes))()


class PlacedModel:
    """A language model whose ``params`` are placed on a mesh; everything else is the model's own. One per model
    and mesh (:meth:`Placement.model`), so kernels built for it (keyed by the model object) are built once."""

    def __init__(self, base, params):
        self.base = base
        self.params = params

    def __getattr__(self, name):
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return repr(self.base)


#: Placed copies of models' weights kept (each is one copy per device of the mesh).
MAX_PLACED = 2
_PLACED: dict = {}


def weight_spec(path, shape, m: int) -> P:
    """The tensor-parallel layout of one weight (``path``: its key path in the weight pytree): column-parallel
    maps split their last (output) axis, row-parallel maps their first (input) axis, the embedding ``[V, H]``
    its vocabulary; an axis the ``m`` devices do not divide, and every other leaf, stays replicated."""
    name = _leaf_name(path)
    if name in COLUMN and len(shape) >= 1 and shape[-1] % m == 0:
        return P(*([None] * (len(shape) - 1)), MODEL)
    if (name in ROW or name == "embed") and len(shape) == 2 and shape[0] % m == 0:
        return P(MODEL, None)
    return P()


def _leaf_name(path) -> str:
    for entry in reversed(path):
        name = getattr(entry, "name", None) or getattr(entry, "key", None)
        if isinstance(name, str):
            return name
    return ""


def plan(num: int, groups: int = 1, request: DeviceRequest | None = None) -> Placement | None:
    """The placement of a run with ``num`` particles (``groups x particles``), or ``None`` for one device (no
    placement: the arrays stay where JAX puts them and the kernels' disk cache serves them).

    Raises ``ValueError`` when the requested device count does not divide ``num``."""
    req = request or requested()
    have = jax.local_device_count() // req.model
    if req.count is None:
        count = max(d for d in range(1, max(1, have) + 1) if num % d == 0)
    else:
        count = req.count
        if num % count:
            fit = max(d for d in range(1, count + 1) if num % d == 0)
            raise ValueError(
                f"{num} particles" + (f" ({groups} batch rows x {num // groups})" if groups > 1 else "")
                + f" cannot be split evenly over {count} devices: use a particle count that is a multiple of "
                f"{count} (e.g. {-(-num // count) * count}) or --devices {fit}")
    if count * req.model == 1:
        return None
    devs = np.asarray(jax.local_devices()[: count * req.model]).reshape(count, req.model)
    return Placement(Mesh(devs, (PARTICLES, MODEL)), num)
