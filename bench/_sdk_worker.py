"""The official SDK's side of bench_sdk, run by the SDK's own venv python (it cannot import scalebox_kernel).

It creates one sandbox with `scalebox.code_interpreter.Sandbox` (SBX_* and SSL_CERT_FILE come from the
environment), then answers lines on stdin: `run N` times N trivial `run_code` calls and answers one JSON list of
seconds; `quit` kills the sandbox. The SDK prints to stdout on its own, so the answers go to a private copy of
the original stdout and everything else to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time

CODE = "1 + 1"


def main() -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    from scalebox.code_interpreter import Sandbox

    sandbox = Sandbox.create(timeout=600)
    try:
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["run"]:
                samples = []
                for _ in range(int(command[1])):
                    start = time.perf_counter()
                    execution = sandbox.run_code(CODE)
                    samples.append(time.perf_counter() - start)
                    if execution.text != "2":
                        raise RuntimeError(f"run_code({CODE!r}) gave {execution.text!r}, error {execution.error!r}")
                answers.write(json.dumps(samples) + "\n")
            elif command[:1] == ["quit"]:
                break
    finally:
        sandbox.kill()


if __name__ == "__main__":
    main()
