"""A step as named numpy arrays: what multi-host rank 0 sends the other ranks so each
runs the same step (engine/distributed.py carries them; engine/engine.py's ``follow``
unpacks them)."""

from __future__ import annotations

import numpy as np

from sgljax.engine.batch import GrammarMask, LogitAdjust, SamplingBatch, StepBatch


def flatten_step(batch: StepBatch, sbatch: SamplingBatch, adjust: LogitAdjust | None,
                 grammar: GrammarMask | None) -> dict[str, np.ndarray]:
    """The step as named numpy arrays, to send to other hosts."""
    flat = {f"b.{k}": np.asarray(v) for k, v in vars(batch).items() if v is not None}
    flat.update({f"s.{k}": np.asarray(v) for k, v in vars(sbatch).items()})
    if adjust is not None:
        flat.update({f"a.{k}": np.asarray(v) for k, v in vars(adjust).items()})
    if grammar is not None:
        flat.update({f"g.{k}": np.asarray(v) for k, v in vars(grammar).items()})
    return flat


def unflatten_step(flat: dict[str, np.ndarray]):
    part = lambda p: {k[2:]: v for k, v in flat.items() if k.startswith(p)}  # noqa: E731
    adjust, grammar = part("a."), part("g.")
    return (StepBatch(**part("b.")), SamplingBatch(**part("s.")),
            LogitAdjust(**adjust) if adjust else None,
            GrammarMask(**grammar) if grammar else None)
