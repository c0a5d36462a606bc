"""``onnx-linf sweep``: clean accuracy and attack success over pruning ratios (table, JSON, plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnx_linf.commands.evidence import Evidence
from onnx_linf.commands.options import ScanConfig
from onnx_linf.commands.ratio import RATIO_GRID, SweepResult
from onnx_linf.commands.sweep import sweep_model
from onnx_linf.errors import UsageError
from onnx_linf.model.files import atomic_write

from . import options as o
from .console import BarProgress, console, user_errors, write_json
from .exit_codes import ExitCode
from .render import sweep_table

Labels = Annotated[Optional[Path], typer.Option("--labels", help="Labelled data for ACC/ASR: .npz with x and y, or "
                                                "a folder with one subfolder per class (default: the "
                                                "calibration data, if it has labels).")]
Ratios = Annotated[Optional[str], typer.Option("--ratios", help="Comma-separated ratios to try (default "
                                               + ",".join(f"{r:g}" for r in RATIO_GRID) + ").")]


def write_plot(result: SweepResult, path: Path) -> None:
    """Both curves over the ratio, as a PNG (matplotlib, optional dependency)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'onnx-linf[report]'") from None
    ratios = [0.0] + [r.ratio for r in result.rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ratios, [100 * result.base_accuracy] + [100 * r.accuracy for r in result.rows], "o-", label="clean ACC")
    ax.plot(ratios, [100 * result.base_asr] + [100 * r.asr for r in result.rows], "s-", label="ASR")
    if result.chosen is not None:
        ax.axvline(result.chosen.ratio, color="grey", linestyle="--", label=f"chosen r={result.chosen.ratio:g}")
    ax.set_xlabel("pruning ratio per map")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(f"pruning sweep ({result.score})")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def parse_ratios(value: str | None) -> tuple[float, ...]:
    """'0.1,0.2' -> (0.1, 0.2), each in (0, 1)."""
    if value is None:
        return RATIO_GRID
    try:
        ratios = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--ratios takes comma-separated numbers, got {value!r}") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise UsageError("--ratios must be numbers in (0, 1)")
    return ratios


def sweep_command(
    model: o.ModelArg,
    calib: o.CalibOpt,
    trigger: o.Trigger = None,
    mask: o.Mask = None,
    synthesize: o.SynthFlag = False,
    classes: o.SynthClasses = None,
    seed: o.SynthSeed = 0,
    max_queries: o.MaxQueries = None,
    time_limit: o.TimeLimit = None,
    labels: Labels = None,
    target: Annotated[Optional[int], typer.Option(help="Attack target (default: inferred from the stamped "
                                                  "predictions).")] = None,
    ratios: Ratios = None,
    max_acc_drop: Annotated[Optional[float], typer.Option("--max-acc-drop", help="Also pick the lowest-ASR ratio "
                                                          "whose accuracy drop stays within this fraction.")]
    = None,
    layers: o.Layers = "last",
    score: Annotated[str, typer.Option(help="Norm to rank by: linf, l1 or l2.")] = "linf",
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of both curves.")] = None,
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
    """Prune at each ratio (channels ranked by differential score) and show clean ACC and the trigger's ASR."""
    with user_errors():
        if (trigger is None) == (not synthesize):
            raise UsageError("sweep needs one trigger: --trigger T.png --mask M.png, or --synthesize")
        evidence = (Evidence(synthesize=o.synth_config(classes, seed, max_queries, time_limit)) if synthesize
                    else Evidence(trigger=trigger, mask=mask))
        config = ScanConfig(layers=o.parse_layers(layers), score=score, stats=(score,), batch_size=batch_size,
                            provider=provider, limit=limit, engine=o.engine_options(ray, ray_workers, ray_gpus),
                            preprocess=o.preprocess_options(size, layout, channels, scale, mean, std))
        result = sweep_model(model, calib, config, evidence=evidence, labels=labels,
                             target=target, ratios=parse_ratios(ratios), max_acc_drop=max_acc_drop,
                             progress=BarProgress(quiet))
        if plot is not None:
            write_plot(result, plot)
        write_json(json_out, json.dumps({"schema_version": 1, "tool": "onnx-linf", "command": "sweep",
                                         "sweep": result.to_dict()}, indent=2))
    if not quiet:
        console.print(sweep_table(result))
        if max_acc_drop is not None and result.chosen is None:
            console.print(f"[yellow]no ratio keeps the accuracy drop within {max_acc_drop:g}[/]")
        if plot is not None:
            console.print(f"plot written to [bold]{plot}[/]")
    raise typer.Exit(ExitCode.OK)
