"""The README's example must run as written."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert (tmp_path / "my-afgpt" / "model.safetensors").exists()
    loss = float(re.search(r"loss after 30 steps: ([\d.]+)", capsys.readouterr().out).group(1))
    assert loss < 2.0  # started near ln(256) = 5.5


def test_ci_runs_the_readme_test_command():
    command = re.search(r"## Test\n\n```bash\n(.*?)\n```", README.read_text(), re.S).group(1)
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()
    assert command in ci  # exactly that line; the floor check runs after it


def test_readme_patch_example_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n# patch-example\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    assert capsys.readouterr().out.split() == ["AfGPTNeoForCausalLM", "afgpt_gpt_neo"]
    assert (tmp_path / "neo-spline" / "model.safetensors").exists()
