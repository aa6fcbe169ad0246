"""Helpers shared by the client tests: a config pointing at a test server, and a secret-leak check."""

from __future__ import annotations

from typing import Any

from scalebox_kernel.config import ScaleboxConfig

# A cell that prints, then stays busy long enough for a callback to be provably early.
SLOW_PRINT = "import time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')\n"

PLOT = "%matplotlib inline\nimport matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()\n"


def config_for(server: Any, **overrides: Any) -> ScaleboxConfig:
    """A config for our client that points at a test scalebox-local (its URL, key and certificate)."""
    return ScaleboxConfig(api_key=server.api_key, api_url=server.url, ca_file=server.certfile, **overrides)


def assert_no_secret(text: str, *secrets: str | None) -> None:
    for secret in secrets:
        if secret:
            assert secret not in text, "a secret leaked into a message"


def access_token(sandbox: Any) -> str:
    """The sandbox's access token as the client holds it (only the tests look)."""
    inner = getattr(sandbox, "async_sandbox", sandbox)
    return inner._rpc.headers.get("X-Access-Token", "")
