"""README's API example runs as written (on CPU, with its sizes scaled down for the reference)."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_the_api_example_runs(capsys):
    block = re.search(r"## API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = block.replace('device="cuda"', 'device="cpu"').replace("4096", "64").replace("2112", "256")
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["y"].shape == (64, 256)
    assert namespace["block"] == (128, 128)
    assert "chosen:" in capsys.readouterr().out
