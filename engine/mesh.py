"""The device mesh. Axis ``tp`` splits heads, FFN columns and the vocabulary."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType


class MeshError(ValueError):
    """The requested parallelism does not fit the devices."""


def make_mesh(tp_size: int = 1, devices=None):
    devices = devices if devices is not None else jax.devices()
    if tp_size < 1 or tp_size > len(devices):
        raise MeshError(f"--tp-size {tp_size} needs {tp_size} devices; {len(devices)} visible")
    # Auto axes: XLA places the collectives of row-parallel matmuls itself.
    return jax.make_mesh((tp_size,), ("tp",), axis_types=(AxisType.Auto,),
                         devices=devices[:tp_size])


def global_array(value: np.ndarray, sharding) -> jax.Array:
    """Place a host array that every process holds in full onto a (possibly global) sharding.

    Each process supplies only its own shards, so this works on one host and many.
    """
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
