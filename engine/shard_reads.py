"""Read only the part of each engine parameter that this host's devices hold.

``jax.make_array_from_callback`` asks once per addressable device for an index:
a tuple of slices in the engine parameter's coordinates. ``ShardReader`` maps
that index back into the coordinates of the HF tensors it came from, undoing
the engine layout (layers stacked on a leading axis; linear weights stay (out, in)
as HF stores them; KV heads repeated when TP is wider than the model's KV heads),
and reads just those elements with safetensors' ``get_slice``. A host of a
multi-host mesh thus reads about 1/nhosts of every sharded tensor, plus the
replicated ones (norms) whole.

Every engine transform maps a contiguous engine slice to a contiguous source
slice, so no tensor needs a whole read. Two caveats on what "read" means:

* The count is of the bytes copied out of the file. Slices along a tensor's
  last axis (o_proj and down_proj: the engine splits their HF columns) take a
  short run from every row, so the pages the OS reads can exceed the count.
* With repeated KV heads, every device holding a copy of a head reads it again
  (KV tensors are small, and a cache would only save that).

GGUF files are dequantized whole with numpy (a quantized block covers many
values, so there is no per-slice read); the loader reads them through the f32
safetensors folder it prepares from them once, and so slices that.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sgljax.engine.asr_config import text_tensor_name
from sgljax.engine.config import ModelConfig
from sgljax.engine.weights import (KV_HEAD_TENSORS, WeightsError, expected_shapes, safe_open,
                                   hf_layer_names, per_expert, stacked_layers)

Index = tuple[slice, ...]


class SafetensorsSlices:
    """Read parts of named tensors from a folder of safetensors files, counting the bytes.

    Files are opened (memory-mapped by safetensors) when first read and stay open
    until ``release``: the loader releases them after each parameter, since the
    mapped pages it touched count in the process's resident memory while mapped.
    """

    def __init__(self, folder: Path):
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise WeightsError(f"{folder}: no *.safetensors weights")
        self.folder = folder
        self._handles: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {k: folder / v for k, v in weight_map.items()}
        else:
            self._where = {k: f for f in files for k in self._open(f).keys()}
        # A Qwen3-ASR folder stores its decoder under another prefix: read those tensors
        # by the plain decoder's names (stored name kept for the file read).
        self._stored = {}
        for k in list(self._where):
            alias = text_tensor_name(k)
            if alias is not None:
                self._where[alias], self._stored[alias] = self._where[k], k
        self.bytes_read = 0

    def __enter__(self) -> SafetensorsSlices:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Unmap every open file (reads after this reopen them)."""
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()

    def _open(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="numpy")
        return self._handles[file]

    def _slice(self, name: str):
        if name not in self._where:
            raise WeightsError(f"{self.folder}: tensor {name} is missing")
        return self._open(self._where[name]).get_slice(self._stored.get(name, name))

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def nbytes(self, name: str) -> int:
        sl = self._slice(name)
        return int(np.prod(sl.get_shape())) * _DTYPE_BYTES[sl.get_dtype()]

    def read(self, name: str, index: Index) -> np.ndarray:
        """The elements ``index`` of tensor ``name``; only their bytes are copied out of the file."""
        array = self._slice(name)[index]
        self.bytes_read += array.nbytes
        return array

    def check(self, cfg: ModelConfig) -> None:
        """Every tensor the config needs is there with its shape: fail before reading any."""
        shapes = expected_shapes(cfg)
        missing = [n for n in shapes if n not in self._where]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise WeightsError(f"{self.folder}: {len(missing)} tensor(s) missing: "
                               f"{', '.join(missing[:5])}{more}")
        for name, want in shapes.items():
            if self.shape(name) != want:
                raise WeightsError(f"{name}: shape {self.shape(name)}, config expects {want}")


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "BOOL": 1}


class ShardReader:
    """Callbacks for ``jax.make_array_from_callback`` that read engine parameters by the slice."""

    def __init__(self, cfg: ModelConfig, source: SafetensorsSlices, kv_heads: int, dtype):
        self.cfg = cfg
        self.source = source
        self.kv_heads = kv_heads
        self.dtype = dtype

    def callback(self, name: str, shape: tuple[int, ...]) -> Callable[[Index], np.ndarray]:
        """index (engine coordinates) → that part of engine parameter ``name``."""
        return lambda index: self.read(name, _concrete(index, shape))

    def read(self, name: str, index: Index) -> np.ndarray:
        if name == "embed":  # same layout as HF: (vocab, hidden)
            return self._cast(self.source.read("model.embed_tokens.weight", index))
        if name == "final_norm":
            return self._cast(self.source.read("model.norm.weight", index))
        if name == "lm_head":  # same layout as HF: (vocab, hidden)
            return self._cast(self.source.read("lm_head.weight", index))
        return self._read_layers(name.removeprefix("layers."), index)

    def _read_layers(self, short: str, index: Index) -> np.ndarray:
        """A stacked parameter: the slice index[1:] of each layer in index[0], one layer at a
        time (expert tensors: index[1] picks experts, index[2:] their slice)."""
        layers = stacked_layers(self.cfg, short)[index[0]]  # model layers of this stack's slice
        experts = per_expert(short)
        pick_experts, inner = (index[1], index[2:]) if experts else (slice(None), index[1:])
        pick = None
        if short in KV_HEAD_TENSORS and self.kv_heads != self.cfg.num_kv_heads:
            inner, pick = self._source_heads(inner)
        out = None
        for j, layer in enumerate(layers):
            for e, hf_name in enumerate(hf_layer_names(self.cfg, short, layer)[pick_experts]):
                w = self.source.read(hf_name, inner)
                if pick is not None:
                    w = np.take(w, pick, axis=0)
                if out is None:
                    lead = (len(layers), len(range(self.cfg.num_experts)[pick_experts]))
                    out = np.empty((*lead[:1 + experts], *w.shape), dtype=self.dtype)
                out[(j, e) if experts else j] = w  # the cast happens in this copy
        return out

    def _source_heads(self, inner: Index) -> tuple[Index, np.ndarray]:
        """Engine KV rows (heads lead: (heads * head_dim, ...)) → the model's own rows.

        Engine head h is the model's head h // reps (``replicate_kv_heads``), so a
        run of engine rows needs one contiguous run of source rows; ``pick`` then
        selects, from what was read, the row behind each engine row.
        """
        hd, reps = self.cfg.head_dim, self.kv_heads // self.cfg.num_kv_heads
        rows = np.arange(inner[0].start, inner[0].stop)
        src = (rows // hd // reps) * hd + rows % hd
        lo, hi = int(src.min()), int(src.max()) + 1
        return (slice(lo, hi), *inner[1:]), src - lo

    def _cast(self, array: np.ndarray) -> np.ndarray:
        return array.astype(self.dtype, copy=False)


def _concrete(index: Index, shape: tuple[int, ...]) -> Index:
    """Slices with explicit bounds (JAX passes slice(None) for unsplit axes)."""
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"unexpected strided shard index {index}")
        out.append(slice(start, stop))
    return tuple(out)


__all__ = ["SafetensorsSlices", "ShardReader"]
