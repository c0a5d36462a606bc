"""prune and evaluate: evidence rules, verification, files, exit codes, and the effect on the fixture."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import onnx_linf.commands.prune as prune_command
from onnx_linf.cli.app import app
from onnx_linf.cli.exit_codes import ExitCode
from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.options import ScanConfig
from onnx_linf.commands.prune import PruneConfig, prune
from onnx_linf.errors import VerificationError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def fx(fixtures_dir):
    class F:
        model = fixtures_dir / "digits_badnets.onnx"
        calib = fixtures_dir / "digits_calib"
        trigger = fixtures_dir / "digits_badnets_trigger.png"
        mask = fixtures_dir / "digits_badnets_mask.png"
        test = fixtures_dir / "digits_test.npz"
    return F


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prune_with_trigger_writes_verified_model_and_keeps_input(fx, tmp_path):
    before = sha(fx.model)
    out = tmp_path / "clean.onnx"
    result = invoke("prune", fx.model, "--calib", fx.calib, "--ratio", "0.1", "--trigger", fx.trigger,
                    "--mask", fx.mask, "-o", out, "--json", tmp_path / "r.json", "--limit", "100", "-q")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert sha(fx.model) == before  # the input model's bytes are untouched
    assert out.exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["policy"]["score"] == "differential linf"
    surgery = report["extra"]["surgery"]
    assert surgery and sum(len(s["channels"]) for s in surgery) == 3  # 10% of 32 channels of relu3
    assert report["extra"]["verification"]["ok"] is True
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


def fake_synthesis(suspected: tuple[int, ...], monkeypatch):
    """Replace the (slow) trigger search by a fixed result: class 0's trigger is the real BadNets one."""
    import onnx_linf.commands.evidence as evidence_module
    import onnx_linf.decide.synthesis.results as synth
    from onnx_linf.measure.preprocess import Preprocess, Trigger

    fx_dir = Path(__file__).resolve().parent.parent / "fixtures"
    real = Trigger.from_files(fx_dir / "digits_badnets_trigger.png", fx_dir / "digits_badnets_mask.png",
                              Preprocess((16, 16), channels="L"))

    def fake(model, source, preprocess, config=synth.SynthConfig(), **kw):
        triggers = tuple(synth.ClassTrigger(c, real.mask[..., 0] if c == 0 else np.ones((16, 16), np.float32),
                                            real.pattern, 9.0 if c == 0 else 60.0, 0.99, True, 100, 0.1)
                         for c in range(10))
        anomaly = {c: (5.0 if c in suspected else 0.0) for c in range(10)}
        return synth.SynthResult(triggers, anomaly, suspected, config.threshold, 1000, 0.1, config)

    monkeypatch.setattr(evidence_module, "synthesize", fake)  # where the command looks it up


def test_prune_without_evidence_synthesizes(fx, tmp_path, monkeypatch):
    fake_synthesis((0,), monkeypatch)
    r = invoke("prune", fx.model, "--calib", fx.calib, "-o", tmp_path / "o.onnx", "--json", "-", "--limit", "64",
               "-q")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    # No evidence given: the verdict's families run; the patch search's trigger ranks the channels.
    ev = report["evidence"]
    assert (ev["kind"], ev["suspected"], ev["target"]) == ("verdict", [0], 0)
    assert ev["families"] == ["noise-blend", "grating", "patch-synthesis"]
    assert ev["trigger"].startswith("synthesized trigger for class 0")
    assert report["policy"]["score"] == "differential linf" and report["extra"]["synthesis"]["suspected"] == [0]


def test_prune_synthesize_is_the_patch_search_alone(fx, tmp_path, monkeypatch):
    fake_synthesis((0,), monkeypatch)
    r = invoke("prune", fx.model, "--calib", fx.calib, "-o", tmp_path / "o.onnx", "--json", "-", "--limit", "64",
               "-q", "--synthesize")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)["evidence"]
    assert ev["kind"] == "synthesized" and "families" not in ev
    r = invoke("prune", fx.model, "--calib", fx.calib, "-o", tmp_path / "p.onnx", "--synthesize", "--verdict")
    assert r.exit_code == ExitCode.INPUT_ERROR and "give one" in r.stderr and not (tmp_path / "p.onnx").exists()


