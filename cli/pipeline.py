"""The per-host pipeline: fetch → convert → warm up → serve, as command lines.

Each host of a slice (and ``sgljax up local``) runs the same steps. They call
``sgljax`` sub-commands as subprocesses, so this module depends only on their
flags, not on their Python APIs; ``build_steps`` is pure and tested on its own.
Multi-host serving gets ``--nnodes/--node-rank/--dist-init-addr`` from SkyPilot's
environment: the coordinator is the first host's IP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sgljax.cli.engine_options import FIELDS, to_flags
from sgljax.cli.recipes import Recipe, ServingPlan
from sgljax.engine.checkpoint_format import FORMAT_VERSION, stored_format

DEFAULT_PORT = 30000  # SGLang's default HTTP port
DEFAULT_DIST_PORT = 8476  # JAX's usual coordinator port on Cloud TPU
READY_MARKER = "sgljax-ready.json"  # written next to a finished conversion
HF_EXCLUDES = ("original/*", "*.pth")  # Llama repos also ship the raw Meta weights
HF_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class PipelineError(RuntimeError):
    """A step failed; the message names it."""


@dataclass(frozen=True)
class HostEnv:
    """Where this host sits in the slice: SkyPilot's rank and node IPs."""
    rank: int = 0
    ips: tuple[str, ...] = ("127.0.0.1",)

    @property
    def num_nodes(self) -> int:
        return len(self.ips)

    @classmethod
    def from_environ(cls, environ=os.environ) -> "HostEnv":
        ips = tuple(ip.strip() for ip in environ.get("SKYPILOT_NODE_IPS", "").splitlines()
                    if ip.strip()) or ("127.0.0.1",)
        try:
            rank = int(environ.get("SKYPILOT_NODE_RANK", "0"))
            num = int(environ.get("SKYPILOT_NUM_NODES", str(len(ips))))
        except ValueError:
            raise PipelineError("SKYPILOT_NODE_RANK / SKYPILOT_NUM_NODES must be integers") from None
        if num != len(ips):
            raise PipelineError(f"SKYPILOT_NUM_NODES={num} but SKYPILOT_NODE_IPS lists {len(ips)} IPs")
        if not 0 <= rank < num:
            raise PipelineError(f"SKYPILOT_NODE_RANK={rank} is outside 0..{num - 1}")
        return cls(rank, ips)

    def coordinator(self, port: int) -> str:
        return f"{self.ips[0]}:{port}"


@dataclass(frozen=True)
class Storage:
    """Where the weights come from and where the converted checkpoint lives.

    mode ``local``: convert onto this host's disk; ``bucket``: the checkpoint sits in a
    bucket mounted on every host (or a disk they share), which rank 0 fills and the
    others wait for; ``hf``:
    no conversion, serve the downloaded HF folder (when the disk cannot hold both).
    """
    mode: str
    source: str  # HF repo id, local folder/GGUF, or the embedded model's name
    download_dir: Path | None
    checkpoint: Path | None
    must_exist: bool = False  # bucket mode when the download cannot fit a host's disk

    def needs_fetch(self) -> bool:
        return is_hf_repo(self.source)

    @property
    def model_path(self) -> Path:
        return self.download_dir if self.mode == "hf" else self.checkpoint


