"""``onnx-linf evaluate``: clean accuracy and attack success rate on labelled data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from onnx_linf.commands.evaluate import evaluate_model
from onnx_linf.measure.accuracy import Evaluation

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .exit_codes import ExitCode

DataOpt = Annotated[Path, typer.Option("--data", "-d", help="Labelled data: .npz with x (uint8 NHWC pixels, or "
                                       "float NCHW already preprocessed) and y, or a folder with one subfolder "
                                       "per class (sorted names = class indices).")]
Target = Annotated[Optional[int], typer.Option("--target", help="Attack target class (with --trigger).")]


def evaluation_table(rows: list[tuple[str, Evaluation]]) -> Table:
    """ACC / ASR side by side for one or more models."""
    table = Table(title="evaluation", title_justify="left")
    table.add_column("model")
    table.add_column("images", justify="right")
    table.add_column("clean ACC", justify="right")
    table.add_column("ASR", justify="right")
    triggered = any(ev.triggered_accuracy is not None for _, ev in rows)
    if triggered:
        table.add_column("triggered, true class", justify="right")
    refusing = any(ev.refused is not None for _, ev in rows)
    if refusing:
        for col in ("refused: clean / triggered", "refusing them: accepted and correct / ASR"):
            table.add_column(col, justify="right")
    pct = lambda v, f=".1f": "—" if v is None else f"{100 * v:{f}}%"  # noqa: E731
    for name, ev in rows:
        asr = "—" if ev.asr is None else f"{100 * ev.asr:.1f}% (of {ev.asr_images})"
        extra = ([f"{pct(ev.refused)} / {pct(ev.refused_triggered)}",
                  f"{pct(ev.accepted_correct, '.2f')} / {pct(ev.asr_accepted)}"]
                 if ev.refused is not None else ["", ""]) if refusing else []
        recovered = [pct(ev.triggered_accuracy)] if triggered else []
        table.add_row(name, str(ev.images), f"{100 * ev.accuracy:.2f}%", asr, *recovered, *extra)
    return table


def evaluate_command(
    model: o.ModelArg,
    data: DataOpt,
    trigger: o.Trigger = None,
    mask: o.Mask = None,
    target: Target = None,
    batch_size: o.BatchSize = 64,
    provider: o.Provider = "auto",
    ray: o.RayFlag = False,
    ray_workers: o.RayWorkers = None,
    ray_gpus: o.RayGpus = 0.0,
    limit: o.Limit = None,
    size: o.Size = None,
    layout: o.Layout = None,
    channels: o.Channels = None,
    scale: o.Scale = None,
    mean: o.Mean = None,
    std: o.Std = None,
    json_out: o.JsonOut = None,
    quiet: o.Quiet = False,
) -> None:
    """Measure clean accuracy and, with --trigger/--mask/--target, the attack success rate (ASR).

    ASR = fraction of images whose true label is not the target that are classified as the target
    after the trigger is stamped.
    """
    with user_errors():
        done = evaluate_model(model, data, trigger=trigger, mask=mask, target=target, batch_size=batch_size,
                              provider=provider, limit=limit,
                              preprocess=o.preprocess_options(size, layout, channels, scale, mean, std),
                              progress=BarProgress(quiet), engine=o.engine_options(ray, ray_workers, ray_gpus))
        result = done.evaluation
        write_json(json_out, done.report.to_json())
    if not quiet:
        console.print(evaluation_table([(str(model), result)]))
    raise typer.Exit(ExitCode.OK)
