"""sgljax vs llama.cpp's llama-server, side by side, on SmolLM2-135M-Instruct (F32 or BF16).

    python benchmarks/vs_llama_cpp.py [--dtype float32|bfloat16] [--only a,b,c,d] [--jobs 2] [--threads 2]
        [--work-dir ~/.cache/sgljax/llama.cpp] [--model-path HF_DIR] [--serve-arg=--flag ...]

Steps (each skipped when its result is already in --work-dir):
1. ``pip download --no-deps --no-binary :all: llama-cpp-python``: its sdist vendors llama.cpp.
2. Build ``llama-server`` from it with cmake (about 13 min on 2 cores).
3. Convert the HF folder sgljax prepares for its default model (config.json, tokenizer,
   float32 model.safetensors) to an F32 (or, with ``--dtype bfloat16``, BF16) GGUF with
   the sdist's convert_hf_to_gguf.py, and serve sgljax with the same ``--dtype``, so both
   servers run the same weights at the same precision: both round activations to the
   weights' dtype at each matmul and sum in float32, and both keep an F16 KV cache
   (llama-server's default; sgljax ``--kv-cache-dtype float16``, see ``--kv-cache-dtype``).
4. For each workload: start ``llama-server -m X.gguf -c C -np N -t T -cb`` (N = the
   workload's concurrency; C = 16,384, or more when N slots of the workload's longest
   request need it, because llama.cpp splits the context between slots), bench it, stop it.
5. Start ``sgljax serve`` once, bench every workload, stop it.
6. The in-run references, with no server running: the bare jitted forward
   (``bare_forward.py --batch 1 16 64``: the ceiling for the engine's decode step) and
   transformers ``generate`` at workload (a)'s shape (``hf_generate_baseline.py``: the
   naive baseline). ``--skip-reference`` leaves them out.
7. Print both tables and the ratios (sgljax / llama.cpp).

The two servers never run at the same time. Both are benched by the same client
(``sgljax bench``) with the same seed, so the prompts are identical.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import CONCURRENCY, MAX_TOKENS_PER_REQUEST, WORKLOADS, print_table, run_workload  # noqa: E402

GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}
CMAKE_FLAGS = ["-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def log(msg: str) -> None:
    print(f"[vs-llama.cpp] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def fetch_sources(work: Path, version: str | None) -> Path:
    """The vendored llama.cpp folder of the llama-cpp-python sdist."""
    found = sorted(work.glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    if found:
        return found[-1]
    sdists = work / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(sdists), spec])
    archive = sorted(sdists.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(work / "src", filter="data")
    found = sorted(work.glob("src/llama_cpp_python-*/vendor/llama.cpp"))
    if not found:
        raise SystemExit(f"error: {archive} has no vendor/llama.cpp")
    return found[-1]


def build_server(src: Path, jobs: int) -> Path:
    binary = src / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise SystemExit(f"error: building llama-server needs {tool}")
    run(["cmake", "-B", "build", *CMAKE_FLAGS], cwd=src)
    t0 = time.time()
    run(["cmake", "--build", "build", "--target", "llama-server", f"-j{jobs}"], cwd=src)
    log(f"llama-server built in {time.time() - t0:.0f} s")
    return binary


def default_model_dir() -> Path:
    """An HF folder (config, tokenizer, float32 safetensors) of the default model, made
    from the same GGUF sgljax serves (convert_hf_to_gguf.py needs safetensors)."""
    code = ("from sgljax.engine.model_files import cache_root, default_gguf, prepare_gguf_folder; "
            "print(prepare_gguf_folder(default_gguf(), "
            "cache_root() / 'models' / 'SmolLM2-135M-Instruct'))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def convert_deps(work: Path) -> dict:
    """convert_hf_to_gguf.py imports sentencepiece even for BPE tokenizers: install it
    into a folder of its own (not into the project's environment) when it is missing."""
    import importlib.util

    env = dict(os.environ)
    # The converter imports modules beside it (its own folder must be on sys.path).
    env.pop("PYTHONSAFEPATH", None)
    if importlib.util.find_spec("sentencepiece") is None:
        deps = work / "convert-deps"
        if not (deps / "sentencepiece").is_dir():
            run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(deps),
                 "sentencepiece"])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(deps), env.get("PYTHONPATH")]))
    return env


