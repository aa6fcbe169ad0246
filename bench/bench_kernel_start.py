"""Issue 15: kernel start + first result, Scalebox vs a plain ipykernel. Each kernel process is started as its
kernelspec starts it, in turn (ipykernel, Scalebox forked by the zygote, Scalebox as a process of its own with
SCALEBOX_ZYGOTE=0, Scalebox on a server without a warm pool, ipykernel, ...) in one run: the time from the process's
start to its `kernel_info_reply`, and to the `execute_result` of a first `1+1` (for the Scalebox kernel that cell
opens a sandbox on a scalebox-local of the bench's own: from its warm pool, or cold). The zygote is the bench's own
too (a temporary SCALEBOX_ZYGOTE_DIR), started by the warm-up and stopped at the end. Before each start the pooled
server's pool is full again (its refill after a take would otherwise run beside the next start, whichever it is).
Prints medians and ratios; asserts nothing.

Run with `python -m bench.bench_kernel_start` from the repository root (BENCH_RUNS sets the starts of each).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.connect import write_connection_file
from jupyter_client.session import Session

from bench._common import env_set, local_server, own_zygote, server_env, wait_for_zygote, wait_pool
from scalebox_kernel.kernel.install import kernel_json
from scalebox_kernel.kernel.languages import LANGUAGES

RUNS = int(os.environ.get("BENCH_RUNS", "7"))
CODE = "1+1"
#: ms between the client's attempts to reach a port nobody listens on yet (zmq's default, 100, would round
#: every figure up to its next attempt).
RECONNECT_MS = 2


class KernelStart:
    """One kernel process, started from `argv` (`{connection_file}` filled in), and a client already connected
    to its ports before it starts, so that nothing of the client's own set-up is counted."""

    def __init__(self, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        connection_file = str(workdir / f"kernel-{uuid.uuid4().hex}.json")
        _, info = write_connection_file(connection_file, ip="127.0.0.1", key=uuid.uuid4().hex.encode())
        self.argv = [arg.replace("{connection_file}", connection_file) for arg in argv]
        self.session = Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
        self.context = zmq.Context()
        self.shell = self._socket(zmq.DEALER, info["shell_port"])
        self.control = self._socket(zmq.DEALER, info["control_port"])
        self.iopub = self._socket(zmq.SUB, info["iopub_port"])
        self.iopub.setsockopt(zmq.SUBSCRIBE, b"")

    def _socket(self, kind: int, port: int) -> zmq.Socket[Any]:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS)
        sock.linger = 0
        sock.connect(f"tcp://127.0.0.1:{port}")
        return sock

    def _receive(self, sock: zmq.Socket[Any], deadline: float) -> dict[str, Any]:
        if not sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            raise TimeoutError(f"{self.argv[:4]} sent nothing in time")
        _idents, frames = self.session.feed_identities(sock.recv_multipart())
        return self.session.deserialize(frames)

    def run(self, code: str | None) -> tuple[float, float | None]:
        """Seconds from the process's start to its kernel_info_reply, and to the result of `code`."""
        start = time.perf_counter()
        process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        try:
            self.session.send(self.shell, "kernel_info_request", {})
            deadline = time.monotonic() + 60
            while self._receive(self.shell, deadline)["msg_type"] != "kernel_info_reply":
                pass
            info = time.perf_counter() - start
            if code is None:
                return info, None
            request = self.session.send(self.shell, "execute_request", {"code": code, "silent": False})
            deadline = time.monotonic() + 180
            while True:
                msg = self._receive(self.iopub, deadline)
                if msg["parent_header"].get("msg_id") != request["header"]["msg_id"]:
                    continue
                if msg["msg_type"] == "error":
                    raise RuntimeError(f"{code!r} failed: {msg['content'].get('evalue')}")
                if msg["msg_type"] == "execute_result":
                    return info, time.perf_counter() - start
        finally:
            self._stop(process)

    def _stop(self, process: subprocess.Popen[bytes]) -> None:
        self.session.send(self.control, "shutdown_request", {"restart": False})  # the Scalebox one kills its sandbox
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.context.destroy(linger=0)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    plain = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    scalebox = kernel_json(LANGUAGES["python"])["argv"]
    labels = {
        "plain": "ipykernel_launcher (baseline)",
        "forked": "Scalebox, forked by the zygote, warm pool",
        "alone": "Scalebox, own process (ZYGOTE=0), warm pool",
        "cold": "Scalebox, forked by the zygote, cold",
    }
    times: dict[str, list[tuple[float, float | None]]] = {kind: [] for kind in labels}
    with (
        tempfile.TemporaryDirectory(prefix="scalebox-bench-start-") as tmp,
        local_server() as pooled,
        local_server(extra_args=["--ServerSettings.pool_size=0"]) as cold,
    ):
        workdir = Path(tmp)
        kinds = {
            "plain": (plain, {}),
            "forked": (scalebox, server_env(pooled)),
            "alone": (scalebox, {**server_env(pooled), "SCALEBOX_ZYGOTE": "0"}),
            "cold": (scalebox, server_env(cold)),
        }
        # The notebook store (which sandbox a notebook had) goes to a throwaway data dir, not the user's.
        with env_set({"JUPYTER_DATA_DIR": str(workdir / "data")}), own_zygote() as zygotes:
            for argv, extra in kinds.values():  # warm-up: the file system cache, the first sandbox, the zygote
                KernelStart(argv, workdir, extra).run(CODE)
            wait_for_zygote(zygotes)
            for _ in range(RUNS):
                for kind, (argv, extra) in kinds.items():
                    wait_pool(pooled)  # each start finds what a user's finds: a full pool, its refill done
                    times[kind].append(KernelStart(argv, workdir, extra).run(CODE))
    print(f"\nkernel start + first result, Scalebox vs a plain ipykernel ({RUNS} starts each, medians)")
    for what, index in (("start -> kernel_info_reply", 0), (f"start -> first result of `{CODE}`", 1)):
        base = [float(run[index] or 0) for run in times["plain"]]
        print(f"  {what}")
        print(f"    {labels['plain']:<46} {median_ms(base):9.1f} ms")
        for kind in ("forked", "alone", "cold"):
            ours = [float(run[index] or 0) for run in times[kind]]
            ratio = statistics.median(b / a for a, b in zip(base, ours, strict=True))  # pair by pair: load drifts
            print(f"    {labels[kind]:<46} {median_ms(ours):9.1f} ms   ratio {ratio:6.2f}x")


if __name__ == "__main__":
    main()
