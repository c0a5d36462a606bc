"""Whole activation maps of a few chosen channels on a few images, gathered in-graph (heatmaps).

The HTML report overlays them on the images they came from: where in the image a flagged channel
fires, clean against trigger-stamped (the paper's Grad-CAM lens, without gradients). Only the chosen
channels leave ONNX Runtime: one Gather per map selects them in the graph, so a few images of a wide
map cost ``images * channels * H * W`` floats, not the map.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..model.load import Model
from ..model.taps import Tap
from .calibrate import run_batches
from .instrument import PREFIX, Instrumented, TapOutput
from .preprocess import Preprocess, Trigger
from .session import Session, create_session
from .sources import Batch, DataSource

#: Statistic name of a gathered channel map in `Instrumented.outputs`.
CHANNEL_MAP = "channel_map"


@dataclass(frozen=True)
class SampleMaps:
    """The chosen channels' maps on the first images of a source."""

    pixels: np.ndarray | None = field(repr=False)
    """uint8 ``[n, H, W, C]`` as the model saw them (stamped when a trigger was given); None for
    already-preprocessed sources."""
    maps: dict[str, np.ndarray] = field(repr=False)
    """Tap name -> float32 ``[n, k, h, w]``, the tap's chosen channels in the order asked."""


def instrument_channels(model: Model, channels: Mapping[Tap, Sequence[int]]) -> Instrumented:
    """Add, per tap, the map of the given channels as an extra output ``[N, k, H, W]`` (float32).

    A float16 (or other float) map is cast to float32 after the Gather, so only the chosen
    channels are converted.
    """
    delta = onnx.ModelProto()
    added: dict[str, TapOutput] = {}
    for index, (tap, chans) in enumerate(channels.items()):
        base = f"{PREFIX}/channel_map/{index}"
        delta.graph.initializer.append(numpy_helper.from_array(np.asarray(list(chans), np.int64), f"{base}/indices"))
        out = f"{base}/out"
        gathered = out if tap.elem_type == TensorProto.FLOAT else f"{base}/gathered"
        delta.graph.node.append(helper.make_node("Gather", [tap.name, f"{base}/indices"], [gathered], axis=1,
                                                 name=f"{base}/Gather"))
        if gathered != out:
            delta.graph.node.append(helper.make_node("Cast", [gathered], [out], to=TensorProto.FLOAT,
                                                     name=f"{base}/Cast"))
        delta.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        added[out] = TapOutput(tap.name, CHANNEL_MAP)
    return Instrumented(outputs=added, original_outputs=tuple(o.name for o in model.proto.graph.output),
                        base=model.proto, added=delta)


def sample_maps(model: Model, channels: Mapping[Tap, Sequence[int]],
                runs: Sequence[tuple[DataSource, Trigger | None]], preprocess: Preprocess, images: int,
                provider: str = "auto") -> list[SampleMaps]:
    """The chosen channels' maps on the first `images` images of each (source, trigger) run.

    One session serves every run. Each run stops once `images` images are in (one batch unless the
    model fixes a smaller batch size), so the cost does not grow with the source.
    """
    inst = instrument_channels(model, channels)
    session = create_session(model, inst, provider)
    names = inst.output_names()
    return [_first_images(session, names, inst, source, trigger, preprocess, images) for source, trigger in runs]


def _first_images(session: Session, names: list[str], inst: Instrumented, source: DataSource, trigger: Trigger | None,
                  preprocess: Preprocess, images: int) -> SampleMaps:
    got: dict[str, list[np.ndarray]] = {n: [] for n in names}
    pixels: list[np.ndarray] = []

    def keep(batch: Batch) -> None:
        if batch.pixels is not None:
            pixels.append(trigger.stamp(batch.pixels) if trigger is not None else batch.pixels)

    count = 0
    for values in run_batches(session, source, preprocess, names, images, trigger, on_batch=keep):
        for n in names:
            got[n].append(values[n])
        count += len(values[names[0]])
        if count >= images:
            break
    maps = {inst.outputs[n].tap: np.concatenate(got[n])[:images].astype(np.float32, copy=False) for n in names}
    return SampleMaps(pixels=np.concatenate(pixels)[:images] if pixels else None, maps=maps)
