"""A sandbox's private network: slirp4netns gives its namespace the internet, and routes keep it off the host.

slirp4netns makes the sandbox's connections from the host's own network stack, so without more a sandbox could
reach every service of the host (its non-loopback addresses: `--disable-host-loopback` only covers 127.0.0.1) and
of the networks around it. Before slirp4netns is attached, the server (root, in the sandbox's network namespace,
where sandbox code has no CAP_NET_ADMIN to undo it) adds `unreachable` routes for the host's own addresses, its
attached subnets, loopback, link-local (the cloud metadata address among them), multicast and reserved ranges and,
unless `allow_private_networks`, the private ranges; a connection there fails at once with "No route to host".
DNS goes to slirp's forwarder (10.0.2.3) only. There is no IPv6 (slirp4netns is started without it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import subprocess
from pathlib import Path

from .tools import run_tool

SLIRP_NAMESERVER = "10.0.2.3"
SLIRP_SUBNET = ipaddress.IPv4Network("10.0.2.0/24")
START_TIMEOUT = 10.0

#: Never reachable from a sandbox.
ALWAYS_BLOCKED = (
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local, cloud metadata (169.254.169.254)
    "192.0.0.0/24",
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, broadcast
)
#: Private networks (RFC 1918, carrier-grade NAT, benchmarking): reachable only with allow_private_networks.
PRIVATE = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16", "198.18.0.0/15")


def host_networks(ip: str = "ip") -> tuple[list[str], list[str]]:
    """(the host's own IPv4 addresses as /32s, its attached IPv4 subnets), read from `ip -j addr` when the
    sandbox's network starts (an address the host gets later is not fenced: see the README)."""
    try:
        listing = subprocess.run(
            [ip, "-j", "-4", "addr", "show"], capture_output=True, check=True, timeout=10, text=True
        ).stdout
        interfaces = json.loads(listing or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:  # never fence without knowing the host
        raise OSError(f"cannot read the host's addresses with `{ip} -j addr` ({exc})") from None
    addresses: list[str] = []
    subnets: list[str] = []
    for interface in interfaces:
        for info in interface.get("addr_info", []):
            local, prefix = info.get("local"), info.get("prefixlen")
            if not local or prefix is None:
                continue
            addresses.append(f"{local}/32")
            if interface.get("ifname") != "lo":
                subnets.append(str(ipaddress.ip_network(f"{local}/{prefix}", strict=False)))
    return addresses, subnets


def blocked_networks(*, allow_private: bool, ip: str = "ip") -> list[str]:
    """Every IPv4 network a sandbox's connections must not reach, most specific last, without duplicates."""
    addresses, subnets = host_networks(ip)
    wanted = [*ALWAYS_BLOCKED, *addresses]
    if not allow_private:
        wanted += [*PRIVATE, *subnets]
    networks: list[str] = []
    for text in wanted:
        network = ipaddress.ip_network(text, strict=False)
        if isinstance(network, ipaddress.IPv4Network) and network.subnet_of(SLIRP_SUBNET):
            continue  # the sandbox's own link to slirp (its gateway and DNS)
        if str(network) not in networks:
            networks.append(str(network))
    return networks


async def start_slirp(
    slirp: str, holder_pid: int, log: Path, env: dict[str, str]
) -> tuple[asyncio.subprocess.Process, int]:
    """slirp4netns for the namespace of `holder_pid`, once it is up; returns it and the fd that keeps it alive
    (closing that fd makes it exit)."""
    ready_read, ready_write = os.pipe()
    exit_read, exit_write = os.pipe()
    argv = [slirp, "--configure", "--mtu=65520", "--disable-host-loopback", "--enable-sandbox", "--enable-seccomp"]
    argv += [f"--ready-fd={ready_write}", f"--exit-fd={exit_read}", str(holder_pid), "tap0"]
    process: asyncio.subprocess.Process | None = None
    try:
        with open(log, "ab") as handle:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=handle,
                stderr=handle,
                env=env,
                pass_fds=(ready_write, exit_read),
                start_new_session=True,
            )
        os.close(ready_write)
        ready_write = -1
        ready = await asyncio.wait_for(asyncio.to_thread(os.read, ready_read, 1), START_TIMEOUT)
        if not ready:
            raise OSError("slirp4netns exited before the network was up")
    except BaseException:
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()
        os.close(exit_write)
        raise
    finally:
        for fd in (ready_read, ready_write, exit_read):
            if fd >= 0:
                os.close(fd)
    return process, exit_write


async def block(nsenter: str, ip: str, holder_pid: int, networks: list[str]) -> None:
    """Add an `unreachable` route for each network in the namespace of `holder_pid` (and no IPv6 route at all)."""
    commands = "".join(f"route add unreachable {network}\n" for network in networks)
    commands += "route add unreachable ::/0\n"
    argv = [nsenter, f"--target={holder_pid}", "--net", "--", ip, "-force", "-batch", "-"]
    await run_tool(argv, stdin=commands.encode(), timeout=START_TIMEOUT, what="fencing the sandbox's network")
