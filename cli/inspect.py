"""``onnx-linf inspect``: inputs, outputs, opset and the activation maps onnx-linf would measure."""

from __future__ import annotations

import json

import onnx
import typer
from rich.table import Table

from onnx_linf.model.load import load_model
from onnx_linf.model.taps import find_taps

from . import options as o
from .console import console, stdout, user_errors
from .exit_codes import ExitCode


def inspect_command(model: o.ModelArg, json_out: o.JsonOut = None) -> None:
    """Show the model's inputs, outputs, opset and activation maps (taps)."""
    with user_errors():
        m = load_model(model)
        taps = find_taps(m, "all+branches")  # branches shown with their kind; `--layers all` skips them
    if json_out == "-":
        data = {
            "path": str(m.path), "sha256": m.sha256, "opset": m.opset, "ir_version": m.proto.ir_version,
            "input": {"name": m.input.name, "shape": list(m.input.shape), "dtype": m.input.dtype_name},
            "outputs": [{"name": out.name, "shape": list(out.shape)} for out in m.outputs],
            "taps": [{"name": t.name, "kind": t.kind, "channels": t.channels, "spatial": list(t.spatial),
                      "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                      "is_last": t.is_last, "non_negative": t.non_negative, "chain": list(t.chain)} for t in taps],
        }
        stdout.out(json.dumps(data, indent=2))
        raise typer.Exit(ExitCode.OK)
    console.print(f"[bold]{m.path}[/]  IR {m.proto.ir_version}  opset {m.opset}  "
                  f"{len(m.proto.graph.node)} nodes  external data: {'yes' if m.has_external_data else 'no'}")
    console.print(f"input  {m.input.name} {list(m.input.shape)} {m.input.dtype_name}")
    for out in m.outputs:
        console.print(f"output {out.name} {list(out.shape)}")
    branches = sum(t.kind == "branch" for t in taps)
    title = f"activation maps ({len(taps)}" + (f"; --layers all skips the {branches} branch maps)" if branches else ")")
    table = Table(title=title, title_justify="left")
    table.add_column("tap", overflow="fold")
    for col in ("kind", "C", "HxW", "≥0"):
        table.add_column(col)
    table.add_column("chain", overflow="fold")
    for t in taps:
        hw = "x".join("?" if d is None else str(d) for d in t.spatial)
        table.add_row(t.name + (" (last)" if t.is_last else ""), t.kind, str(t.channels), hw,
                      "yes" if t.non_negative else "", " → ".join(t.chain))
    console.print(table)
    raise typer.Exit(ExitCode.OK)
