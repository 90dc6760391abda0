"""The README's Python examples run as written: the bundled model from Python (generate, stream,
the async engine) and its_hub's algorithms on the adapter."""
import re
from pathlib import Path

import pytest

from pfengine.toy.pf import is_bundled

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- tested: tests/test_readme.py runs this block -->"


def readme_examples() -> list[str]:
    return re.findall(re.escape(MARKER) + r"\n```python\n(.*?)\n```", README.read_text(), re.S)


def test_the_readme_marks_its_examples():
    assert len(readme_examples()) == README.read_text().count(MARKER) == 3


@pytest.mark.skipif(not is_bundled(), reason="the bundled toy checkpoints are missing")
def test_readme_examples_run(capsys):
    pytest.importorskip("its_hub")
    namespace: dict = {}
    for block in readme_examples():  # one namespace: the async example uses the first one's engine and request
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert out.count("answer:") == 2 and "streamed answer:" in out
    for name in ("particle filtering", "particle Gibbs", "beam search", "self-consistency", "best-of-N"):
        assert re.search(rf"^{name}: \d+$", out, re.M), out  # each its_hub algorithm gave a number
