"""The sandbox languages a Scalebox kernel can speak: kernelspec names, wire names and `language_info`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..language_names import canonical as canonical_language


@dataclass(frozen=True)
class KernelLanguage:
    """One sandbox language as Jupyter sees it (`language_info`) and as the sandbox does (`wire`)."""

    key: str  # our name: python, r, nodejs, typescript, java, bash
    wire: str  # what ExecuteRequest.language / CreateContext carry (PROTOCOL.md 5.2)
    display: str  # "Python" in "Scalebox (Python)"
    language_info: dict[str, Any] = field(default_factory=dict)

    @property
    def kernel_name(self) -> str:
        return f"scalebox-{self.key}"

    @property
    def display_name(self) -> str:
        return f"Scalebox ({self.display})"

    @property
    def spec_language(self) -> str:
        """The kernelspec's `language`, which decides cell language and highlighting in frontends."""
        return str(self.language_info["name"])


LANGUAGES: dict[str, KernelLanguage] = {
    lang.key: lang
    for lang in (
        KernelLanguage(
            "python",
            "python",
            "Python",
            {
                "name": "python",
                "version": "3",
                "file_extension": ".py",
                "mimetype": "text/x-python",
                "codemirror_mode": {"name": "ipython", "version": 3},
                "pygments_lexer": "ipython3",
                "nbconvert_exporter": "python",
            },
        ),
        KernelLanguage(
            "r",
            "r",
            "R",
            {
                "name": "R",
                "file_extension": ".r",
                "mimetype": "text/x-r-source",
                "codemirror_mode": "r",
                "pygments_lexer": "r",
            },
        ),
        KernelLanguage(
            "nodejs",
            "nodejs",
            "Node.js",
            {
                "name": "javascript",
                "file_extension": ".js",
                "mimetype": "text/javascript",
                "codemirror_mode": "javascript",
                "pygments_lexer": "javascript",
            },
        ),
        KernelLanguage(
            "typescript",
            "typescript",
            "TypeScript",
            {
                "name": "typescript",
                "file_extension": ".ts",
                "mimetype": "text/typescript",
                "codemirror_mode": "typescript",
                "pygments_lexer": "typescript",
            },
        ),
        KernelLanguage(
            "java",
            "java",
            "Java",
            {
                "name": "java",
                "file_extension": ".jshell",
                "mimetype": "text/x-java-source",
                "codemirror_mode": "java",
                "pygments_lexer": "java",
            },
        ),
        KernelLanguage(
            "bash",
            "bash",
            "Bash",
            {
                "name": "bash",
                "file_extension": ".sh",
                "mimetype": "text/x-sh",
                "codemirror_mode": "shell",
                "pygments_lexer": "bash",
            },
        ),
    )
}


def get_language(name: str) -> KernelLanguage:
    """The language called `name` (any alias `canonical_language` knows, any case); ValueError naming the known
    ones otherwise."""
    lang = LANGUAGES.get(canonical_language(name)) if name.strip() else None
    if lang is None:
        raise ValueError(f"unknown language {name!r}; choose one of {', '.join(LANGUAGES)}")
    return lang