def test_prune_by_the_probe_when_only_a_probe_family_suspects(fixtures_dir, tmp_path, monkeypatch):
    """A blended-noise backdoor the patch search misses (here: a search result that suspects nothing):
    the noise-blend family suspects class 0, and its probe (one noise image blended at its weight)
    ranks the channels. It is a faithful stand-in for the real trigger: it zeroes the channels the
    real trigger would (most of them; all of them on this fixture)."""
    fake_synthesis((), monkeypatch)
    model, calib = fixtures_dir / "digits_blended.onnx", fixtures_dir / "digits_calib"
    out = tmp_path / "o.onnx"
    r = invoke("prune", model, "--calib", calib, "-o", out, "--json", "-", "--limit", "128", "-q")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    ev = report["evidence"]
    assert ev["kind"] == "verdict" and ev["suspected"] == [0] and out.exists()
    assert ev["trigger"].startswith("noise-blend probe (alpha") and "to class 0" in ev["trigger"]
    by_probe = {(s["tap"], c) for s in report["extra"]["surgery"] for c in s["channels"]}
    real = prune(model, calib, PruneConfig(scan=ScanConfig(limit=128, layers="last")),
                 evidence=Evidence(trigger=fixtures_dir / "digits_blended_trigger.png",
                                   mask=fixtures_dir / "digits_blended_mask.png"))
    by_trigger = {(s["tap"], c) for s in real.report.extra["surgery"] for c in s["channels"]}
    assert len(by_probe) == len(by_trigger) > 0
    assert len(by_probe & by_trigger) >= 0.6 * len(by_trigger)


def test_prune_when_synthesis_finds_nothing(fx, tmp_path, monkeypatch):
    fake_synthesis((), monkeypatch)
    r = invoke("prune", fx.model, "--calib", fx.calib, "-o", tmp_path / "o.onnx", "--limit", "32")
    assert r.exit_code == ExitCode.INPUT_ERROR
    assert "the verdict suspects no target class" in r.stderr and "--trigger" in r.stderr
    assert "noise-blend max" in r.stderr  # why: every family's statistic against its threshold
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize(("suspected", "code", "verdict"), [((0,), ExitCode.SUSPECTED, "suspected"),
                                                            ((), ExitCode.OK, "clean")])
def test_scan_synthesize_fail_on_suspect_gate(fx, monkeypatch, suspected, code, verdict):
    fake_synthesis(suspected, monkeypatch)
    r = invoke("scan", fx.model, "--calib", fx.calib, "--synthesize", "--fail-on-suspect", "--json", "-",
               "--limit", "32", "--layers", "last")
    assert r.exit_code == code, r.stderr
    report = json.loads(r.stdout)
    assert report["verdict"] == verdict
    assert f"verdict {verdict}" in r.stderr


def test_fail_on_suspect_needs_synthesize(fx):
    r = invoke("scan", fx.model, "--calib", fx.calib, "--fail-on-suspect")
    assert r.exit_code == ExitCode.INPUT_ERROR and "--synthesize" in r.stderr


def test_prune_evidence_none_is_explicit_clean_ranking(fx, tmp_path):
    result = invoke("prune", fx.model, "--calib", fx.calib, "--evidence", "none", "-o", tmp_path / "o.onnx",
                    "--json", "-", "--limit", "50", "-q")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["policy"]["score"] == "clean linf"


def test_never_overwrites_input_even_with_force(fx, tmp_path):
    copy = tmp_path / "m.onnx"
    copy.write_bytes(fx.model.read_bytes())
    before = sha(copy)
    result = invoke("prune", copy, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", fx.mask, "-o", copy,
                    "--force")
    assert result.exit_code == ExitCode.INPUT_ERROR and "refusing to overwrite the input model" in result.stderr
    assert sha(copy) == before


