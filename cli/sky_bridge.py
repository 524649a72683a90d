"""Every call into SkyPilot, in one file that imports nothing from sgljax.

SkyPilot 0.14.1 pins click<8.2 and uvicorn<0.36, which clash with sgljax's own
dependencies (huggingface_hub needs click>=8.4.2), so it often lives in its own
environment (``uv tool install skypilot``). This file then runs as a script under
SkyPilot's interpreter: ``python sky_bridge.py OP`` with a JSON request on stdin.
When SkyPilot is importable in-process, ``sky_client`` calls the same functions.
"""

from __future__ import annotations

import json
import re
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The SkyPilot releases whose task schema sgljax renders for (sky_task.py); scripts/setup-sky.sh
# installs the pinned one. Another release may reject or misread the task.
SUPPORTED = ((0, 14), (0, 15))
SUPPORTED_TEXT = ">=0.14,<0.15"


class SkyVersionError(RuntimeError):
    """The SkyPilot found is outside SUPPORTED."""


def _first_line(e: BaseException) -> str:
    text = ANSI.sub("", str(e)).strip().splitlines()
    if isinstance(e, SkyVersionError):
        return text[0]
    return f"{type(e).__name__}: {text[0] if text else ''}"


def check_version(version: str) -> None:
    """SkyVersionError unless ``version`` (SkyPilot's ``__version__``) is in SUPPORTED."""
    m = re.match(r"\s*(\d+)\.(\d+)", version or "")
    if m and SUPPORTED[0] <= (int(m[1]), int(m[2])) < SUPPORTED[1]:
        return
    raise SkyVersionError(
        f"SkyPilot {version or '(unknown version)'} found; sgljax renders tasks for SkyPilot "
        f"{SUPPORTED_TEXT}: run `bash scripts/setup-sky.sh` (SkyPilot 0.14.1 in .venv-sky) and "
        "set SGLJAX_SKY_PYTHON=.venv-sky/bin/python")


def _import_sky():
    import sky

    check_version(str(getattr(sky, "__version__", "")))
    return sky


def validate(configs: list[dict]) -> list[dict]:
    """Check task dicts with SkyPilot's own parser; offline, no API server."""
    sky = _import_sky()

    out = []
    for config in configs:
        try:
            task = sky.Task.from_yaml_config(json.loads(json.dumps(config)))
            res = list(task.resources)[0]
            out.append({"ok": True, "num_nodes": task.num_nodes,
                        "accelerators": dict(res.accelerators or {}),
                        "accelerator_args": dict(res.accelerator_args or {}),
                        "ports": [str(p) for p in (res.ports or [])],
                        "use_spot": bool(res.use_spot), "envs": dict(task.envs),
                        "secrets": sorted(task.secrets)})
        except Exception as e:  # noqa: BLE001 - SkyPilot raises many kinds; report each
            out.append({"ok": False, "error": _first_line(e)})
    return out


def _pick_cluster(sky, cluster: str | None) -> str:
    if cluster:
        return cluster
    names = [r["name"] for r in sky.get(sky.status())]  # records are dict-like
    ours = [n for n in names if n.startswith("sgljax-")]
    if len(ours) != 1:
        raise ValueError(f"name the cluster; sgljax clusters: {', '.join(ours) or 'none'}")
    return ours[0]


def launch(config: dict, cluster: str, port: int, detach: bool = False) -> int:
    sky = _import_sky()

    task = sky.Task.from_yaml_config(config)
    job_id, _handle = sky.stream_and_get(sky.launch(task, cluster_name=cluster))
    endpoints = sky.get(sky.endpoints(cluster, port))
    endpoint = endpoints.get(port) or endpoints.get(str(port))  # keys may arrive as strings
    print(f"endpoint: http://{endpoint}/v1 (OpenAI API; it answers once the log says the "
          "server is up)", flush=True)
    print(f"logs: sgljax logs {cluster}   stop: sgljax down {cluster}", flush=True)
    if detach:
        return 0
    return int(sky.tail_logs(cluster, job_id, follow=True) or 0)


def down(cluster: str | None) -> int:
    sky = _import_sky()

    name = _pick_cluster(sky, cluster)
    sky.stream_and_get(sky.down(name))
    print(f"{name}: down", flush=True)
    return 0


def status() -> int:
    sky = _import_sky()

    records = sky.get(sky.status())
    if not records:
        print("no clusters")
    for r in records:
        state = r.get("status")
        print(f"{r.get('name')}\t{getattr(state, 'value', state)}\t{r.get('resources_str') or ''}")
    return 0


def logs(cluster: str | None, follow: bool = True) -> int:
    sky = _import_sky()

    return int(sky.tail_logs(_pick_cluster(sky, cluster), None, follow=follow) or 0)


OPS = {"validate": validate, "launch": launch, "down": down, "status": status, "logs": logs}


def main(argv: list[str]) -> int:
    op = OPS.get(argv[1] if len(argv) > 1 else "")
    if op is None:
        print(f"usage: sky_bridge.py {{{','.join(OPS)}}} < request.json", file=sys.stderr)
        return 2
    request = json.load(sys.stdin)
    try:
        result = op(**request)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user, not a traceback
        print(f"error: {_first_line(e)}", file=sys.stderr)
        return 1
    if op is validate:
        json.dump(result, sys.stdout)
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
