"""Pathways (single-controller) mode: the wiring, and a bounded failure with no proxy.

No Pathways proxy runs here: what is tested is that the flags reach the
engine, that the default path stays untouched, and that a missing proxy ends
the process with one plain line instead of JAX's endless device discovery.
"""

import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from sgljax.engine import engine as engine_module
from sgljax.engine import pathways
from sgljax.engine.args import EngineArgs

BOUND_S = 60  # generous: the flag below asks for 5 s; imports take a few more


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_PLATFORMS", "JAX_BACKEND_TARGET",
                        pathways.PROXY_CONNECT_TIMEOUT_ENV)}
    return {**env, **extra}


def _run_cli(args, env):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sgljax.cli.main", *args], capture_output=True,
                         text=True, timeout=BOUND_S * 2, env=env)
    return out, time.monotonic() - t0


def _assert_one_error_line(out, *needles):
    assert out.returncode != 0, out.stderr
    errors = [l for l in out.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_serve_without_proxy_fails_bounded():
    addr = f"grpc://127.0.0.1:{_unused_port()}"
    out, elapsed = _run_cli(["serve", "--device", "proxy", "--pathways-proxy-addr", addr,
                             "--device-discovery-timeout", "5", "--port", str(_unused_port())],
                            _env())
    print(f"serve --device proxy with no proxy: exit {out.returncode} after {elapsed:.1f} s")
    assert elapsed < BOUND_S
    _assert_one_error_line(out, addr, "within 5 s", "--device-discovery-timeout")


def test_stuck_discovery_thread_cannot_hold_the_process():
    # The C++ client's own connect timeout set far beyond our bound: only the
    # daemon-thread bound can end this run, with a thread still stuck in C++.
    addr = f"grpc://127.0.0.1:{_unused_port()}"
    out, elapsed = _run_cli(["generate", "hi", "--controller", "pathways",
                             "--device-discovery-timeout", "3"],
                            _env(JAX_BACKEND_TARGET=addr,
                                 **{pathways.PROXY_CONNECT_TIMEOUT_ENV: "600"}))
    print(f"generate --controller pathways, stuck discovery: exit {out.returncode} "
          f"after {elapsed:.1f} s")
    assert elapsed < BOUND_S
    _assert_one_error_line(out, addr, "did not finish within 3 s")


# -- wiring ----------------------------------------------------------------------

def test_default_path_touches_nothing_pathways():
    code = ("import os, sys, jax\n"
            "from sgljax.engine.args import EngineArgs\n"
            "from sgljax.engine.pathways import init_backend\n"
            "a = EngineArgs()\n"
            "assert (a.device, a.controller, a.pathways) == ('auto', 'multi', False), a\n"
            "assert init_backend(a.device, a.pathways_proxy_addr,"
            " a.device_discovery_timeout) is False\n"
            "print('pathwaysutils' in sys.modules, jax.config.jax_platforms,"
            " os.environ.get('JAX_PLATFORMS'), jax.devices()[0].platform)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "None", "None", "cpu"], out.stdout


class _Reached(Exception):
    pass


def test_engine_selects_the_backend_before_touching_devices(monkeypatch):
    calls = []

    def fake_init_backend(device, addr, timeout):
        calls.append(("init_backend", device, addr, timeout))
        raise _Reached

    monkeypatch.setattr(engine_module, "init_backend", fake_init_backend)
    monkeypatch.setattr(engine_module, "make_mesh", lambda *a, **k: calls.append("make_mesh"))
    monkeypatch.setattr(engine_module, "enable_persistent_cache",
                        lambda *a, **k: calls.append("cache"))
    with pytest.raises(_Reached):
        engine_module.Engine(controller="pathways", pathways_proxy_addr="grpc://h:1",
                             device_discovery_timeout=7)
    assert calls == [("init_backend", "proxy", "grpc://h:1", 7)]


def test_pathways_mode_skips_the_local_compile_cache(monkeypatch):
    calls = []
    monkeypatch.setattr(engine_module, "init_backend", lambda *a: True)
    monkeypatch.setattr(engine_module, "enable_persistent_cache",
                        lambda *a, **k: calls.append("cache"))
    monkeypatch.setattr(engine_module, "make_mesh", lambda *a, **k: (_ for _ in ()).throw(_Reached))
    with pytest.raises(_Reached):
        engine_module.Engine(device="proxy", pathways_proxy_addr="grpc://h:1")
    assert calls == []


@pytest.mark.parametrize("kwargs", [{"device": "proxy"}, {"controller": "pathways"}])
def test_both_spellings_mean_pathways(kwargs, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    a = EngineArgs(**kwargs)
    assert (a.device, a.controller, a.pathways) == ("proxy", "pathways", True)


def test_jax_platforms_proxy_env_selects_pathways(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "proxy")
    assert EngineArgs().pathways
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not EngineArgs().pathways


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "proxy", "nnodes": 2}, "drop --nnodes 2"),
    ({"controller": "pathways", "nnodes": 2}, "one controller for the whole slice"),
    ({"controller": "pathways", "device": "cpu"}, "not --device cpu"),
    ({"device": "npu"}, "--device must be one of auto, cpu, tpu, cuda, gpu, proxy"),
    ({"controller": "single"}, "--controller must be one of multi, pathways"),
    ({"device": "proxy", "device_discovery_timeout": -1}, "--device-discovery-timeout"),
])
def test_bad_backend_settings_are_clear(kwargs, message, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    with pytest.raises(ValueError, match=message.replace("-", r"\-")):
        EngineArgs(**kwargs)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is not None, reason="a TPU runtime is here")