def test_existing_output_needs_force(fx, tmp_path):
    out = tmp_path / "exists.onnx"
    out.write_text("keep me")
    result = invoke("prune", fx.model, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", fx.mask, "-o", out)
    assert result.exit_code == ExitCode.INPUT_ERROR and "--force" in result.stderr
    assert out.read_text() == "keep me"


def test_failed_verification_writes_nothing_and_exits_1(fx, tmp_path, monkeypatch):
    real = prune_command.zero_channels

    def wrong(model, taps, channels, **kw):
        # Zero one channel too many: the result no longer equals the masked reference.
        extra = {t: sorted(set(c) | {(max(c) + 1) % 32}) for t, c in channels.items()}
        return real(model, taps, extra, **kw)

    monkeypatch.setattr(prune_command, "zero_channels", wrong)
    out = tmp_path / "bad.onnx"
    result = invoke("prune", fx.model, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", fx.mask, "-o", out,
                    "--limit", "64")
    assert result.exit_code == ExitCode.SUSPECTED  # 1: verification failure
    assert "max |diff|" in result.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_from_report_round_trip(fx, tmp_path):
    report = tmp_path / "scan.json"
    r = invoke("scan", fx.model, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", fx.mask, "--layers", "last",
               "--ratio", "0.2", "--json", report, "--limit", "64", "-q")
    assert r.exit_code == 0, r.stderr
    flagged = json.loads(report.read_text())["taps"][0]["flagged"]
    r = invoke("prune", fx.model, "--calib", fx.calib, "--from-report", report, "-o", tmp_path / "p.onnx",
               "--json", "-", "--limit", "64", "-q")
    assert r.exit_code == 0, r.stderr
    surgery = json.loads(r.stdout)["extra"]["surgery"]
    assert sorted(c for s in surgery for c in s["channels"]) == sorted(flagged)


def test_from_report_of_another_model_is_rejected(fx, tmp_path, fixtures_dir):
    report = tmp_path / "scan.json"
    invoke("scan", fixtures_dir / "digits_clean.onnx", "--calib", fx.calib, "--json", report, "--limit", "32", "-q")
    r = invoke("prune", fx.model, "--calib", fx.calib, "--from-report", report, "-o", tmp_path / "p.onnx")
    assert r.exit_code == ExitCode.INPUT_ERROR and "made for another model" in r.stderr


@pytest.mark.parametrize("ratio", ["0", "1", "-0.2", "2"])
def test_ratio_outside_open_interval(fx, tmp_path, ratio):
    r = invoke("prune", fx.model, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", fx.mask,
               "-o", tmp_path / "o.onnx", "--ratio", ratio)
    assert r.exit_code == ExitCode.INPUT_ERROR and "--ratio must be in (0, 1)" in r.stderr


def test_trigger_and_mask_sizes_are_checked(fx, tmp_path):
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "small_mask.png")
    r = invoke("prune", fx.model, "--calib", fx.calib, "--trigger", tmp_path / "big.png", "--mask", fx.mask,
               "-o", tmp_path / "o.onnx")
    assert r.exit_code == ExitCode.INPUT_ERROR and "is 32x32 but the model input is 16x16" in r.stderr
    r = invoke("prune", fx.model, "--calib", fx.calib, "--trigger", fx.trigger, "--mask", tmp_path / "small_mask.png",
               "-o", tmp_path / "o.onnx")
    assert r.exit_code == ExitCode.INPUT_ERROR and "mask small_mask.png is 8x8 but the trigger is 16x16" in r.stderr


def test_evaluate_reports_acc_and_asr(fx):
    r = invoke("evaluate", fx.model, "--data", fx.test, "--trigger", fx.trigger, "--mask", fx.mask, "--target", "0",
               "--json", "-", "-q")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)["evaluation"]
    assert ev["images"] == 400 and ev["asr_images"] == int((np.load(fx.test)["y"] != 0).sum())
    assert ev["accuracy"] > 0.95 and ev["asr"] > 0.95


