"""Time from `sgljax up local` to the first served token, cold and warm.

    python benchmarks/startup_time.py            # uses a fresh SGLJAX_CACHE_DIR: cold, then warm

Cold: nothing cached (the default model is converted, every bucket compiled).
Warm: the same command again (checkpoint reused, buckets loaded from the
persistent compilation cache).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import httpx

PORT = 30917


def first_token_seconds(env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sgljax.cli.main", "up", "local", "--port",
                             str(PORT)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"up local exited {proc.returncode}:\n{proc.stdout.read()[-3000:]}")
            try:
                r = httpx.post(f"http://127.0.0.1:{PORT}/v1/chat/completions", timeout=60, json={
                    "model": "default", "max_tokens": 16, "temperature": 0, "messages": [
                        {"role": "user", "content": "What is the capital of France?"}]})
                if r.status_code == 200:
                    return time.perf_counter() - t0, r.json()["choices"][0]["message"]["content"]
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        buckets = [line for line in out.splitlines() if "buckets" in line.lower()][:2]
        print("\n".join(buckets))


def main() -> None:
    cache = os.environ.get("SGLJAX_CACHE_DIR") or tempfile.mkdtemp(prefix="sgljax-startup-")
    env = {**os.environ, "SGLJAX_CACHE_DIR": cache}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    for label in ("cold", "warm"):
        secs, text = first_token_seconds(env)
        print(f"{label}: first served token after {secs:.1f} s ({text!r})")


if __name__ == "__main__":
    main()
