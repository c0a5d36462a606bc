"""The onnx-linf command line: typer + rich over the `onnx_linf` library (installed as `onnx_linf.cli`)."""
