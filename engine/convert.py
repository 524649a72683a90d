"""Convert a model once (HF safetensors folder or GGUF file) into a converted sgljax folder.

The conversion streams: ``engine_tensors`` yields one engine parameter at a
time, it is placed on the conversion mesh, added to the Orbax checkpoint and
dropped before the next is read, so memory stays near the largest stacked
tensor rather than the whole model.

It is atomic: everything is written under ``OUTPUT.partial``, the commit marker
goes in last, and only then is the folder renamed to OUTPUT. An interrupted
run leaves at most ``OUTPUT.partial``, which the loader refuses and the next
run deletes before starting over.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgljax.engine import checkpoint
from sgljax.engine.asr_config import AsrConfig, is_asr_config
from sgljax.engine.config import ModelConfig
from sgljax.engine.gguf_tokenizer import save_gguf_tokenizer
from sgljax.engine.mesh import make_mesh
from sgljax.engine.params import abstract_model, divisible_sharding, kv_heads_for, param_shardings
from sgljax.engine.weights import (WeightsError, engine_tensors, expected_shapes, gguf_getter,
                                   safetensors_getter)

DTYPES = {"float32": (jnp.float32, np.float32), "bfloat16": (jnp.bfloat16, jnp.bfloat16)}
HASH_LIMIT = 2 << 30  # files up to 2 GiB get a sha256; bigger ones only size + mtime
HASH_METHOD = "sha256 of each file up to 2 GiB; larger files: size and mtime only"
# What serving reads besides the weights (tokenizer, chat template, generation defaults).
SERVING_FILES = ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                 "chat_template.json")

Progress = Callable[[str, int, int], None]  # (phase, bytes just done, total bytes of the phase)


class ConvertError(ValueError):
    """The conversion cannot be done as asked (bad source, output in the way, disk full)."""


@dataclass
class Source:
    """A model to convert: its config, a tensor getter, and the files it came from."""

    kind: str  # "hf" | "gguf"
    path: Path
    label: str
    config: dict
    get: Callable[[str], np.ndarray]
    files: list[Path] = field(default_factory=list)

    def write_serving_files(self, out: Path, generation_defaults: dict | None = None) -> None:
        """Tokenizer, config and generation_config.json beside the weights.

        ``generation_defaults`` (sampling fields) go into generation_config.json when
        the source has none of its own (a GGUF, whose metadata carries none).
        """
        if self.kind == "hf":
            for name in SERVING_FILES:
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, out / name)
        else:
            (out / "config.json").write_text(json.dumps(self.config, indent=2))
            save_gguf_tokenizer(self.path, out)  # built from the GGUF's metadata, no torch
        if not (out / "generation_config.json").is_file():
            gen = {k: self.config[k] for k in ("bos_token_id", "eos_token_id")
                   if self.config.get(k) is not None}
            gen.update(generation_defaults or {})
            (out / "generation_config.json").write_text(json.dumps(gen, indent=2))


def open_source(path: str | Path, label: str | None = None) -> Source:
    path = Path(path).expanduser()
    label = label or str(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ConvertError(f"{path}: expected an HF model folder or a .gguf file")
        config, get = gguf_getter(path)
        return Source("gguf", path, label, config, get, [path])
    if checkpoint.looks_like_conversion(path):
        raise ConvertError(f"{path} is already a converted sgljax model")
    if not (path / "config.json").is_file():
        raise ConvertError(f"{path}: no config.json (not an HF model folder)")
    config = json.loads((path / "config.json").read_text())
    ModelConfig.from_hf_dict(config)  # unknown architectures fail before any weight is read
    get = safetensors_getter(path)
    files = sorted(path.glob("*.safetensors")) + [
        path / n for n in ("model.safetensors.index.json", *SERVING_FILES) if (path / n).is_file()]
    return Source("hf", path, label, config, get, files)


# -- the manifest ------------------------------------------------------------------------

def file_records(files: list[Path], root: Path, progress: Progress | None = None) -> list[dict]:
    """Name, size, mtime and (up to HASH_LIMIT) sha256 of each source file."""
    hashed = sum(f.stat().st_size for f in files if f.stat().st_size <= HASH_LIMIT)
    records = []
    for path in files:
        st = path.stat()
        rec = {"name": str(path.relative_to(root)), "size": st.st_size, "mtime": st.st_mtime,
               "sha256": None}
        if st.st_size <= HASH_LIMIT:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(8 << 20), b""):
                    h.update(block)
                    if progress:
                        progress("hashing", len(block), hashed)
            rec["sha256"] = h.hexdigest()
        records.append(rec)
    return records


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _is_current(output: Path, source: Path) -> bool:
    """True when OUTPUT is a complete conversion of SOURCE's unchanged files (size and mtime)."""
    try:
        manifest = checkpoint.require_converted(output)
        source = source.expanduser().resolve()
        if manifest["source"]["path"] != str(source):
            return False
        root = source if source.is_dir() else source.parent
        return all((root / r["name"]).stat().st_size == r["size"]
                   and (root / r["name"]).stat().st_mtime == r["mtime"]
                   for r in manifest["source_files"])
    except (ValueError, OSError, KeyError):
        return False


