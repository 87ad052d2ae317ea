"""The README examples (this package's and the repository's "Python SDK" section) run as they
are, against the test daemon through `$HUTCH_HOME`."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from conftest import REPO, Daemon


def snippets(path: Path, section: str | None = None) -> list[str]:
    text = path.read_text()
    if section is not None:
        # The section ends at the next heading of its level or above.
        text = re.split(r"\n#{2,3} ", text.split(section, 1)[1], maxsplit=1)[0]
    return re.findall(r"```python\n(.*?)```", text, re.S)


def run(code: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<readme>", "exec"), {"__name__": "__readme__"})
    return out.getvalue()


@pytest.fixture
def home(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HUTCH_HOST", raising=False)
    monkeypatch.setenv("HUTCH_HOME", str(daemon.home))


def test_repository_readme_snippet(home: None) -> None:
    [code] = snippets(REPO / "README.md", "### Python SDK")
    out = run(code)
    assert out.startswith("42\n\n"), out
    assert out.count("stdout b'") >= 1 and "3" in out


def test_sdk_readme_examples(home: None) -> None:
    example, asyncio_example = snippets(REPO / "sdk" / "python" / "README.md")
    out = run(example)
    assert "0 out\n err\n False" in out
    assert "hello world" in out and "exit Exit(exit_code=0" in out
    assert "50 132" in out and "from the host" in out
    assert "command_not_found 422" in out and out.count("b'hi\\n'") == 3
    assert "streamed" in run(asyncio_example)
