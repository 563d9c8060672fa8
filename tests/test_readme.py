"""README's federated toy example runs as written and trains."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_library_example_runs(capsys):
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "loop.run(" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - documentation under test
    history = namespace["history"]
    assert len(history) == 30 and history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert "loss" in capsys.readouterr().out