# -- output handling ---------------------------------------------------------------------

@contextlib.contextmanager
def _output_lock(output: Path, wait: bool) -> Iterator[None]:
    """One conversion per OUTPUT at a time; released by the OS if the process dies."""
    lock_path = output.with_name(f".{output.name}.lock")
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ConvertError(f"another sgljax convert is writing {output}") from None
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)


def _check_output(output: Path, source: Source, force: bool) -> None:
    src, out = source.path.resolve(), output.resolve()
    if src.is_relative_to(out):
        raise ConvertError(f"{output}: the output must not be the source or hold it")
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return
    if not force:
        raise ConvertError(f"{output} already exists (pass --force to overwrite it)")
    if output.is_file() or not checkpoint.looks_like_conversion(output):
        raise ConvertError(f"{output} exists and is not a converted sgljax model; "
                           "refusing to overwrite it even with --force")


def _check_disk(parent: Path, need: int) -> None:
    free = shutil.disk_usage(parent).free
    need += 64 << 20  # headroom: tokenizer files, metadata
    if free < need:
        raise ConvertError(f"not enough disk space in {parent}: the conversion needs about "
                           f"{need / 2**20:,.0f} MiB, {free / 2**20:,.0f} MiB are free")


def _is_disk_full(e: BaseException | None) -> bool:
    while e is not None:
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def _commit(partial: Path, output: Path) -> None:
    checkpoint.write_commit_marker(partial)
    old = None
    if output.exists():  # --force: move the old one aside so OUTPUT is never half-replaced
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    partial.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- the conversion ------------------------------------------------------------------------

def _missing_tensors(cfg: ModelConfig, source: Source) -> None:
    names = getattr(source.get, "names", None)
    if names is None:
        return
    missing = [n for n in expected_shapes(cfg) if n not in names]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise WeightsError(f"{source.label}: {len(missing)} tensor(s) missing: "
                           f"{', '.join(missing[:5])}{more}")


def request_cpu_devices(n: int) -> bool:
    """Ask JAX for ``n`` CPU devices, so a conversion can write n chunks per tensor anywhere.

    Only possible before JAX starts its backends (call it first thing). Returns whether
    n are there; when not, the conversion uses the CPU devices there are (fewer, larger
    chunks: still correct, only read more coarsely by a multi-host restore).
    """
    if n > 1:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # JAX refuses the setting once its backends exist
            pass
    return len(_conversion_devices()) >= n


def _conversion_devices() -> list:
    try:
        return jax.local_devices(backend="cpu")
    except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out
        return jax.local_devices()


