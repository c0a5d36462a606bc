"""Every case of fixtures/corpus/manifest.json through the CLI: exit code, one clear line, no harm done.

Per case: the exit code the manifest expects; on failure one ``error:`` line on stderr (plus at most
one ``hint:`` line) holding the expected substring, never a traceback; the corpus files byte for
byte unchanged; and no output file (or temporary leftover) in the output folder unless the case
succeeds and writes one. Regenerate the corpus with ``python fixtures/corpus/generate.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app

CORPUS = Path(__file__).resolve().parent.parent / "fixtures" / "corpus"
CASES = json.loads((CORPUS / "manifest.json").read_text())["cases"]

runner = CliRunner()


def _digests() -> dict[str, str]:
    return {str(p.relative_to(CORPUS)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(CORPUS.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def corpus_digests():
    return _digests()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus_case(case, tmp_path, corpus_digests, monkeypatch):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "result.onnx"
    args = [a.replace("{out}", str(out)) for a in case["command"]]
    monkeypatch.chdir(CORPUS)  # arguments are relative to the corpus folder
    result = runner.invoke(app, args)
    stderr = result.stderr
    everything = stderr + result.stdout + (repr(result.exception) if result.exception and
                                           not isinstance(result.exception, SystemExit) else "")

    assert "Traceback" not in everything, everything[-2000:]
    assert result.exit_code == case["expect_exit"], (
        f"{case['id']}: exit {result.exit_code}, expected {case['expect_exit']} ({case['why']})\n{stderr[-1500:]}")
    if case["expect_exit"] != 0:
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1, f"expected one error line, got:\n{stderr}"
        others = [ln for ln in lines if not ln.startswith(("error:", "hint:"))]
        assert not others, f"stderr must hold only the error (and a hint), got:\n{stderr}"
        assert len(errors[0]) < 400, f"error line too long ({len(errors[0])} chars): {errors[0]}"
        if case["expect_stderr"]:
            assert case["expect_stderr"].lower() in stderr.lower(), stderr

    # The corpus (inputs, canary) is untouched, and nothing was written next to it.
    assert _digests() == corpus_digests, "a corpus file changed or a file appeared in the corpus folder"
    left = sorted(os.listdir(out_dir))
    if case["writes_output"] and result.exit_code == 0:
        assert left == ["result.onnx"], left
    else:
        assert left == [], f"output folder not empty after {case['id']}: {left}"
