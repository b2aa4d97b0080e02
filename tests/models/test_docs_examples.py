"""Every Python code block in the model documentation runs as written (in a scratch folder),
so the examples cannot drift from the API."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks() -> list:
    return [
        pytest.param(code, id=f"{name}-{i}")
        for name in ("models.md", "samplers.md")
        for i, code in enumerate(BLOCK.findall((DOCS / name).read_text()))
    ]


def test_the_docs_have_examples():
    assert len(blocks()) >= 4


@pytest.mark.parametrize("code", blocks())
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})
