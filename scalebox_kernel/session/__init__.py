"""The session layer: a sandbox's lifetime (create lazily, reuse, re-attach by id, auto-resume), its packages and
files, progress, timing and insights; `Session` is the seed SDK's Session API on top of it."""

from ..language_names import canonical as canonical_language
from ._facade import KeepAliveResult, Session, SessionInfo, SessionResult
from ._progress import STAGES, ProgressInfo
from ._sandbox import WORKSPACE, Attach, SandboxSession

__all__ = [
    "STAGES",
    "WORKSPACE",
    "Attach",
    "KeepAliveResult",
    "ProgressInfo",
    "SandboxSession",
    "Session",
    "SessionInfo",
    "SessionResult",
    "canonical_language",
]