def test_evaluate_needs_labels(fx, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 16, 16, 1), np.uint8))
    r = invoke("evaluate", fx.model, "--data", tmp_path / "x.npy")
    assert r.exit_code == ExitCode.INPUT_ERROR and "has no labels" in r.stderr


def test_library_prune_with_trigger(fx):
    cfg = PruneConfig(scan=ScanConfig(layers="last", ratio=0.1, limit=32))
    result = prune(fx.model, fx.calib, cfg, evidence=Evidence(trigger=fx.trigger, mask=fx.mask))
    assert result.report.extra["verification"]["ok"]
    assert VerificationError.exit_code == 1


def test_sweep_table_json_and_plot(fx, tmp_path):
    plot = tmp_path / "sweep.png"
    r = invoke("sweep", fx.model, "--calib", fx.test, "--trigger", fx.trigger, "--mask", fx.mask,
               "--ratios", "0.1,0.4", "--max-acc-drop", "0.03", "--plot", plot, "--json", "-", "-q")
    assert r.exit_code == 0, r.stderr
    sweep = json.loads(r.stdout)["sweep"]
    assert [row["ratio"] for row in sweep["rows"]] == [0.1, 0.4]
    assert sweep["target"] == 0  # inferred from the stamped predictions
    assert sweep["chosen"]["ratio"] == 0.4 and sweep["chosen"]["asr"] < sweep["rows"][0]["asr"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_choose_ratio_respects_budget():
    from onnx_linf.commands.ratio import SweepRow, choose_ratio

    rows = [SweepRow(0.1, 2, 0.98, 0.9), SweepRow(0.2, 4, 0.97, 0.3), SweepRow(0.3, 6, 0.90, 0.0)]
    assert choose_ratio(rows, 0.99, 0.02).ratio == 0.2
    assert choose_ratio(rows, 0.99, 0.10).ratio == 0.3
    assert choose_ratio(rows, 0.99, 0.001) is None


def test_prune_acceptance_on_badnets_fixture(fx, tmp_path):
    """Differential ℓ∞ on the last map at r = 0.3: ASR from >= 95% to <= 10%, ACC down <= 3 points."""
    r = invoke("prune", fx.model, "--calib", fx.calib, "--ratio", "0.3", "--trigger", fx.trigger, "--mask", fx.mask,
               "-o", tmp_path / "p.onnx", "--eval-data", fx.test, "--target", "0", "--json", "-", "-q")
    assert r.exit_code == 0, r.stderr
    ev = json.loads(r.stdout)["extra"]["evaluation"]
    assert ev["before"]["asr"] >= 0.95 and ev["after"]["asr"] <= 0.10
    assert ev["after"]["accuracy"] >= ev["before"]["accuracy"] - 0.03


@pytest.mark.parametrize("budget, warned", [(0.001, True), (0.03, False)])
def test_prune_says_when_the_accuracy_budget_leaves_the_backdoor_in(fx, fixtures_dir, budget, warned):
    """The sweep's own numbers tell whether the chosen ratio removed the trigger; a note says so."""
    labels = fixtures_dir / "digits_calib_labelled.npz"
    cfg = PruneConfig(scan=ScanConfig(layers="last", provider="cpu"), max_acc_drop=budget, labels=labels,
                      target=0)
    result = prune(fx.model, fx.calib, cfg, evidence=Evidence(trigger=fx.trigger, mask=fx.mask))
    chosen = result.report.extra["sweep"]["chosen"]
    notes = result.report.extra["notes"]
    assert (chosen["asr"] > 0.10) == warned
    if warned:
        assert len(notes) == 1 and f"best ratio ({chosen['ratio']:g})" in notes[0]
        assert "pruning does not remove this backdoor" in notes[0] and "onnx-linf clamp" in notes[0]
    else:
        assert notes == []
