"""Export a trained torch classifier to ONNX and prove the export is faithful.

Used by the benchmark model builders. The legacy TorchScript exporter (``dynamo=False``) is
used on purpose: in eval mode it folds every BatchNormalization into the preceding Conv and
names nodes after the torch modules, which is what most ONNX classifiers found in the wild
look like.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Model metadata key the onnx-linf loader reads preprocessing defaults from.
PREPROCESS_METADATA_KEY = "onnx_linf.preprocess"
#: Largest accepted |torch - onnxruntime| logit difference.
PARITY_ATOL = 1e-3


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the torch model."""


def export_classifier(model: torch.nn.Module, path: Path, sample: torch.Tensor, *, preprocess: dict,
                      doc: str) -> dict:
    """Export ``model`` (eval mode) to ``path`` with a dynamic batch dimension.

    The graph gets input ``input`` [N, C, H, W], output ``logits`` [N, classes], the
    ``onnx_linf.preprocess`` metadata property (so the scanner picks up the normalisation without
    options), inferred intermediate shapes, and passes ``onnx.checker`` (full check).

    Returns a JSON-ready description of the export: exporter, opset, op counts and whether
    BatchNormalization survived as separate nodes.
    """
    model = model.eval().to(memory_format=torch.contiguous_format)
    sample = sample[:1].contiguous()
    with warnings.catch_warnings():
        # The legacy exporter warns that it is deprecated on every call; it is chosen deliberately.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (sample,), str(path), dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
        )
    proto = onnx.load(str(path))
    proto.doc_string = doc
    onnx.helper.set_model_props(proto, {PREPROCESS_METADATA_KEY: json.dumps(preprocess)})
    # Recorded shapes let tools size their taps without running inference themselves.
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))

    ops = Counter(node.op_type for node in proto.graph.node)
    return {
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "opset": OPSET,
        "ir_version": int(proto.ir_version),
        "batchnorm": "separate nodes" if ops.get("BatchNormalization") else "folded into Conv by the exporter",
        "ops": dict(sorted(ops.items())),
    }


def open_session(path: Path, threads: int = 2) -> ort.InferenceSession:
    """An onnxruntime CPU session limited to ``threads`` threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Logits of the ONNX model for preprocessed float32 NCHW input, in batches."""
    parts = [session.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts)


def check_parity(model: torch.nn.Module, session: ort.InferenceSession, x: np.ndarray) -> float:
    """Compare torch and onnxruntime logits on ``x``; return the max abs difference.

    Raises:
        ExportError: the difference exceeds ``PARITY_ATOL``.
    """
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    actual = run_logits(session, x)
    max_diff = float(np.abs(expected - actual).max())
    if max_diff > PARITY_ATOL:
        raise ExportError(f"onnxruntime logits differ from torch by {max_diff:.3g} (> {PARITY_ATOL})")
    return max_diff