def is_hf_repo(source: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(HF_REPO_ID.fullmatch(source)) and not Path(source).expanduser().exists()


@dataclass(frozen=True)
class Step:
    label: str
    argv: tuple[str, ...] = ()
    # run | wait (for a marker) | require (a marker, now) | mark (write one) | exec (last)
    kind: str = "run"
    path: Path | None = None
    info: dict = field(default_factory=dict)

    def shell(self) -> str:
        if self.kind in ("wait", "require"):
            return f"{self.kind} {self.path}"
        if self.kind == "mark":
            return f"write {self.path}"
        return ("exec " if self.kind == "exec" else "") + shlex.join(self.argv)


def sgljax_cmd(python: str, *args: str) -> tuple[str, ...]:
    return (python, "-m", "sgljax.cli.main", *args)


def engine_flags(plan: ServingPlan) -> list[str]:
    """The plan's engine settings as ``sgljax serve``/``warmup`` flags (lists comma-joined).

    Every ServingPlan field that EngineArgs declares, spelt as the commands take it.
    """
    return to_flags({f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
                     if f.name in FIELDS})


def parser_flags(recipe: Recipe) -> list[str]:
    """The recipe's --tool-call-parser / --reasoning-parser for ``sgljax serve``."""
    return [arg for key, value in sorted(recipe.parsers.items())
            for arg in (f"--{key.replace('_', '-')}", str(value))]


def dist_flags(host: HostEnv, port: int) -> list[str]:
    if host.num_nodes == 1:
        return []
    return ["--nnodes", str(host.num_nodes), "--node-rank", str(host.rank),
            "--dist-init-addr", host.coordinator(port)]


def marker_info(recipe: Recipe, storage: Storage, dtype: str) -> dict:
    return {"model": recipe.name, "source": storage.source, "dtype": dtype,
            "format": FORMAT_VERSION}


def build_steps(recipe: Recipe, plan: ServingPlan, host: HostEnv, storage: Storage, *,
                port: int = DEFAULT_PORT, bind_host: str = "0.0.0.0",
                dist_port: int = DEFAULT_DIST_PORT, warmup: bool = True,
                python: str = sys.executable) -> list[Step]:
    """The steps one host runs, in order; the last one execs the server."""
    steps: list[Step] = []
    converts = (storage.mode == "local" or storage.mode == "bucket" and host.rank == 0
                and not storage.must_exist)
    if storage.needs_fetch() and (converts or storage.mode == "hf"):
        fetch = ["download", storage.source, "--local-dir", str(storage.download_dir)]
        for pattern in HF_EXCLUDES:
            fetch += ["--exclude", pattern]
        steps.append(Step("fetch", (python, "-m", "huggingface_hub.cli.hf", *fetch)))
    info = marker_info(recipe, storage, plan.dtype)
    if storage.mode != "hf":
        marker = storage.checkpoint / READY_MARKER
        if converts:
            src = str(storage.download_dir) if storage.needs_fetch() else storage.source
            steps.append(Step("convert", sgljax_cmd(python, "convert", src, str(storage.checkpoint),
                                                    "--dtype", plan.dtype,
                                                    "--tp-size", str(plan.tp_size)), info=info))
            steps.append(Step("mark", kind="mark", path=marker, info=info))
        elif storage.must_exist:
            steps.append(Step("require", kind="require", path=marker, info=info))
        else:
            steps.append(Step("wait", kind="wait", path=marker, info=info))
    model = ["--model-path", str(storage.model_path)]
    # Warmup and serve each bring up their own distributed runtime: separate ports.
    if warmup:
        steps.append(Step("warmup", sgljax_cmd(python, "warmup", *model, *engine_flags(plan),
                                               *dist_flags(host, dist_port + 1))))
    steps.append(Step("serve", sgljax_cmd(python, "serve", *model, "--host", bind_host,
                                          "--port", str(port), *engine_flags(plan),
                                          *parser_flags(recipe), *dist_flags(host, dist_port)),
                        kind="exec"))
    return steps


def describe(steps: list[Step]) -> str:
    return "\n".join(f"# {s.label}\n{s.shell()}" for s in steps)


def _marker_matches(path: Path, info: dict) -> bool:
    if not path.is_file():
        return False
    try:
        found = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if {k: v for k, v in found.items() if k != "format"} == {
            k: v for k, v in info.items() if k != "format"}:
        return found.get("format") == info.get("format")  # older layout: convert again
    if found != info:
        raise PipelineError(f"{path.parent} holds a conversion of {found}, not {info}; "
                            "remove it or choose another checkpoint path")
    return True


def _converted(step: Step) -> bool:
    """Is the conversion this marker step stands for already there?

    Our marker says so, with what it was made from. Without one, a finished
    ``sgljax convert`` OUTPUT (it renames OUTPUT.partial when complete) counts for the
    host that would convert and for a checkpoint required in a bucket; followers
    wait for the marker, since renames on a mounted bucket are not atomic.
    """
    if _marker_matches(step.path, step.info):
        return True
    folder = step.path.parent
    return (step.kind in ("mark", "require") and folder.is_dir()
            and stored_format(folder) in (None, FORMAT_VERSION))


def run_steps(steps: list[Step], *, wait_timeout_s: float = 4 * 3600, poll_s: float = 10,
              log=lambda msg: print(f"[sgljax] {msg}", file=sys.stderr, flush=True)):
    """Run the steps; the last (serve) replaces this process. Skips done conversions."""
    # The steps run `python -m sgljax.cli.main` from wherever we are; in a checkout, the
    # folder on sys.path would let its top-level kernels/ shadow the PyPI `kernels`.
    os.environ.setdefault("PYTHONSAFEPATH", "1")
    skip = set()
    for s in steps:
        folder = s.path.parent if s.path else None
        if s.kind == "mark" and folder.is_dir() and stored_format(folder) not in (
                None, FORMAT_VERSION):
            log(f"{folder} was converted by an older sgljax (format {stored_format(folder)}); "
                "converting again")
            shutil.rmtree(folder)
    for s in steps:  # a finished conversion makes fetch and convert unnecessary
        if s.kind in ("mark", "wait", "require") and _converted(s):
            log(f"reusing the converted checkpoint in {s.path.parent}")
            skip = {"fetch", "convert", "wait", "require"}
            if s.path.is_file():
                skip.add("mark")
    for s in steps:
        if s.label in skip:
            continue
        log(f"{s.label}: {s.shell()}")
        t0 = time.monotonic()
        if s.kind == "require":
            raise PipelineError(f"no converted checkpoint at {s.path.parent}: the download does "
                                "not fit this host's disk, so convert it elsewhere into the bucket "
                                f"(sgljax convert {s.info['source']} ...)")
        if s.kind == "wait":
            while not _marker_matches(s.path, s.info):
                if time.monotonic() - t0 > wait_timeout_s:
                    raise PipelineError(f"gave up after {wait_timeout_s:.0f} s waiting for rank 0 "
                                        f"to write {s.path}")
                time.sleep(poll_s)
        elif s.kind == "mark":
            s.path.parent.mkdir(parents=True, exist_ok=True)
            s.path.write_text(json.dumps(s.info))
        elif s.kind == "exec":
            sys.stdout.flush()
            sys.stderr.flush()
            os.execv(s.argv[0], list(s.argv))
        else:
            code = subprocess.call(list(s.argv))
            if code != 0:
                raise PipelineError(f"{s.label} failed (exit {code}): {s.shell()}")
        log(f"{s.label} done in {time.monotonic() - t0:.1f} s")