def convert_to_gguf(src: Path, model_dir: Path, work: Path, outtype: str) -> Path:
    gguf = work / f"{model_dir.name}-{outtype}.gguf"
    if gguf.is_file():
        return gguf
    tmp = gguf.with_suffix(".partial")
    run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", outtype,
         "--outfile", str(tmp)], env=convert_deps(work))
    tmp.rename(gguf)
    return gguf


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, stopped (and waited for) on exit."""

    def __init__(self, cmd: list[str], ready_path: str, port: int, logfile: Path, timeout: float):
        self.cmd, self.ready_path, self.timeout = cmd, ready_path, timeout
        self.url = f"http://127.0.0.1:{port}"
        self.logfile = logfile

    def __enter__(self) -> "Server":
        log("$ " + " ".join(self.cmd) + f"  (log: {self.logfile})")
        self.out = open(self.logfile, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.time() + self.timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: server exited ({self.proc.returncode}); see {self.logfile}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.__exit__()
                raise SystemExit(f"error: server not ready after {self.timeout:.0f} s; see {self.logfile}")
            time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()


def llama_ctx(name: str) -> int:
    slots = CONCURRENCY[name]
    per_slot = -(-MAX_TOKENS_PER_REQUEST[name] // 256) * 256 + 256  # rounded up, with room
    return max(16384, slots * per_slot)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="a,b,c,d")
    p.add_argument("--kv-cache-dtype", default="float16",
                   help="sgljax serve --kv-cache-dtype (llama-server's KV cache is F16 by default)")
    p.add_argument("--dtype", default="float32", choices=GGUF_TYPES,
                   help="weights of both servers: F32 or BF16 GGUF, sgljax serve --dtype")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "sgljax" / "llama.cpp"))
    p.add_argument("--model-path", default=None, help="HF folder (default: sgljax's SmolLM2 folder)")
    p.add_argument("--llama-cpp-python-version", default=None)
    p.add_argument("--jobs", type=int, default=2, help="parallel compile jobs")
    p.add_argument("--threads", type=int, default=2, help="llama-server -t")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="extra argument for sgljax serve (repeat; use --serve-arg=--flag)")
    p.add_argument("--output-file", default=None)
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--skip-sgljax", action="store_true")
    p.add_argument("--skip-reference", action="store_true",
                   help="skip the bare forward and transformers generate runs")
    args = p.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    if any(n not in WORKLOADS for n in names):
        raise SystemExit(f"error: --only takes workloads among {', '.join(WORKLOADS)}")
    work = Path(args.work_dir).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_path).expanduser() if args.model_path else default_model_dir()
    out = Path(args.output_file or work / f"vs-llama-cpp-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    common = ["--tokenizer", str(model_dir), "--seed", "1"]
    rows: list[tuple[str, str, dict]] = []

    if not args.skip_llama_cpp:
        src = fetch_sources(work, args.llama_cpp_python_version)
        binary = build_server(src, args.jobs)
        gguf = convert_to_gguf(src, model_dir, work, GGUF_TYPES[args.dtype])
        for name in names:
            port = free_port()
            cmd = [str(binary), "-m", str(gguf), "-c", str(llama_ctx(name)),
                   "-np", str(CONCURRENCY[name]), "-t", str(args.threads), "-cb",
                   "--host", "127.0.0.1", "--port", str(port)]
            with Server(cmd, "/health", port, work / "llama-server.log", timeout=300) as srv:
                rows.append(("llama.cpp", name, run_workload(
                    name, srv.url, out, ["--backend", "openai", *common])))

    if not args.skip_sgljax:
        port = free_port()
        cmd = [sys.executable, "-m", "sgljax.cli.main", "serve", "--model-path", str(model_dir),
               "--port", str(port), "--dtype", args.dtype,
               "--kv-cache-dtype", args.kv_cache_dtype, *args.serve_arg]
        with Server(cmd, "/v1/models", port, work / "sgljax-serve.log", timeout=1800) as srv:
            for name in names:
                rows.append(("sgljax", name, run_workload(
                    name, srv.url, out, ["--backend", "sgljax", *common])))

    if not args.skip_reference:
        here = Path(__file__).resolve().parent
        for script, extra in (("bare_forward.py", ["--batch", "1", "16", "64"]),
                              ("hf_generate_baseline.py", ["--batch-sizes", "16",
                                                           "--input-len", "256",
                                                           "--output-len", "128"])):
            print(f"== {script} {' '.join(extra)}", flush=True)
            subprocess.run([sys.executable, str(here / script), "--model-path", str(model_dir),
                            *extra], check=False)

    print_table(rows, f"sgljax vs llama.cpp · {model_dir.name} {GGUF_TYPES[args.dtype].upper()}")
    print_ratios(rows, names)
    print(f"results: {out}", file=sys.stderr)


def print_ratios(rows: list[tuple[str, str, dict]], names: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {(label, name): m for label, name, m in rows}
    t = Table(title="sgljax / llama.cpp (throughput: >1 is sgljax faster; latency: <1 is sgljax faster)")
    cols = (("out tok/s", "output_throughput"), ("req/s", "request_throughput"),
            ("TTFT p50", "median_ttft_ms"), ("TPOT p50", "median_tpot_ms"),
            ("ITL p50", "median_itl_ms"), ("E2E p50", "median_e2e_latency_ms"))
    t.add_column("workload")
    for title, _ in cols:
        t.add_column(title, justify="right")
    for name in names:
        a, b = by.get(("sgljax", name)), by.get(("llama.cpp", name))
        if not a or not b:
            continue
        cells = []
        for _, key in cols:
            x, y = a.get(key), b.get(key)
            cells.append("n/a" if not x or not y else f"{x / y:.2f}x")
        t.add_row(f"({name}) {WORKLOADS[name][0]}", *cells)
    Console(width=None if sys.stdout.isatty() else 160).print(t)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
