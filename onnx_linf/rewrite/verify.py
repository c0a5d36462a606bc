"""Stage 7: prove a rewritten model before it is written.

A candidate passes when the ONNX checker accepts it (full check), ONNX Runtime loads it, it keeps
the original model's inputs, outputs, opset imports and IR version, and on every input batch its
outputs match a *reference* model (for channel zeroing: `rewrite.mask_reference`, built
independently of the surgery) within tolerance, or bit for bit when asked.
"""

from __future__ import annotations

import logging
import math
import tempfile
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import EncodeError
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from ..errors import LinfError, VerificationError
from ..measure.session import Session, create_session
from ..model.load import Model, real_inputs

log = logging.getLogger(__name__)


#: protobuf cannot serialise a message of 2 GiB or more: such a model is checked from a file.
_PROTOBUF_LIMIT = 2**31 - 1

_OK = "ok"

#: Prefixes of a check value that make the verification fail.
_FAILED = ("failed", "skipped")


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of `verify_model`."""

    ok: bool
    """True when every check passed."""
    checks: dict[str, str]
    """Check name -> ``"ok"``, a passing summary, or ``"failed: ..."`` / ``"skipped: ..."``. Keys:
    ``checker``, ``ort_load``, ``io_preserved``, ``numeric``."""
    max_abs_diff: float
    """Largest ``|candidate - reference|`` over all outputs and inputs (``inf`` if not computed)."""
    tolerance: float
    """The bound that largest difference was held to at that element: ``atol + rtol * |reference|``
    plus `SCALE_ULPS` float32 ulps of the sample's largest ``|reference|`` (0 for an exact comparison)."""
    samples: int
    """Number of input rows compared (sum of the batch sizes)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _external_locations(proto: onnx.ModelProto) -> set[str]:
    return {ExternalDataInfo(t).location for t in onnx.external_data_helper._get_all_tensors(proto)
            if uses_external_data(t)}


def _check(candidate: onnx.ModelProto) -> str:
    """Run the full ONNX checker on the candidate; return ``ok`` or the failure."""
    try:
        locations = _external_locations(candidate)
        if not locations and candidate.ByteSize() <= _PROTOBUF_LIMIT:
            onnx.checker.check_model(candidate, full_check=True)
            return _OK
        # The in-memory checker resolves external data against the *current directory*, and cannot
        # take a >2 GB message at all, so check a file in a scratch folder instead. The original
        # model's external data files are represented there by empty placeholders: the checker
        # only requires each location to be a regular file inside the model's folder (it rejects
        # symlinks and does not read the bytes), the real files were validated by `load_model`,
        # and ONNX Runtime reads the real weights in the load and numeric checks.
        with tempfile.TemporaryDirectory(prefix="onnx_linf_check_") as tmp:
            folder = Path(tmp).resolve()
            for loc in locations:
                target = (folder / loc).resolve()
                if folder not in target.parents:  # never create files outside the scratch folder
                    return f"failed: external data location '{loc}' is outside the model's folder"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            copy = onnx.ModelProto()
            copy.CopyFrom(candidate)  # saving as external data rewrites the proto it is given
            big = copy.ByteSize() > _PROTOBUF_LIMIT
            # A unique name: onnx refuses a location that exists (relative to the current directory).
            onnx.save_model(copy, str(folder / "candidate.onnx"), save_as_external_data=big,
                            all_tensors_to_one_file=True, location=f"candidate-{uuid.uuid4().hex}.data")
            onnx.checker.check_model(str(folder / "candidate.onnx"), full_check=True)
        return _OK
    except onnx.checker.ValidationError as exc:
        return f"failed: {_first_line(exc)}"
    except (OSError, ValueError) as exc:  # unwritable scratch folder, unserialisable proto...
        return f"failed: could not run the checker: {_first_line(exc)}"


def _signature(vi: onnx.ValueInfoProto) -> str:
    tt = vi.type.tensor_type
    dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return f"{vi.name}:{onnx.TensorProto.DataType.Name(tt.elem_type)}[{','.join(dims)}]"


def _io_check(original: onnx.ModelProto, candidate: onnx.ModelProto, extra_outputs: Sequence[str] = ()) -> str:
    problems: list[str] = []
    # Outputs a rewrite adds on purpose (the clamp's score) come after the original ones.
    outputs = list(candidate.graph.output)
    added = [o.name for o in outputs[len(original.graph.output):]]
    if added == list(extra_outputs):
        outputs = outputs[:len(original.graph.output)]
    for what, want, got in (("inputs", real_inputs(original.graph), real_inputs(candidate.graph)),
                            ("outputs", list(original.graph.output), outputs)):
        # Type protos compare exactly: element type, every dim value / dim name, denotations.
        if [(v.name, v.type) for v in want] != [(v.name, v.type) for v in got]:
            problems.append(f"{what} changed from {[_signature(v) for v in want]} "
                            f"to {[_signature(v) for v in got]}")
    want_ops = sorted((o.domain or "ai.onnx", o.version) for o in original.opset_import)
    got_ops = sorted((o.domain or "ai.onnx", o.version) for o in candidate.opset_import)
    if want_ops != got_ops:
        problems.append(f"opset imports changed from {want_ops} to {got_ops}")
    if original.ir_version != candidate.ir_version:
        problems.append(f"IR version changed from {original.ir_version} to {candidate.ir_version}")
    return "failed: " + "; ".join(problems) if problems else _OK

#: Smallest atol and rtol float16 outputs are held to: about ten float16 ulps. Where ORT has no
#: float16 kernel (most CPU ops) it inserts Casts and computes in float32, so an inserted node (a
#: Min, a Mul) moves where values get rounded to float16 and changes outputs by an ulp or two
#: with no error in the surgery; a surgery error changes them by far more.
FLOAT16_TOLERANCE = 1e-2

#: Rounding allowance, in float32 epsilons (float64 ones for float64 outputs) times the largest
#: |reference| value of the same sample. ORT fuses Conv+BN+Add+Relu differently once a Min or a Mul
#: follows, which moves every output by a few ulps of the *largest* activations, not of each
#: element: a logit near 0 next to logits of +-200 carries the rounding of the 200s (a random-weight
#: ResNet-50: 7e-5 at logits ~190, about 3 ulps of 190). 64 ulps is 1.5e-3 there, while a zeroed
#: channel or a wrong bound moves logits by orders of magnitude more (tests check both sides).
SCALE_ULPS = 64


def _scale_term(ref: np.ndarray) -> np.ndarray | float:
    """``SCALE_ULPS * eps * max |ref|`` per sample (first axis), broadcastable against `ref`."""
    if ref.dtype.kind != "f" or ref.size == 0:
        return 0.0
    eps = float(np.finfo(np.float64 if ref.dtype == np.float64 else np.float32).eps)
    mag = np.abs(np.where(np.isfinite(ref), ref, 0.0)).astype(np.float64)
    if ref.ndim < 2:
        return SCALE_ULPS * eps * float(mag.max())
    per_sample = mag.reshape(ref.shape[0], -1).max(axis=1)
    return SCALE_ULPS * eps * per_sample.reshape((-1,) + (1,) * (ref.ndim - 1))


def _compare(cand: np.ndarray, ref: np.ndarray, atol: float, rtol: float,
             exact: bool) -> tuple[int, float, float, int]:
    """(violations, max |diff|, bound at that element, elements) for one output pair."""
    if cand.shape != ref.shape or cand.dtype != ref.dtype:
        return max(ref.size, 1), math.inf, 0.0, max(ref.size, 1)
    if ref.dtype == np.float16:
        atol, rtol = max(atol, FLOAT16_TOLERANCE), max(rtol, FLOAT16_TOLERANCE)
    if exact:
        # Bitwise: also tells -0.0 from 0.0 and requires NaNs to carry the same payload.
        view = np.dtype(f"u{cand.dtype.itemsize}") if cand.dtype.kind == "f" else cand.dtype
        bad = cand.view(view) != ref.view(view)
    if cand.size == 0:
        return 0, 0.0, 0.0, 0
    c64, r64 = cand.astype(np.float64), ref.astype(np.float64)
    both_nan = np.isnan(c64) & np.isnan(r64)
    with np.errstate(invalid="ignore"):
        diff = np.where(both_nan, 0.0, np.abs(c64 - r64))
    diff = np.where(np.isnan(diff), math.inf, diff)  # NaN on one side only
    bound = atol + rtol * np.abs(np.where(np.isnan(r64), 0.0, r64)) + _scale_term(ref)
    if not exact:
        bad = diff > bound
    worst = int(np.argmax(diff))
    return int(np.count_nonzero(bad)), float(diff.flat[worst]), \
        0.0 if exact else float(bound.flat[worst]), int(cand.size)


def _numeric(candidate: Session, reference: Session, inputs: Iterable[np.ndarray], atol: float, names: list[str],
             rtol: float, exact: bool) -> tuple[str, float, float, int]:
    """Run both models on every batch; return (check text, max |diff|, its bound, samples)."""
    max_diff, tol_at_max, samples, violations, elements = 0.0, 0.0, 0, 0, 0
    try:
        for batch in inputs:
            want = reference.run(None, batch)
            got = candidate.run(names or None, batch)
            samples += int(batch.shape[0])
            if len(got) != len(want):
                return (f"failed: the candidate has {len(got)} outputs, the reference {len(want)}",
                        math.inf, 0.0, samples)
            for c, r in zip(got, want, strict=True):
                bad, diff, bound, size = _compare(np.asarray(c), np.asarray(r), atol, rtol, exact)
                if elements == 0 or diff > max_diff:
                    max_diff, tol_at_max = diff, bound
                violations += bad
                elements += size
    except LinfError as exc:
        return f"failed: {exc}", math.inf, 0.0, samples
    if samples == 0:
        return "failed: no input batches to compare on", math.inf, 0.0, 0
    if exact:
        summary = f"max |diff| {max_diff:.3g}, bitwise comparison on {samples} inputs"
    else:
        summary = f"max |diff| {max_diff:.3g} <= tol {tol_at_max:.3g} on {samples} inputs"
    if violations:
        rule = "bitwise" if exact else f"atol {atol:g} + rtol {rtol:g} * |reference| + {SCALE_ULPS} float32 " \
            f"ulps of the sample's largest |reference|, atol and rtol at least {FLOAT16_TOLERANCE:g} for float16"
        summary = (f"failed: {violations} of {elements} output values differ ({rule}); "
                   f"max |diff| {max_diff:.3g} (tol {tol_at_max:.3g}) on {samples} inputs")
    return summary, max_diff, tol_at_max, samples


def verify_model(model: Model, candidate: onnx.ModelProto, reference: onnx.ModelProto,
                 inputs: Iterable[np.ndarray], *, atol: float = 1e-4, rtol: float = 1e-4,
                 provider: str = "cpu", exact: bool = False, extra_outputs: Sequence[str] = ()) -> VerifyResult:
    """Check a rewritten model against the original and a reference model.

    Args:
        model: the original loaded model (its I/O, opsets and IR version are the contract).
        candidate: the rewritten model to verify.
        reference: a model computing what the candidate should compute (e.g. `mask_reference`).
        inputs: input batches (model-ready tensors, ``[N, ...]``); one pass over them.
        atol: absolute tolerance of the element-wise comparison.
        rtol: relative tolerance (times ``|reference|``).
        provider: ONNX Runtime provider for both models (``cpu``, ``cuda``, ``auto``...).
        exact: require bit-for-bit equal outputs instead of the tolerance test.
        extra_outputs: outputs the candidate adds after the original ones on purpose (the clamp's
            score): not part of the I/O contract, and not compared.

    Returns:
        The result; `ok` is False when any check failed (no exception: see `require_ok`).

    Raises:
        UsageError: unknown provider name.
    """
    checks: dict[str, str] = {"checker": _check(candidate)}
    sessions = []
    for name, proto in (("candidate", candidate), ("reference", reference)):
        try:
            sessions.append(create_session(model, proto, provider))
        except LinfError as exc:
            if name == "candidate":
                checks["ort_load"] = f"failed: {exc}"
            else:
                checks["numeric"] = f"skipped: the reference model could not be loaded: {exc}"
        except (ValueError, EncodeError) as exc:  # protobuf cannot serialise a >2 GB proto for ORT
            checks.setdefault("ort_load" if name == "candidate" else "numeric", f"failed: {_first_line(exc)}")
    checks.setdefault("ort_load", _OK)
    checks["io_preserved"] = _io_check(model.proto, candidate, extra_outputs)
    if model.lifted_from is not None and checks["io_preserved"] == _OK:
        checks["io_preserved"] = (f"ok (opset {model.lifted_from} lifted to {model.opset} by onnx.version_converter "
                                  f"before the rewrite: the output imports opset {model.opset})")

    max_diff, tol_at_max, samples = math.inf, 0.0, 0
    if "numeric" not in checks and len(sessions) < 2:
        checks["numeric"] = "skipped: the candidate could not be loaded"
    if "numeric" not in checks:
        names = [o.name for o in reference.graph.output] if extra_outputs else []
        numeric = _numeric(*sessions, inputs, atol, names, rtol, exact)
        checks["numeric"], max_diff, tol_at_max, samples = numeric

    order = ("checker", "ort_load", "io_preserved", "numeric")
    checks = {k: checks[k] for k in order}
    ok = not any(v.startswith(_FAILED) for v in checks.values())
    result = VerifyResult(ok=ok, checks=checks, max_abs_diff=max_diff,
                          tolerance=0.0 if exact else tol_at_max, samples=samples)
    log.info("verification %s: %s", "passed" if ok else "FAILED", checks)
    return result


def require_ok(result: VerifyResult) -> None:
    """Raise unless `result` passed.

    Raises:
        VerificationError: one line naming the failed checks and the numbers, with
            ``details=asdict(result)``.
    """
    if result.ok:
        return
    failed = "; ".join(f"{k}: {v}" for k, v in result.checks.items() if v.startswith(_FAILED))
    raise VerificationError(
        f"rewritten model failed verification (max |diff| {result.max_abs_diff:.3g}, "
        f"tol {result.tolerance:.3g}, {result.samples} inputs): {failed}",
        details=asdict(result),
        hint="nothing was written",
    )
