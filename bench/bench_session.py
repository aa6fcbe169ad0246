"""Issue 4: p50 of `Session.run` with a new session (sandbox create + kernel start + run + kill) beside reusing a
kept session (lookup + run), against a scalebox-local of its own. Prints both p50s and the ratio; asserts nothing.

Run with `python -m bench.bench_session` from the repository root (BENCH_RUNS sets the runs of each kind).
"""

from __future__ import annotations

import os

from bench._common import env_set, local_server, p50_ms, report, server_env, timed
from scalebox_kernel.session import Session

RUNS = int(os.environ.get("BENCH_RUNS", "10"))
CODE = "1+1"


def main() -> None:
    with local_server() as info, env_set(server_env(info)):
        new = p50_ms(timed(lambda: Session.run(CODE), RUNS, warmup=1))
        kept = Session.run("pass", keep_alive=True).session_id
        try:
            reuse = p50_ms(timed(lambda: Session.run(CODE, session_id=kept), RUNS, warmup=1))
        finally:
            Session.close(kept)  # type: ignore[arg-type]
    rows = [("Session.run, new session each time (baseline)", new), ("Session.run, reusing one session", reuse)]
    report(f"Session.run(`{CODE}`), {RUNS} runs each", rows, new)
    print(f"  new / reuse: {new / reuse:.1f}x")


if __name__ == "__main__":
    main()
