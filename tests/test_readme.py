"""The README's Python tour runs as written and prints what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 1
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert capsys.readouterr().out.strip() == "(512, 2) 10"
    assert namespace["x_ode"].shape == (512, 2) and namespace["x_guided"].shape == (512, 2)
    nll = namespace["nll"]
    assert nll.shape == (8,) and bool((nll > -5).all() & (nll < 20).all())
    # 200 Adam steps lower the eps loss below its value for a network that predicts zero (~1)
    assert float(namespace["loss"]) < 0.9
