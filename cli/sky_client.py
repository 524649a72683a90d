"""Find SkyPilot, check cloud access cheaply, and call ``sky_bridge`` operations.

SkyPilot is used in-process when importable, else through its own interpreter
(``SGLJAX_SKY_PYTHON``, or the one in the ``sky`` command's shebang), running
``sky_bridge.py`` as a script. ``import sky`` costs seconds and its API server
another ~12 s to start, so missing credentials are caught first from files alone.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import yaml

BRIDGE = Path(__file__).resolve().with_name("sky_bridge.py")
INSTALL_HINT = ("SkyPilot is not installed: `uv tool install 'skypilot[gcp]==0.14.1'` (its own "
                "environment: it pins click<8.2), or set SGLJAX_SKY_PYTHON to an interpreter that "
                "has it")


class SkyUnavailable(RuntimeError):
    """SkyPilot is missing, or the cloud it needs is not set up."""


def _in_process() -> bool:
    spec = importlib.util.find_spec("sky")
    # A folder named sky/ on sys.path (like this package's templates when run from the
    # repo root) is a namespace package, not SkyPilot.
    return spec is not None and spec.origin is not None


def external_python() -> str | None:
    """SkyPilot's interpreter outside this process, if there is one."""
    explicit = os.environ.get("SGLJAX_SKY_PYTHON")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    cli = shutil.which("sky")
    if cli is None:
        return None
    try:
        first = Path(cli).read_bytes()[:512].split(b"\n", 1)[0].decode()
    except (OSError, UnicodeDecodeError):
        return None
    python = first[2:].strip().split()[0] if first.startswith("#!") and first[2:].strip() else ""
    return python if python and os.access(python, os.X_OK) else None


def backend() -> str:
    """``in-process`` or the path of SkyPilot's interpreter; SkyUnavailable if neither."""
    if os.environ.get("SGLJAX_SKY_PYTHON"):
        python = external_python()
        if python is None:
            raise SkyUnavailable(f"SGLJAX_SKY_PYTHON={os.environ['SGLJAX_SKY_PYTHON']} is not an "
                                 "executable interpreter")
        return python
    if _in_process():
        return "in-process"
    python = external_python()
    if python is None:
        raise SkyUnavailable(INSTALL_HINT)
    return python


def _remote_api_server() -> bool:
    """A remote SkyPilot API server holds the cloud credentials itself."""
    if os.environ.get("SKYPILOT_API_SERVER_ENDPOINT"):
        return True
    config = Path(os.environ.get("SKYPILOT_GLOBAL_CONFIG", "~/.sky/config.yaml")).expanduser()
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return bool((data.get("api_server") or {}).get("endpoint"))


def check_cloud_access(infra: str = "gcp") -> None:
    """Fail fast, from local files, where SkyPilot would fail slowly (``sky check``).

    Mirrors the first checks of SkyPilot's GCP.check_credentials: the gcloud CLI and
    application-default credentials (or a service-account key). Skipped with a remote
    API server, or SGLJAX_SKIP_CLOUD_CHECK=1.
    """
    if os.environ.get("SGLJAX_SKIP_CLOUD_CHECK") == "1" or _remote_api_server():
        return
    cloud = infra.split("/", 1)[0].lower()
    fix = "then run `sky check` (or point SKYPILOT_API_SERVER_ENDPOINT at a SkyPilot API server)"
    if cloud == "gcp":
        key = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        adc = Path("~/.config/gcloud/application_default_credentials.json").expanduser()
        if shutil.which("gcloud") is None:
            raise SkyUnavailable(f"no GCP access for SkyPilot: install the gcloud CLI and run "
                                 f"`gcloud auth application-default login`, {fix}")
        if not (key and Path(key).is_file()) and not adc.is_file():
            raise SkyUnavailable(f"no GCP credentials for SkyPilot: run `gcloud auth "
                                 f"application-default login` and `gcloud config set project "
                                 f"PROJECT`, {fix}")
    elif cloud in ("k8s", "kubernetes"):
        kubeconfig = Path(os.environ.get("KUBECONFIG", "~/.kube/config")).expanduser()
        if not kubeconfig.is_file():
            raise SkyUnavailable(f"no Kubernetes config ({kubeconfig}) for SkyPilot; {fix}")


def call(op: str, **request):
    """Run a bridge operation in-process or under SkyPilot's interpreter.

    ``validate`` returns its result; the others print as they go and return an exit code.
    """
    where = backend()
    if where == "in-process":
        from sgljax.cli import sky_bridge

        try:
            return getattr(sky_bridge, op)(**request)
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001 - SkyPilot's many errors → one line
            raise SkyUnavailable(sky_bridge._first_line(e)) from None
    captured = subprocess.PIPE if op == "validate" else None
    proc = subprocess.run([where, str(BRIDGE), op], input=json.dumps(request), text=True,
                          stdout=captured, stderr=captured)
    if op == "validate":
        if proc.returncode != 0:
            # The bridge's own one-line reason (e.g. a SkyPilot release sgljax does not
            # render for), else a generic one.
            errors = [line[len("error: "):] for line in (proc.stderr or "").splitlines()
                      if line.startswith("error: ")]
            raise SkyUnavailable(errors[-1] if errors else
                                 f"SkyPilot ({where}) could not validate the task")
        return json.loads(proc.stdout)
    return proc.returncode


def validate(configs: list[dict]) -> list[dict]:
    return call("validate", configs=configs)