def test_missing_local_platform_is_one_line():
    out, _ = _run_cli(["generate", "hi", "--device", "tpu"], _env())
    _assert_one_error_line(out, "--device tpu: no usable tpu backend")


def test_cli_rejects_pathways_with_nnodes():
    out, _ = _run_cli(["serve", "--controller", "pathways", "--nnodes", "2",
                       "--dist-init-addr", "127.0.0.1:1"], _env())
    assert out.returncode == 1
    _assert_one_error_line(out, "drop --nnodes 2")


def test_missing_proxy_address_is_clear(monkeypatch):
    monkeypatch.delenv("JAX_BACKEND_TARGET", raising=False)
    with pytest.raises(ValueError, match="--pathways-proxy-addr"):
        pathways.connect_pathways(None, 5)


def test_pathways_after_local_backends_started_is_refused():
    import jax

    jax.devices()  # this test process already runs on CPU
    with pytest.raises(ValueError, match="before JAX starts"):
        pathways.connect_pathways("grpc://127.0.0.1:1", 5)


# -- the bounded probe -------------------------------------------------------------

def test_bounded_call_gives_up_on_a_call_that_blocks_forever():
    release = threading.Event()
    try:
        t0 = time.monotonic()
        with pytest.raises(pathways.DiscoveryTimeout, match="within 0.3 s"):
            pathways.bounded_call(release.wait, 0.3, name="fake-discovery")
        waited = time.monotonic() - t0
        assert 0.3 <= waited < 10
        assert any(t.name == "fake-discovery" and t.is_alive() for t in pathways._stuck_threads)
    finally:
        release.set()  # let the fake end, so this test process exits normally


def test_bounded_call_returns_results_and_raises_errors():
    assert pathways.bounded_call(lambda: [1, 2], 5) == [1, 2]
    assert pathways.bounded_call(lambda: "unbounded", 0) == "unbounded"
    with pytest.raises(RuntimeError, match="no backend"):
        pathways.bounded_call(lambda: (_ for _ in ()).throw(RuntimeError("no backend")), 5)


def test_unreachable_proxy_error_is_a_user_error():
    err = pathways._unreachable("grpc://h:9", 2, "device discovery did not finish")
    assert isinstance(err, OSError)  # so the CLI prints it as one line and exits 1
    assert "grpc://h:9" in str(err) and "within 2 s" in str(err)


def test_process_with_a_stuck_thread_exits_nonzero():
    code = ("import sys, threading\n"
            "from sgljax.engine.pathways import bounded_call, DiscoveryTimeout\n"
            "try:\n"
            "    bounded_call(threading.Event().wait, 0.2)\n"
            "except DiscoveryTimeout:\n"
            "    print('timed out', flush=True)\n"
            "sys.exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=_env())
    assert out.stdout.strip() == "timed out"
    assert out.returncode == 1  # the stuck probe marks the run failed, whatever main says
