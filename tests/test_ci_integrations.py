"""The pre-commit hook and the GitHub Actions example, run the way pre-commit and the runner would."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import reports
from reports import validate

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
FX = reports.FIXTURES
BIN = Path(sys.executable).parent  # the onnx-linf console script of this environment


def env(**extra) -> dict:
    """This environment's console scripts first; a step summary only when the test sets one."""
    out = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    out["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**out, **extra}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def new_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "ci@example.com")
    git(repo, "config", "user.name", "ci")
    return repo


def run_hook(repo: Path, hook: dict, args: list[str]) -> subprocess.CompletedProcess:
    """What pre-commit does: the staged files matching `files`, appended to entry + args, one process
    (require_serial), run from the repository root."""
    staged = git(repo, "diff", "--cached", "--name-only", "--diff-filter=ACMR").split()
    files = [f for f in staged if re.search(hook["files"], f) and (repo / f).is_file()]
    cmd = shlex.split(hook["entry"]) + args + files
    return subprocess.run(cmd, cwd=repo, env=env(), capture_output=True, text=True, timeout=120)


def test_pre_commit_hook_fails_a_commit_that_adds_an_unscannable_model(tmp_path):
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (hook,) = hooks
    assert hook["id"] == "onnx-linf" and hook["require_serial"] is True and hook["language"] == "python"
    assert re.search(hook["files"], "m/model.onnx") and not re.search(hook["files"], "model.onnx.data")
    repo = new_repo(tmp_path)
    (repo / "models").mkdir()
    shutil.copy(FX / "digits_clean.onnx", repo / "models" / "clean.onnx")
    shutil.copy(FX / "broken" / "truncated.onnx", repo / "models" / "broken.onnx")
    (repo / "README.md").write_text("not a model\n")
    git(repo, "add", ".")
    args = ["--calib", str(reports.CALIB), "--limit", "8", "--provider", "cpu"]
    failed = run_hook(repo, hook, args)
    assert failed.returncode == 2, failed.stderr  # fail closed: the broken model blocks the commit
    assert "Traceback" not in failed.stderr
    git(repo, "rm", "-q", "--cached", "models/broken.onnx")
    passed = run_hook(repo, hook, args)
    assert passed.returncode == 0, passed.stderr


def test_github_workflow_commands_run_locally(tmp_path):
    wf = yaml.safe_load((ROOT / "examples" / "github-actions" / "onnx-linf.yml").read_text())
    job = wf["jobs"]["scan"]
    assert wf["permissions"]["security-events"] == "write"
    repo = new_repo(tmp_path)
    (repo / "models").mkdir()
    shutil.copy(FX / "digits_clean.onnx", repo / "models" / "clean.onnx")
    shutil.copy(FX / "digits_badnets.onnx", repo / "models" / "badnets.onnx")
    (repo / "data").mkdir()
    shutil.copytree(reports.CALIB, repo / "data" / "clean")
    # The repository's settings (small budgets here; see the workflow's comment).
    (repo / "onnx-linf.toml").write_text('limit = 16\nprovider = "cpu"\n')
    summary = tmp_path / "step_summary.md"
    summary.write_text("")
    ran = []
    for step in job["steps"]:
        if "run" not in step:
            continue
        command = step["run"]
        if "pip install" in command:
            assert "onnx-linf[report]" in command  # no network here: this environment has it installed
            continue
        done = subprocess.run(["bash", "-e", "-c", command], cwd=repo, capture_output=True, text=True, timeout=120,
                              env=env(GITHUB_STEP_SUMMARY=str(summary), **job["env"]))
        assert done.returncode == 0, (command, done.stderr)
        ran.append(command)
    assert len(ran) == 1
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("github/codeql-action/upload-sarif"))
    sarif = repo / upload["with"]["sarif_file"]
    validate(json.loads(sarif.read_text()))
    for name in next(s for s in job["steps"] if "upload-artifact" in s.get("uses", ""))["with"]["path"].split():
        assert (repo / name).is_file(), name
    text = summary.read_text()
    assert "models/badnets.onnx" in text and "models/clean.onnx" in text
