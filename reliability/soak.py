"""Soak a live sgljax server with mixed traffic and watch its resources (not CI).

For N minutes, C concurrent clients send a mix of: streamed chat, n>1 completions,
logprobs, prompts sharing a long prefix (the radix cache), and streams cancelled at a
random point. Every S seconds it samples the server's RSS and open file descriptors
(/proc/PID), and its KV usage (/get_server_info); at the end it prints a table and a
summary: requests by kind and outcome, any 5xx, and growth of RSS / fds / held pages.

    python reliability/soak.py --minutes 3 --model-path PATH   # starts a server itself
    python reliability/soak.py --minutes 3 --base-url http://127.0.0.1:30000 --pid PID

Only 127.0.0.1 is targeted. Exit status 1 if any request got a 5xx or a transport error,
or the server still holds KV pages / running requests after the traffic stops.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

SHARED_PREFIX = ("You are a meticulous assistant. The following is a long shared preamble "
                 "used by every prefix-sharing request so the radix cache can serve it. ") * 3
TOPICS = ["cats", "the sea", "volcanoes", "bread", "trains", "moss", "chess", "rain", "copper"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Soak:
    def __init__(self, base_url: str, pid: int, max_tokens: int, seed: int):
        self.url, self.pid, self.max_tokens = base_url.rstrip("/"), pid, max_tokens
        self.rng = random.Random(seed)
        self.counts: collections.Counter = collections.Counter()
        self.failures: list[str] = []
        self.samples: list[dict] = []
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)

    # -- traffic ------------------------------------------------------------------------------
    def _request(self) -> tuple[str, str, dict, bool]:
        kind = self.rng.choice(["stream-chat", "n-choices", "logprobs", "prefix", "cancel",
                                "generate"])
        topic = self.rng.choice(TOPICS)
        mt = self.rng.randint(4, self.max_tokens)
        if kind == "stream-chat":
            return kind, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                "max_tokens": mt, "stream": True, "stream_options": {"include_usage": True}}, True
        if kind == "n-choices":
            return kind, "/v1/completions", {"prompt": f"A poem about {topic}:", "n": 3,
                                             "max_tokens": mt,
                                             "seed": self.rng.randint(0, 99)}, False
        if kind == "logprobs":
            return kind, "/v1/chat/completions", {
                "messages": [{"role": "user", "content": f"One word for {topic}?"}],
                "max_tokens": mt, "logprobs": True, "top_logprobs": 5, "temperature": 0}, False
        if kind == "prefix":
            return kind, "/v1/completions", {"prompt": SHARED_PREFIX + f"Now: {topic}.",
                                             "max_tokens": mt, "temperature": 0}, False
        if kind == "cancel":
            return kind, "/v1/completions", {"prompt": f"An endless story of {topic}",
                                             "max_tokens": self.max_tokens * 4, "stream": True,
                                             "ignore_eos": True}, True
        return kind, "/generate", {"text": f"Facts about {topic}:",
                                   "stream": self.rng.random() < .5,
                                   "sampling_params": {"max_new_tokens": mt}}, False

    async def _one(self, client: httpx.AsyncClient) -> None:
        kind, path, body, streamed = self._request()
        streamed = streamed or bool(body.get("stream"))
        t0 = time.monotonic()
        try:
            if streamed:
                cut = self.rng.randint(1, 20) if kind == "cancel" else None
                async with client.stream("POST", path, json=body) as r:
                    if r.status_code >= 500:
                        raise RuntimeError(f"HTTP {r.status_code}")
                    events = 0
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            events += 1
                            if '"error"' in line:
                                raise RuntimeError(f"stream error event: {line[:200]}")
                            if cut is not None and events >= cut:
                                self.counts[kind, "cancelled"] += 1
                                self.latencies[kind].append(time.monotonic() - t0)
                                return
                status = r.status_code
            else:
                r = await client.post(path, json=body)
                status = r.status_code
            if status >= 500:
                raise RuntimeError(f"HTTP {status}: {r.text[:200]}")
            self.counts[kind, str(status)] += 1
            self.latencies[kind].append(time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - counted and reported
            self.counts[kind, "FAILED"] += 1
            self.failures.append(f"{kind}: {type(e).__name__}: {e}"[:300])

    async def _client(self, client: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            await self._one(client)

    # -- sampling --------------------------------------------------------------------------------
    async def _sample(self, client: httpx.AsyncClient, t0: float) -> None:
        st = (await client.get("/get_server_info")).json()["internal_states"]
        self.samples.append({"t": time.monotonic() - t0, "rss_mb": rss_mb(self.pid),
                             "fds": open_fds(self.pid), "running": st["num_running"],
                             "queued": st["num_queued"], "kv_used": st["kv_pages_used"],
                             "kv_held": st["kv_pages_held_by_requests"],
                             "kv_total": st["kv_pages_total"],
                             "requests": sum(self.counts.values())})

    async def _sampler(self, client: httpx.AsyncClient, t0: float, until: float,
                       every: float) -> None:
        while time.monotonic() < until:
            await self._sample(client, t0)
            await asyncio.sleep(every)

    async def run(self, minutes: float, concurrency: int, every: float) -> dict:
        t0 = time.monotonic()
        until = t0 + minutes * 60
        limits = httpx.Limits(max_connections=concurrency + 4)
        async with httpx.AsyncClient(base_url=self.url, timeout=300, limits=limits) as c:
            await asyncio.gather(self._sampler(c, t0, until, every),
                                 *[self._client(c, until) for _ in range(concurrency)])
            deadline = time.monotonic() + 60  # let aborted sequences leave the engine
            while True:
                await self._sample(c, t0)
                s = self.samples[-1]
                if (s["running"] == s["queued"] == s["kv_held"] == 0) or \
                        time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
        return self.samples[-1]

    # -- report ----------------------------------------------------------------------------------
    def report(self, final: dict) -> bool:
        cols = ["t", "rss_mb", "fds", "running", "queued", "kv_used", "kv_held", "kv_total",
                "requests"]
        print(" ".join(f"{c:>9}" for c in cols))
        step = max(1, len(self.samples) // 20)
        for s in self.samples[::step] + [final]:
            print(" ".join(f"{s[c]:>9.1f}" if isinstance(s[c], float) else f"{s[c]:>9}"
                           for c in cols))
        first, warm = self.samples[0], self.samples[min(len(self.samples) - 1, 3)]
        print("\nrequests by kind and outcome:")
        for (kind, outcome), n in sorted(self.counts.items()):
            lat = self.latencies.get(kind) or [0]
            print(f"  {kind:12} {outcome:10} {n:6}   p50 {sorted(lat)[len(lat) // 2]:.2f} s")
        peak_kv = max(s["kv_used"] for s in self.samples)
        print(f"\nsummary: {sum(self.counts.values())} requests, "
              f"{sum(n for (k, o), n in self.counts.items() if o == 'FAILED')} failed; "
              f"RSS {first['rss_mb']:.0f} -> {final['rss_mb']:.0f} MiB (after warm-up "
              f"{warm['rss_mb']:.0f}, peak {max(s['rss_mb'] for s in self.samples):.0f}); fds "
              f"{first['fds']} -> {final['fds']} (peak {max(s['fds'] for s in self.samples)}); "
              f"KV pages peak {peak_kv}/{final['kv_total']}, held by requests after: "
              f"{final['kv_held']}, running after: {final['running']}")
        for f in self.failures[:10]:
            print("  failure:", f)
        return not self.failures and final["kv_held"] == 0 and final["running"] == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--sample-every", type=float, default=5.0, help="seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", help="a running server (then give --pid)")
    ap.add_argument("--pid", type=int, help="the server's process id, for RSS and fds")
    ap.add_argument("--model-path", help="start `sgljax serve` on this model instead")
    ap.add_argument("serve_args", nargs="*", help="more `sgljax serve` flags (after --)")
    a = ap.parse_args()
    proc = None
    if a.base_url is None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(f"/tmp/sgljax-soak-{port}.log", "w")
        cmd = [sys.executable, "-m", "sgljax.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(port), *(["--model-path", a.model_path] if a.model_path else []),
               *a.serve_args]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        a.base_url, a.pid = f"http://127.0.0.1:{port}", proc.pid
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(a.base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"error: the server did not start; see {log.name}", file=sys.stderr)
                return 1
            time.sleep(0.5)
        print(f"server pid {proc.pid} on {a.base_url}, log {log.name}")
    if urlparse(a.base_url).hostname not in ("127.0.0.1", "localhost"):
        print("error: the soak only targets 127.0.0.1", file=sys.stderr)
        return 1
    if a.pid is None:
        print("error: give --pid of the server (for RSS and open fds)", file=sys.stderr)
        return 1
    soak = Soak(a.base_url, a.pid, a.max_tokens, a.seed)
    try:
        ok = soak.report(asyncio.run(soak.run(a.minutes, a.concurrency, a.sample_every)))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
