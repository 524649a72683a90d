"""Render the SkyPilot task for a recipe on a slice, from the templates in ``sky/``.

The task is a plain dict in SkyPilot's YAML schema (``sky.Task.from_yaml_config``
checks it). Everything host-specific is left to ``sgljax host-run`` on the hosts,
which reads the ``SGLJAX_*`` envs set here and SkyPilot's node rank and IPs.
"""

from __future__ import annotations

import copy
import importlib.metadata
import re
from pathlib import Path

import yaml

from sgljax.cli.pipeline import DEFAULT_PORT, Storage, is_hf_repo
from sgljax.cli.recipes import DTYPE_BYTES, DoesNotFit, Recipe, ServingPlan
from sgljax.cli.slices import GIB, Slice

TEMPLATES = Path(__file__).resolve().parent.parent / "sky"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# A TPU VM's boot disk is 100 GiB and SkyPilot 0.14.1 cannot grow it (its
# provision/gcp/instance_utils.py: "The boot disk of TPU VMs is not resizable").
BOOT_DISK_GIB = 100
# OS image, the venv with jax/libtpu, compilation cache, logs.
DISK_OVERHEAD_GIB = 25
HF_DTYPE_BYTES = 2  # the Hub checkpoints of these models are bfloat16

BUCKET_MOUNT = "/sgljax-ckpt"
HOST_ROOT = "~/sgljax"  # on each host: hf/<model> downloads, checkpoints/<model>-<dtype>
SECRET_ENVS = ("HF_TOKEN",)


def _template(name: str) -> dict:
    return yaml.safe_load((TEMPLATES / f"{name}.yaml").read_text()) or {}


def plan_storage(recipe: Recipe, dtype: str, *, bucket: str | None = None,
                 source: str | None = None) -> tuple[Storage, str]:
    """Pick where weights are fetched and converted, by the disk arithmetic.

    Returns the Storage and a one-line account of the disk use; DoesNotFit("disk")
    when even the download cannot fit and there is no bucket.
    """
    source = source or recipe.hf_repo
    fetched = recipe.shape.params * HF_DTYPE_BYTES / GIB if is_hf_repo(source) else 0.0
    converted = recipe.shape.params * DTYPE_BYTES[dtype] / GIB
    name = f"{recipe.name}-{dtype}"
    download = Path(f"{HOST_ROOT}/hf/{recipe.name}")
    local_need = fetched + converted + DISK_OVERHEAD_GIB
    account = (f"disk per host: download {fetched:.0f} GiB + converted {converted:.0f} GiB + "
               f"{DISK_OVERHEAD_GIB} GiB overhead = {local_need:.0f} GiB of {BOOT_DISK_GIB} GiB")
    if bucket:
        account = (f"disk per host: download {fetched:.0f} GiB + {DISK_OVERHEAD_GIB} GiB overhead; "
                   f"converted checkpoint ({converted:.0f} GiB) in {bucket}")
        must_exist = fetched + DISK_OVERHEAD_GIB > BOOT_DISK_GIB
        if must_exist:
            account += ("; the download does not fit a host's disk, so the bucket must already "
                        f"hold the conversion (sgljax convert {source} ... elsewhere)")
        return Storage("bucket", source, download, Path(f"{BUCKET_MOUNT}/{name}"),
                       must_exist), account
    if local_need <= BOOT_DISK_GIB:
        return Storage("local", source, download, Path(f"{HOST_ROOT}/checkpoints/{name}")), account
    if fetched and fetched + DISK_OVERHEAD_GIB <= BOOT_DISK_GIB:
        account += "; serving the downloaded HF folder without conversion"
        return Storage("hf", source, download, None), account
    raise DoesNotFit("disk", f"{recipe.name}: {account}; pass --bucket gs://BUCKET to keep the "
                     "converted checkpoint in a bucket mounted on every host")


def install_spec() -> tuple[str, Path | None]:
    """How hosts install sgljax: this source tree (synced as the workdir) or a release."""
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        return ".", PACKAGE_ROOT
    return f"sgljax=={importlib.metadata.version('sgljax')}", None


def jax_pin() -> str:
    try:
        return f"=={importlib.metadata.version('jax')}"
    except importlib.metadata.PackageNotFoundError:
        return ">=0.10"


def default_cluster_name(recipe: Recipe, sl: Slice) -> str:
    # SkyPilot names: lowercase letters, digits and dashes, starting with a letter.
    return re.sub(r"[^a-z0-9-]", "-", f"sgljax-{recipe.name}-{sl.name}".lower())


def parse_envs(pairs: list[str]) -> dict[str, str]:
    envs = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {pair!r}: expected KEY=VALUE")
        envs[key] = value
    return envs


def render_task(recipe: Recipe, sl: Slice, plan: ServingPlan, storage: Storage, *,
                port: int = DEFAULT_PORT, spot: bool = False, infra: str = "gcp",
                envs: dict[str, str] | None = None, bucket: str | None = None,
                name: str | None = None) -> dict:
    """The task dict for ``recipe`` on ``sl``; secrets hold their real values."""
    if sl.is_local:
        raise ValueError("`local` runs without SkyPilot; there is no task to render")
    common = _template("common")
    gen = _template(sl.generation)
    resources = {"infra": infra, "accelerators": sl.accelerator,
                 **copy.deepcopy(gen.get("resources", {})), "ports": [port], "use_spot": spot}
    spec, workdir = install_spec()
    user = dict(envs or {})
    secrets = {k: user.pop(k) for k in SECRET_ENVS if k in user}
    task = {"name": name or default_cluster_name(recipe, sl), "resources": resources,
            "num_nodes": common.get("num_nodes", 1)}
    task["envs"] = {
        "SGLJAX_MODEL": recipe.name,
        "SGLJAX_SLICE": sl.name,
        "SGLJAX_HOSTS": str(sl.hosts),
        "SGLJAX_PORT": str(port),
        "SGLJAX_STORAGE": storage.mode,
        "SGLJAX_SOURCE": storage.source,
        "SGLJAX_DOWNLOAD_DIR": str(storage.download_dir or ""),
        "SGLJAX_CHECKPOINT": str(storage.checkpoint or ""),
        "SGLJAX_CHECKPOINT_MUST_EXIST": "1" if storage.must_exist else "0",
        "SGLJAX_INSTALL": spec,
        "SGLJAX_JAX_PIN": jax_pin(),
        **user,
    }
    if secrets:
        task["secrets"] = secrets
    if workdir is not None:
        task["workdir"] = str(workdir)
    if bucket:
        task["file_mounts"] = {BUCKET_MOUNT: {"source": bucket, "mode": "MOUNT"}}
    task.update(setup=common["setup"], run=common["run"])
    return task


def masked(task: dict) -> dict:
    """The task with secret values hidden, for printing."""
    out = copy.deepcopy(task)
    for key in out.get("secrets", {}):
        out["secrets"][key] = "<set>" if out["secrets"][key] else ""
    return out


class _TaskDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as readable ``|`` blocks."""


_TaskDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def to_yaml(task: dict) -> str:
    return yaml.dump(task, Dumper=_TaskDumper, sort_keys=False, default_flow_style=False, width=100)
