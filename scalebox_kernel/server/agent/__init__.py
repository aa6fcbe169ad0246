"""The agent of scalebox-local: everything that runs inside one sandbox, and its Connect RPCs by path."""

from .agent import SandboxAgent
from .rpcs import RPCS, CallInfo, Rpc

__all__ = ["RPCS", "CallInfo", "Rpc", "SandboxAgent"]