def convert_model(source: str | Path, output: str | Path, *, dtype: str = "float32",
                  tp_size: int = 1, force: bool = False, progress: Progress | None = None,
                  label: str | None = None, generation_defaults: dict | None = None,
                  _locked: bool = False) -> dict:
    """Convert SOURCE into the folder OUTPUT; returns the manifest.

    ``force`` replaces an existing converted OUTPUT. ``generation_defaults``: sampling
    defaults for a source without a generation_config.json of its own (engine/
    generation_defaults.py). ``_locked``: the caller holds OUTPUT's lock already
    (``ensure_converted``).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if tp_size < 1:
        raise ConvertError(f"--tp-size must be at least 1, not {tp_size}")
    src = open_source(source, label)
    cfg = ModelConfig.from_hf_dict(src.config)
    kv_heads_for(cfg, tp_size)  # the model must split over the TP it is converted for
    output = Path(output).expanduser()
    _check_output(output, src, force)
    _missing_tensors(cfg, src)
    jdtype, np_dtype = DTYPES[dtype]
    itemsize = np.dtype(np_dtype).itemsize
    total = sum(int(np.prod(s)) for s in expected_shapes(cfg).values()) * itemsize
    output.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(output.parent, total)
    with contextlib.nullcontext() if _locked else _output_lock(output, wait=False):
        partial = output.with_name(output.name + checkpoint.PARTIAL_SUFFIX)
        shutil.rmtree(partial, ignore_errors=True)  # what an interrupted run left
        partial.mkdir()
        try:
            manifest = _write(src, cfg, partial, jdtype, np_dtype, tp_size, total, progress,
                              generation_defaults)
            _commit(partial, output)
        except BaseException as e:
            shutil.rmtree(partial, ignore_errors=True)
            if _is_disk_full(e):
                raise ConvertError(f"the disk filled up while writing {output}; the partial "
                                   "output was removed (free some space and run it again)") from e
            raise
    return manifest


def _write(src: Source, cfg: ModelConfig, out: Path, jdtype, np_dtype, tp_size: int,
           total: int, progress: Progress | None, generation_defaults: dict | None) -> dict:
    t0 = time.perf_counter()
    root = src.path if src.kind == "hf" else src.path.parent
    records = file_records(src.files, root, progress)
    if progress:
        progress("tokenizer", 0, 1)
    src.write_serving_files(out, generation_defaults)
    if progress:
        progress("tokenizer", 1, 1)
    # Store the model's own KV heads (the TP=1 layout); restore repeats them for wider TP.
    # Each tensor is written in tp_size chunks along its TP axis (one per device), as far as
    # there are CPU devices: a restore reads only the chunks its process's devices overlap,
    # so on N hosts each reads about 1/N when tp_size is a multiple of N. CPU devices, since
    # writing needs no accelerator and ``request_cpu_devices`` can make enough of them.
    devices = _conversion_devices()
    mesh = make_mesh(min(tp_size, len(devices)), devices=devices)
    _, state = nnx.split(abstract_model(cfg, mesh, jdtype, cfg.num_kv_heads))
    shardings = param_shardings(dict(nnx.to_flat_state(state)), mesh)

    def counting_get(name: str) -> np.ndarray:
        array = src.get(name)
        if progress:
            progress("converting", array.size * np.dtype(np_dtype).itemsize, total)
        return array

    writer = checkpoint.CheckpointWriter(out / checkpoint.CHECKPOINT_DIR)
    for name, array in engine_tensors(cfg, counting_get, cfg.num_kv_heads, np_dtype):
        placed = jax.device_put(array, divisible_sharding(shardings[name], array.shape))
        del array  # only the placed copy stays while Orbax writes it
        writer.add(name, placed)
        del placed
    writer.finish()
    audio = _write_audio(src, out, np_dtype) if is_asr_config(src.config) else None
    manifest = {
        "format": checkpoint.FORMAT_VERSION,
        "source": {"kind": src.kind, "path": str(src.path.resolve()), "label": src.label},
        "source_files": records,
        "source_hash": HASH_METHOD,
        "architecture": cfg.architecture,
        "dtype": np.dtype(np_dtype).name,
        "param_count": sum(int(np.prod(t["shape"])) for t in writer.tensors.values()),
        "bytes": total,
        "tp_size": tp_size,
        "kv_heads": cfg.num_kv_heads,
        "tensors": writer.tensors,
        "sgljax_version": _version("sgljax"),
        "orbax_version": _version("orbax-checkpoint"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "convert_seconds": round(time.perf_counter() - t0, 2),
    }
    if audio is not None:  # Qwen3-ASR: the audio encoder's own checkpoint
        manifest["audio_tensors"] = audio
    (out / checkpoint.MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _write_audio(src: Source, out: Path, np_dtype) -> dict:
    """Qwen3-ASR sources: the encoder + projector into their own Orbax checkpoint."""
    from sgljax.engine.asr_checkpoint import write_audio_checkpoint
    from sgljax.engine.asr_loader import load_audio_params

    return write_audio_checkpoint(load_audio_params(src.path, AsrConfig.from_hf_dict(src.config)),
                                  out, np_dtype)


def ensure_converted(source: Path, output: Path, label: str | None = None,
                     generation_defaults: dict | None = None) -> Path:
    """OUTPUT, converting SOURCE into it first unless a conversion of the same files is there.

    Several processes may ask at once (a server and a CLI): one converts, the
    others wait on the lock and then find the result.
    """
    if _is_current(output, source):
        return output
    output.parent.mkdir(parents=True, exist_ok=True)
    with _output_lock(output, wait=True):
        if not _is_current(output, source):
            convert_model(source, output, force=True, label=label,
                          generation_defaults=generation_defaults, _locked=True)
    return output


__all__ = ["ConvertError", "convert_model", "ensure_converted", "open_source"]
