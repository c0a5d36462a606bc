"""Run the README's onnx-linf examples and check every model they write (checker + ONNX Runtime)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if line.startswith("onnx-linf "):
                commands.append(line)
            elif "&& " in line and "onnx-linf " in line:  # the set-up one-liner ends with the main job
                commands.append(line[line.index("onnx-linf "):])
    return commands


def test_readme_has_examples():
    assert len(readme_commands()) >= 4


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    runner = CliRunner()
    for command in readme_commands():
        args = shlex.split(command)[1:]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"{command}\n{result.stderr}"
    written = [p for p in tmp_path.glob("*.onnx")]
    assert written, "the README examples should write models"
    for path in written:
        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x = np.zeros([d if isinstance(d, int) else 2 for d in sess.get_inputs()[0].shape], np.float32)
        assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape[0] == 2


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_use_existing_fixtures(command):
    for token in shlex.split(command):
        if token.startswith("fixtures/"):
            assert (ROOT / token).exists(), token
