"""A deployment that refuses what the clamp's gate flags: the gate output, measured by `evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from onnx_linf.cli.app import app
from onnx_linf.commands.clamp import ClampConfig, clamp
from onnx_linf.measure.accuracy import AccuracyJob, evaluate, open_labelled
from onnx_linf.measure.calibrate import model_tensor
from onnx_linf.measure.preprocess import Preprocess, Trigger
from onnx_linf.measure.session import create_session
from onnx_linf.model.load import load_model
from onnx_linf.rewrite.clamp import GATED_OUTPUT

runner = CliRunner()


@pytest.fixture(scope="module")
def gated(fixtures_dir, tmp_path_factory):
    """The digits Blended model clamped with the gate output, and what a direct run of it gives."""
    model = load_model(fixtures_dir / "digits_blended.onnx")
    pp = Preprocess.from_model(model)
    trig = Trigger.from_files(fixtures_dir / "digits_blended_trigger.png", fixtures_dir / "digits_blended_mask.png", pp)
    out = tmp_path_factory.mktemp("refusal") / "safe.onnx"
    result = clamp(model, fixtures_dir / "digits_calib", ClampConfig(provider="cpu", gate_output=True), output=out)
    return model, pp, trig, result.proto, out


def test_evaluate_counts_what_refusing_the_flagged_images_gives(fixtures_dir, gated):
    model, pp, trig, proto, _ = gated
    test = open_labelled(fixtures_dir / "digits_test.npz", pp)
    ev = evaluate(model, test, pp, trigger=trig, target=0, proto=proto, provider="cpu", refusal=GATED_OUTPUT)
    session = create_session(model, proto, "cpu")
    right, refused, hit, refused_t, keep, recovered = [], [], [], [], [], []
    for batch in test.batches(64):
        logits, flag = session.run(None, model_tensor(batch, pp))
        right.append(logits.argmax(1) == batch.labels)
        refused.append(flag)
        logits, flag = session.run(None, model_tensor(batch, pp, trig))
        keep.append(batch.labels != 0)
        hit.append(logits.argmax(1) == 0)
        recovered.append(logits.argmax(1) == batch.labels)
        refused_t.append(flag)
    right, refused, hit, refused_t, keep, recovered = map(np.concatenate,
                                                          (right, refused, hit, refused_t, keep, recovered))
    assert ev.accuracy == pytest.approx(right.mean()) and ev.asr == pytest.approx(hit[keep].mean())
    assert ev.refused == pytest.approx(refused.mean())
    assert ev.accepted_correct == pytest.approx((right & ~refused).mean())
    assert ev.refused_triggered == pytest.approx(refused_t[keep].mean())
    assert ev.asr_accepted == pytest.approx((hit & ~refused_t)[keep].mean())
    assert ev.triggered_accuracy == pytest.approx(recovered[keep].mean())
    # measured: the gate flags every triggered test image of this fixture and about 0.5% of clean ones
    assert ev.refused_triggered >= 0.95 and ev.asr_accepted <= 0.02 and ev.refused <= 0.02
    plain = evaluate(model, test, pp, trigger=trig, target=0, proto=proto, provider="cpu")
    assert plain.refused is None and plain.asr_accepted is None and plain.asr == ev.asr


def test_refusal_counts_of_shards_add_up_to_the_whole(fixtures_dir, gated):
    model, pp, trig, proto, _ = gated
    test = open_labelled(fixtures_dir / "digits_test.npz", pp)
    job = AccuracyJob(trig, 0, GATED_OUTPUT)
    session = create_session(model, proto, "cpu")
    whole = job.run(session, test, pp, 50)
    halves = [job.run(session, test.shard(a, b), pp, 50) for a, b in ((0, 150), (150, 400))]
    assert job.merge(*halves) == whole and whole.refused_triggered > 0


def test_cli_evaluate_reads_the_gate_output_of_a_clamped_model(fixtures_dir, gated):
    *_, path = gated
    args = ["evaluate", str(path), "--data", str(fixtures_dir / "digits_test.npz"), "--trigger",
            str(fixtures_dir / "digits_blended_trigger.png"), "--mask", str(fixtures_dir / "digits_blended_mask.png"),
            "--target", "0"]
    r = runner.invoke(app, args + ["--json", "-", "-q"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)["evaluation"]
    assert ev["refused_triggered"] >= 0.95 and ev["asr_accepted"] <= 0.02
    # the probes suspect the target, so a gated image keeps its features: measured 97.4% true class
    assert ev["triggered_accuracy"] >= 0.9
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "refused: clean / triggered" in r.output and "triggered, true class" in r.output
    plain = runner.invoke(app, ["evaluate", str(fixtures_dir / "digits_blended.onnx"), "--data",
                                str(fixtures_dir / "digits_test.npz"), "--json", "-", "-q"])
    assert json.loads(plain.stdout)["evaluation"]["refused"] is None


def test_clamp_summary_states_the_gate_and_what_refusing_gives(fixtures_dir, tmp_path):
    summary = tmp_path / "s.md"
    r = runner.invoke(app, ["clamp", str(fixtures_dir / "digits_blended.onnx"), "--calib",
                            str(fixtures_dir / "digits_calib"), "-o", str(tmp_path / "safe.onnx"), "--gate-output",
                            "--eval-data", str(fixtures_dir / "digits_test.npz"), "--trigger",
                            str(fixtures_dir / "digits_blended_trigger.png"), "--mask",
                            str(fixtures_dir / "digits_blended_mask.png"), "--target", "0", "-q",
                            "--summary", str(summary)])
    assert r.exit_code == 0, r.output
    text = summary.read_text()
    assert "Score gate: at most 1% of clean images flagged" in text and "`onnx_linf_gated`" in text
    clamped = next(line for line in text.splitlines() if line.startswith("| clamped"))
    cells = [c.strip() for c in clamped.strip("|").split("|")]
    assert cells[-1] == "0.0%" and cells[3].endswith("/ 100.0%")  # every triggered test image refused
