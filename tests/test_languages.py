"""Every sandbox language through a real scalebox-local and our client: a print, an expression result, an error, a
rich display, an interrupt that keeps state (Deno: the announced restart), state carried between cells, per-cell
env vars, and packages that stay in the sandbox that installed them.

One sandbox serves the whole module (one kernel per language). The runtimes come from the real installer
(`language_support.runtimes_ready`); a language the machine cannot install is skipped with the reason.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import LocalServer
from language_support import CASES, skip_reason
from test_session import tiny_wheel

from scalebox_kernel.client import Execution, Sandbox
from scalebox_kernel.errors import ExecutionTimeout, InvalidArgument

pytestmark = pytest.mark.timeout(300)  # a first run may install the runtimes (about a minute)
LANGUAGES = list(CASES)


@pytest.fixture(scope="module")
def sbx(local_server: LocalServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(api_url=local_server.url, api_key=local_server.api_key, timeout=900)
    yield sandbox
    sandbox.kill()


def need(language: str) -> None:
    why = skip_reason(language)
    if why:
        pytest.skip(why)


def out(execution: Execution) -> str:
    return "".join(execution.logs.stdout)


def err(execution: Execution) -> str:
    return "".join(execution.logs.stderr)


def run(sbx: Sandbox, code: str, language: str, **options: object) -> Execution:
    return sbx.run_code(code, language=language, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("language", LANGUAGES)
def test_print_result_error_and_state(sbx: Sandbox, language: str) -> None:
    need(language)
    case = CASES[language]
    setup = run(sbx, case.setup, language)
    # Nothing of the kernel's start (jjava's log lines, deno's "unstable" warning) reaches the first cell.
    assert setup.error is None and not setup.results and out(setup) == "" and err(setup) == "", setup

    printed = run(sbx, case.prints, language)
    if language == "bash":  # bash runs on a pty: stderr arrives merged into stdout, in order
        assert out(printed) == "hello\nwarn\n" and err(printed) == ""
    else:
        assert out(printed) == "hello\n" and err(printed).strip() == "warn"
    assert printed.error is None and not printed.results

    value = run(sbx, case.value, language)
    assert value.error is None, value.error
    if language == "bash":  # no values in bash: what it prints is the answer
        assert out(value) == case.value_text and not value.results
    else:
        main = [r for r in value.results if r.is_main_result]
        assert len(main) == 1 and main[0].text == case.value_text and main[0].execution_count
        assert value.text == case.value_text and out(value) == ""

    failed = run(sbx, case.error, language)
    assert failed.error is not None, failed
    assert failed.error.name == case.error_name and case.error_value in failed.error.value, failed.error
    assert failed.error.traceback.strip()
    if language == "bash":  # what the command printed is shown once, as output, not again in the traceback
        assert out(failed).strip() and out(failed).strip() not in failed.error.traceback, failed.error
    assert not [r for r in failed.results if r.is_main_result]

    # Straight after an error (tslab refuses cells for 200 ms then), state is still there.
    again = run(sbx, case.value, language)
    assert again.error is None and (out(again) if language == "bash" else again.text) == case.value_text


@pytest.mark.parametrize("language", LANGUAGES)
def test_rich_display(sbx: Sandbox, language: str) -> None:
    need(language)
    case = CASES[language]
    shown = run(sbx, case.rich, language)
    assert shown.error is None, shown.error
    rich = [r for r in shown.results if case.rich_format in r.formats()]
    assert len(rich) == 1, [r.formats() for r in shown.results]
    if case.rich_format == "png":
        assert rich[0].png and rich[0].png.startswith("iVBOR") and not rich[0].is_main_result
    else:
        assert "<b>bold</b>" in (rich[0].html or "")
    # Java's display() returns its display id as a value: that id is not shown as a result.
    assert len(shown.results) == 1


@pytest.mark.parametrize("language", LANGUAGES)
def test_interrupt_keeps_state(sbx: Sandbox, language: str) -> None:
    """The client gives up on an endless loop (closing the stream interrupts the kernel); the next cell runs at
    once, in the same kernel. Deno cannot be interrupted: it is restarted and the next cell says so."""
    need(language)
    case = CASES[language]
    assert run(sbx, case.setup, language).error is None
    started = time.monotonic()
    with pytest.raises(ExecutionTimeout):
        run(sbx, case.loop, language, timeout=2)
    after = run(sbx, case.value, language)
    assert time.monotonic() - started < 30
    if language == "typescript":
        assert "cannot be interrupted, so it was restarted" in err(after)
        assert after.error is not None and after.error.name == "ReferenceError"  # x is gone with the old kernel
        assert run(sbx, case.setup, language).error is None
        assert run(sbx, case.value, language).text == case.value_text
    else:
        assert after.error is None, after.error
        assert (out(after) if language == "bash" else after.text) == case.value_text


@pytest.mark.parametrize("language", LANGUAGES)
def test_env_vars_apply_to_one_cell(sbx: Sandbox, language: str) -> None:
    need(language)
    case = CASES[language]
    if case.env_read is None:  # the JVM's environment is fixed when it starts: the cell says so
        shown = run(sbx, 'System.getenv("SBX_LANG_TEST")', language, envs={"SBX_LANG_TEST": "v"})
        assert "env_vars were not applied" in err(shown) and not shown.results
        return
    shown = run(sbx, case.env_read, language, envs={"SBX_LANG_TEST": "v"})
    assert shown.error is None and (out(shown) if language == "bash" else shown.text) == case.env_text
    gone = run(sbx, case.env_read, language)
    assert (out(gone) if language == "bash" else gone.text) != case.env_text


def test_aliases_reach_one_context_and_unknown_names_list_the_installed(sbx: Sandbox) -> None:
    groups = {
        "python": ("alias_x = 7", ("python3", "Python")),
        "nodejs": ("var alias_x = 7", ("javascript", "node", "JS")),
        "typescript": ("var alias_x = 7", ("deno", "ts")),
        "java": ("int alias_x = 7;", ("ijava",)),
    }
    for language, (setup, aliases) in groups.items():
        if skip_reason(language):
            continue
        assert run(sbx, setup, language).error is None
        for alias in aliases:
            shown = run(sbx, "alias_x", alias)
            assert shown.error is None and shown.text == "7", (alias, shown)
    with pytest.raises(InvalidArgument) as caught:
        run(sbx, "1", "cobol")
    installed = [name for name in CASES if not skip_reason(name)]
    assert f"available: {', '.join(installed)}" in str(caught.value)


def test_kernel_quirks_are_normalised(sbx: Sandbox) -> None:
    """What each kernel does differently, as users see it."""
    if not skip_reason("r"):
        # A value that is not the cell's last output is shown, but it is not the cell's value.
        shown = run(sbx, "y <- 5\ny\ncat('after\\n')", "r")
        assert [r.is_main_result for r in shown.results] == [False] and out(shown) == "after\n"
    if not skip_reason("nodejs"):
        compile_error = run(sbx, "let s = ;", "nodejs")
        assert compile_error.error is not None and compile_error.error.name == "CompileError"
        assert "1:9" in compile_error.error.traceback
        assert run(sbx, "'text'", "nodejs").text == "'text'"
    if not skip_reason("typescript"):
        syntax = run(sbx, "f(", "typescript")
        assert syntax.error is not None and syntax.error.name == "SyntaxError", syntax.error
        assert "Expression expected" in syntax.error.value
        colourless = run(sbx, "({ a: 1, b: 'two' })", "typescript")
        assert colourless.text == '{ a: 1, b: "two" }'  # NO_COLOR: no escape codes in text/plain
    if not skip_reason("java"):
        compile_error = run(sbx, 'int bad = "a";', "java")
        assert compile_error.error is not None and compile_error.error.name == "CompilationException"
        assert "incompatible types" in compile_error.error.value


def test_packages_install_into_their_sandbox_only(sbx: Sandbox, local_server: LocalServer) -> None:
    """`pip install` / `npm install` in one sandbox land in its own tree; another sandbox does not see them."""
    other = Sandbox.create(api_url=local_server.url, api_key=local_server.api_key, timeout=300)
    try:
        name, wheel = tiny_wheel("langpkg")
        sbx.files.write(f"/home/user/{name}", wheel)
        sbx.commands.run(f"pip install --no-index --quiet ./{name}", timeout=120)  # cwd: /home/user
        assert run(sbx, "import langpkg; langpkg.VALUE", "python").text == "'hello from langpkg 0.1'"
        assert run(other, "import langpkg", "python").error.name == "ModuleNotFoundError"  # type: ignore[union-attr]
        if not skip_reason("nodejs"):
            sbx.files.write("/home/user/jspkg/package.json", '{"name": "jspkg", "version": "1.0.0"}')
            sbx.files.write("/home/user/jspkg/index.js", "module.exports = { value: 'hello from jspkg' };")
            sbx.commands.run("npm install --no-audit --no-fund ./jspkg", cwd="/home/user", timeout=120)
            assert run(sbx, "require('jspkg').value", "nodejs").text == "'hello from jspkg'"
            missing = run(other, "require('jspkg')", "nodejs")
            assert missing.error is not None and "Cannot find module 'jspkg'" in missing.error.value
        if not skip_reason("r"):
            libs = run(sbx, "cat(.libPaths()[1])", "r")
            assert out(libs).endswith("/home/user/.local/lib/scalebox/R")
    finally:
        other.kill()
