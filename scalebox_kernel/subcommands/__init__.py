"""The `%scalebox` subcommands and named sessions, written once for both doors: the IPython extension
(`scalebox_kernel.magics`, sync, on the client's portal) and the Scalebox kernel (`scalebox_kernel.kernel`, on its
own loop). A door supplies its `Sessions` and an `Output` for the line or cell being run."""

from ._commands import COMMANDS_HELP, Commands, cell_parser, parse_env
from ._output import Output, SubcommandError
from ._sessions import DEFAULT, NamedSession, Sessions
from ._status import Runner, StatusPanel, status_widget

__all__ = [
    "COMMANDS_HELP",
    "DEFAULT",
    "Commands",
    "NamedSession",
    "Output",
    "Runner",
    "Sessions",
    "StatusPanel",
    "SubcommandError",
    "cell_parser",
    "parse_env",
    "status_widget",
]
