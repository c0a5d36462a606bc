"""Folder and Triton repository scans (fail closed), the settings file (sources, overrides, allowlist)."""

from __future__ import annotations

import datetime as dt
import json
import shutil

import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.settings import find_config, load_settings
from onnx_linf.errors import UsageError
from onnx_linf.model.triton import parse_pbtxt, read_triton

import reports
from reports import validate

FX = reports.FIXTURES
CONFIG_PBTXT = """
name: "digits"   # the model's name
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "input"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 1, 16, 16 ]
  }
]
output [ { name: "logits" data_type: TYPE_FP32 dims: [ 10 ] } ]
instance_group { count: 1 kind: KIND_CPU }
"""


def invoke(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


@pytest.fixture
def models_dir(tmp_path):
    """A clean, a backdoored (in a subfolder) and a broken model."""
    root = tmp_path / "models"
    (root / "vendor").mkdir(parents=True)
    shutil.copy(FX / "digits_clean.onnx", root / "clean.onnx")
    shutil.copy(FX / "digits_badnets.onnx", root / "vendor" / "badnets.onnx")
    shutil.copy(FX / "broken" / "truncated.onnx", root / "broken.onnx")
    return root


def test_folder_fails_closed_three_rows_sarif_summary(models_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("scan", "models", "--calib", reports.CALIB, "--limit", "16", "--provider", "cpu",
                    "--sarif", "scan.sarif", "--summary", "summary.md", "--json", "scan.json")
    assert result.exit_code == 2, result.stderr  # one model could not be scanned
    assert "Traceback" not in result.stderr
    doc = json.loads((tmp_path / "scan.json").read_text())
    assert [m["path"] for m in doc["scanned"]] == ["models/clean.onnx", "models/vendor/badnets.onnx"]
    assert [(m["path"], m["error"]) for m in doc["skipped"]] == [("models/broken.onnx", "ModelLoadError")]
    assert "not a valid ONNX model" in doc["skipped"][0]["reason"]
    assert doc["summary"]["unscannable"] == 1 and doc["summary"]["clean"] == 0  # never counted clean
    assert doc["scanned"][1]["report"]["model"]["sha256"] == reports.plain_scan().model.sha256
    log = json.loads((tmp_path / "scan.sarif").read_text())
    validate(log)
    got = [(r["ruleId"], r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
           for r in log["runs"][0]["results"]]
    assert got == [("OLINF003", "models/broken.onnx"), ("OLINF005", "models/clean.onnx"),
                   ("OLINF005", "models/vendor/badnets.onnx")]
    summary = (tmp_path / "summary.md").read_text().splitlines()
    rows = [line for line in summary if line.startswith("| ") and "`" in line]
    assert len(rows) == 3 and rows[0].startswith("| ❌ **not scanned** | `models/broken.onnx`")
    for name in ("broken.onnx", "clean.onnx", "badnets.onnx"):  # one row per model on the terminal too
        assert name in result.stderr
    # --skip-unscannable: the broken model no longer fails the run, and it is still reported.
    again = invoke("scan", "models", "--calib", reports.CALIB, "--limit", "16", "--provider", "cpu",
                   "--skip-unscannable", "--json", "-", "-q")
    assert again.exit_code == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["skip_unscannable"] is True and [m["path"] for m in doc["skipped"]] == ["models/broken.onnx"]


def test_empty_folder_is_nothing_to_scan(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("scan", tmp_path / "empty", "--calib", reports.CALIB, "-q")
    assert result.exit_code == 3


def test_pbtxt_parser():
    data = parse_pbtxt(CONFIG_PBTXT)
    assert data["name"] == ["digits"] and data["max_batch_size"] == [8]
    assert data["input"][0]["dims"] == [1, 16, 16] and data["input"][0]["format"] == ["FORMAT_NCHW"]
    assert data["instance_group"][0]["kind"] == ["KIND_CPU"]
    with pytest.raises(ValueError):
        parse_pbtxt("input [ { name: 'x' ")


def test_triton_repository_reads_the_input_size(tmp_path):
    repo = tmp_path / "repo"
    (repo / "digits" / "1").mkdir(parents=True)
    (repo / "digits" / "config.pbtxt").write_text(CONFIG_PBTXT)
    shutil.copy(FX / "digits_clean.onnx", repo / "digits" / "1" / "model.onnx")
    info = read_triton(repo / "digits" / "1" / "model.onnx")
    assert info.name == "digits" and info.version == "1" and info.size() == (16, 16)
    result = invoke("scan", repo, "--calib", reports.CALIB, "--limit", "8", "--provider", "cpu", "--json", "-", "-q")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layout"] == "triton"
    m = doc["scanned"][0]
    assert m["triton"]["name"] == "digits" and m["triton"]["size"] == [16, 16]
    assert m["settings"]["size"] == {"value": [16, 16], "source": "config.pbtxt"}
    assert m["report"]["preprocess"]["size"] == [16, 16]


def test_config_file_sources_overrides_and_cli_precedence(models_dir, tmp_path, monkeypatch):
    (tmp_path / ".git").mkdir()  # the search stops at the repository root
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.onnx-linf]\nlayers = "last"\nratio = 0.25\nlimit = 8\n\n'
        '[[tool.onnx-linf.overrides]]\nglob = "models/vendor/*"\nlayers = "all"\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert find_config() == tmp_path / "pyproject.toml"
    shutil.copy(FX / "broken" / "truncated.onnx", models_dir / "broken.onnx")
    result = invoke("scan", models_dir, "--calib", reports.CALIB, "--ratio", "0.5", "--provider", "cpu",
                    "--skip-unscannable", "--json", "-", "-q")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["config"] == str(tmp_path / "pyproject.toml")
    clean, bad = doc["scanned"]
    src = str(tmp_path / "pyproject.toml")
    assert clean["settings"]["layers"] == {"value": "last", "source": src}
    assert bad["settings"]["layers"] == {"value": "all", "source": f"{src} override 'models/vendor/*'"}
    assert clean["settings"]["ratio"] == {"value": 0.5, "source": "command line"}  # the flag wins
    assert clean["settings"]["provider"]["source"] == "command line"
    assert clean["settings"]["score"] == {"value": "linf", "source": "default"}
    assert len(clean["report"]["taps"]) == 1 and len(bad["report"]["taps"]) == 3
    assert clean["report"]["calibration"]["images"] == 8 and clean["report"]["policy"]["ratio"] == 0.5
    assert clean["report"]["extra"]["settings"]["limit"]["source"] == src  # recorded in each scan report too


def test_expired_allowlist_entry_fails_the_gate(tmp_path, monkeypatch):
    sha = reports.plain_scan().model.sha256
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".git").mkdir()

    def gate(expires: dt.date):
        (tmp_path / "onnx-linf.toml").write_text(
            f'synthesize = true\nfail_on_suspect = true\nclasses = [0, 1, 2]\nmax_queries = 30000\nlimit = 16\n'
            f'[[allowlist]]\nsha256 = "{sha}"\nreason = "reviewed: fixture"\nexpires = {expires.isoformat()}\n')
        return invoke("scan", FX / "digits_badnets.onnx", "--calib", reports.CALIB, "--provider", "cpu",
                      "--sarif", tmp_path / "g.sarif", "-q")

    expired = gate(dt.date.today() - dt.timedelta(days=1))
    assert expired.exit_code == 1, expired.stderr
    log = json.loads((tmp_path / "g.sarif").read_text())
    validate(log)
    assert log["runs"][0]["results"][0]["ruleId"] == "OLINF004"
    valid = gate(dt.date.today() + dt.timedelta(days=30))
    assert valid.exit_code == 0, valid.stderr


@pytest.mark.parametrize("text, message", [
    ("ratio = 'high'", "setting 'ratio'"),
    ("colour = 1", "unknown setting 'colour'"),
    ("[[allowlist]]\nsha256 = 'abc'\nreason = 'x'\nexpires = 2030-01-01", "64 hex digits"),
    ("[[allowlist]]\nsha256 = 'abc'", "needs sha256, reason and expires"),
    ("[[overrides]]\nsize = '8x8'", "needs a glob"),
    ("ratio = ", "cannot read config file"),
])
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "onnx-linf.toml"
    path.write_text(text + "\n")
    with pytest.raises(UsageError, match=message):
        load_settings(path)


def test_bad_config_on_the_command_line_is_one_line(tmp_path):
    (tmp_path / "c.toml").write_text("layers = 3\n")
    result = invoke("scan", FX / "digits_clean.onnx", "--calib", reports.CALIB, "--config", tmp_path / "c.toml")
    assert result.exit_code == 2 and result.stderr.startswith("error: setting 'layers'")
    assert "Traceback" not in result.stderr and result.stdout == ""
