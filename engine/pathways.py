"""Choosing the JAX backend, including Pathways (single-controller) through an IFRT proxy.

In the default multi-controller mode every host runs this program and JAX
finds its local accelerators itself. In Pathways mode one controller process
drives the whole slice: JAX's ``proxy`` platform talks to a Pathways IFRT
proxy server (``JAX_BACKEND_TARGET``, e.g. ``grpc://localhost:29000`` on
Pathways on Cloud) and ``pathwaysutils.initialize()`` registers that backend.

With no proxy answering, JAX's device discovery waits forever inside C++,
where a Python thread cannot be interrupted. So discovery runs in a daemon
thread that the caller waits on for a bounded time; on timeout the error
names the address and the process is guaranteed to be able to exit.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import sys
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

PROXY_PLATFORM = "proxy"
# pathwaysutils' proxy client reads this connect timeout (seconds, an integer).
PROXY_CONNECT_TIMEOUT_ENV = "PATHWAYS_PROXY_CONNECTION_TIMEOUT_SECS"


class DeviceDiscoveryError(ConnectionError):
    """No devices could be found in time (an OSError: the CLI prints it as one line)."""


class DiscoveryTimeout(TimeoutError):
    """``bounded_call`` gave up; the call may still be running in its daemon thread."""


_stuck_threads: list[threading.Thread] = []


def _exit_despite_stuck_threads() -> None:
    # Registered after JAX's own atexit hooks, so it runs before them: a thread
    # stuck in backend initialization may hold locks those hooks would wait on.
    if any(t.is_alive() for t in _stuck_threads):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def bounded_call(fn: Callable[[], Any], timeout_s: float, name: str = "bounded-call") -> Any:
    """``fn()`` in a daemon thread; its result, its exception, or DiscoveryTimeout.

    ``timeout_s <= 0`` waits without a bound. After a timeout the thread is
    left behind (it cannot be stopped), and the process will exit with status 1
    even if interpreter shutdown would otherwise wait on it.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s if timeout_s > 0 else None)
    if thread.is_alive():
        if not _stuck_threads:
            atexit.register(_exit_despite_stuck_threads)
        _stuck_threads.append(thread)
        raise DiscoveryTimeout(f"{name} did not finish within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _unreachable(addr: str, timeout_s: float, how: str) -> DeviceDiscoveryError:
    return DeviceDiscoveryError(
        f"no Pathways proxy answered at {addr} ({how} within {timeout_s:g} s): check that the "
        "IFRT proxy server is running and reachable from this host, that "
        "--pathways-proxy-addr / JAX_BACKEND_TARGET is right, or raise "
        "--device-discovery-timeout")


def _backends_already_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API; without it, trust the caller
        return False


def connect_pathways(addr: str | None, timeout_s: float) -> list:
    """Point JAX at the Pathways proxy at ``addr`` and discover its devices, bounded."""
    import jax

    addr = addr or os.environ.get("JAX_BACKEND_TARGET")
    if not addr:
        raise ValueError("Pathways mode needs the proxy address: --pathways-proxy-addr "
                         "grpc://HOST:PORT or the JAX_BACKEND_TARGET environment variable")
    if _backends_already_started() and PROXY_PLATFORM not in (jax.config.jax_platforms or ""):
        raise ValueError("Pathways mode must be chosen before JAX starts its backends "
                         "(this process already uses local devices)")
    try:
        import pathwaysutils
    except ImportError:
        raise ValueError("Pathways mode needs the pathwaysutils package "
                         "(pip install pathwaysutils)") from None
    # Both env (for any child process and for code that reads it) and config (JAX has
    # already read the env at import).
    os.environ["JAX_PLATFORMS"] = PROXY_PLATFORM
    os.environ["JAX_BACKEND_TARGET"] = addr
    jax.config.update("jax_platforms", PROXY_PLATFORM)
    jax.config.update("jax_backend_target", addr)
    if timeout_s > 0:
        # The C++ client can give up on an unanswered connect by itself, which ends the
        # thread cleanly: give it a second less than our own bound so it usually wins.
        os.environ.setdefault(PROXY_CONNECT_TIMEOUT_ENV, str(max(1, math.floor(timeout_s) - 1)))
    pathwaysutils.initialize()  # registers the proxy backend; turns JAX's compile cache off
    log.info("Pathways: discovering devices through %s (bound %s s)", addr,
             f"{timeout_s:g}" if timeout_s > 0 else "none")
    try:
        devices = bounded_call(jax.devices, timeout_s, name="pathways-device-discovery")
    except DiscoveryTimeout:
        raise _unreachable(addr, timeout_s, "device discovery did not finish") from None
    except RuntimeError as e:  # the client's own connect timeout, or a refused connection
        log.debug("JAX proxy backend error: %s", e)
        raise _unreachable(addr, timeout_s, "connection failed") from None
    log.info("Pathways: %d devices (%s)", len(devices), devices[0].device_kind if devices else "-")
    return devices


def init_backend(device: str, pathways_proxy_addr: str | None = None,
                 discovery_timeout_s: float = 60.0) -> bool:
    """Select the JAX platform before anything touches devices; True in Pathways mode."""
    if device == PROXY_PLATFORM:
        connect_pathways(pathways_proxy_addr, discovery_timeout_s)
        return True
    if device != "auto":
        import jax
        jax.config.update("jax_platforms", device)
        try:
            jax.devices()
        except RuntimeError as e:  # e.g. --device tpu where libtpu is missing
            detail = str(e).split(" (set JAX_PLATFORMS")[0]
            raise ValueError(
                f"--device {device}: no usable {device} backend here ({detail})") from None
    return False
