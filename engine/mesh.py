"""The device mesh: axes (``ep``, ``tp``), ep × tp devices.

``tp`` splits heads, FFN columns (dense and expert ones) and the vocabulary. ``ep``
splits only the expert axis of MoE layers' stacked expert weights: everything else
(embedding, attention, KV cache, dense MLPs, router, shared expert) is replicated over
``ep`` and split over ``tp`` as with ``ep`` = 1. Why replicate attention rather than
give each ep group its own sequences (attention data parallelism): the KV pool, the
scheduler and the step's shapes stay one, so an ep>1 step is the ep=1 step with the
experts spread out, and every ep group already holds each token the MoE block needs,
so dispatch is local selection (engine/moe.py) instead of an all-to-all. The cost is
attention computed ep times over; in MoE models the expert weights are most of the
bytes a decode step reads, and those are what ep divides.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType

EP, TP = "ep", "tp"


class MeshError(ValueError):
    """The requested parallelism does not fit the devices."""


def make_mesh(tp_size: int = 1, devices=None, *, ep_size: int = 1):
    devices = devices if devices is not None else jax.devices()
    if tp_size < 1 or tp_size > len(devices):
        raise MeshError(f"--tp-size {tp_size} needs {tp_size} devices; {len(devices)} visible")
    if ep_size < 1 or ep_size * tp_size > len(devices):
        raise MeshError(f"--ep-size {ep_size} and --tp-size {tp_size} need "
                        f"{ep_size * tp_size} devices (ep x tp); {len(devices)} visible")
    # Auto axes: XLA places the collectives of row-parallel matmuls itself. tp is the
    # inner (minor) axis, so a tp group is neighbouring devices (one host's, on many).
    return jax.make_mesh((ep_size, tp_size), (EP, TP), axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:ep_size * tp_size])


def ep_size_of(mesh) -> int:
    """The ``ep`` axis' size of a (possibly abstract) mesh; 1 when it has none."""
    return dict(mesh.shape).get(EP, 1) if mesh is not None and mesh.shape else 1


def global_array(value: np.ndarray, sharding) -> jax.Array:
    """Place a host array that every process holds in full onto a (possibly global) sharding.

    Each process supplies only its own shards, so this works on one host and many.
    """
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
