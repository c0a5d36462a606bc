"""Model files in a folder or a Triton model repository, and what a ``config.pbtxt`` says about the input.

A Triton repository is ``<repo>/<model>/config.pbtxt`` plus ``<repo>/<model>/<version>/model.onnx``.
Only the fields onnx-linf needs are read (``name``, ``platform``/``backend``, ``max_batch_size`` and
the ``input`` entries), by a small parser for protobuf text format: messages in braces, repeated
fields in brackets or repeated keys, scalars, quoted strings and ``#`` comments.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelLoadError

_TOKEN = re.compile(r'\s+|#[^\n]*|"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[{}\[\]:,;<>]|[^\s{}\[\]:,;<>"\'#]+')


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"unexpected character {text[pos]!r} at offset {pos}")
        tok = m.group(0)
        pos = m.end()
        if not tok.isspace() and not tok.startswith("#"):
            out.append(tok)
    return out


def _scalar(tok: str):
    if tok[0] in "\"'":
        return bytes(tok[1:-1], "utf-8").decode("unicode_escape")
    for kind in (int, float):
        try:
            return kind(tok)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(tok, tok)


def parse_pbtxt(text: str) -> dict:
    """Protobuf text format -> dict; every field maps to a list of values (repeated or not).

    Raises:
        ValueError: malformed text.
    """
    toks = _tokens(text)
    pos = 0

    def message(end: str | None) -> dict:
        nonlocal pos
        out: dict[str, list] = {}
        while pos < len(toks) and toks[pos] != end:
            key = toks[pos]
            pos += 1
            if pos < len(toks) and toks[pos] == ":":
                pos += 1
            out.setdefault(key, []).extend(value())
            if pos < len(toks) and toks[pos] in ",;":
                pos += 1
        if end is not None:
            if pos >= len(toks):
                raise ValueError(f"missing {end!r}")
            pos += 1
        return out

    def value() -> list:
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("value expected at end of text")
        tok = toks[pos]
        if tok in "{<":
            pos += 1
            return [message("}" if tok == "{" else ">")]
        if tok == "[":
            pos += 1
            items = []
            while pos < len(toks) and toks[pos] != "]":
                items.extend(value())
                if pos < len(toks) and toks[pos] == ",":
                    pos += 1
            if pos >= len(toks):
                raise ValueError("missing ']'")
            pos += 1
            return items
        pos += 1
        return [_scalar(tok)]

    return message(None)


@dataclass(frozen=True)
class TritonModel:
    """What a Triton ``config.pbtxt`` says about one model version."""

    name: str
    """Model name (the config's ``name``, else the folder name)."""
    version: str
    """Version folder."""
    config: str
    """Path of the ``config.pbtxt``."""
    inputs: list[dict]
    """Per input: name, data_type, dims (without the batch dimension when max_batch_size > 0), format."""
    max_batch_size: int
    """0 = the dims include the batch dimension."""

    def size(self) -> tuple[int, int] | None:
        """(H, W) of a single image input whose dims are fixed, else None."""
        if len(self.inputs) != 1:
            return None
        dims = [int(d) for d in self.inputs[0]["dims"]]
        if self.max_batch_size == 0 and len(dims) == 4:
            dims = dims[1:]
        if len(dims) != 3:
            return None
        fmt = self.inputs[0].get("format", "")
        hw = dims[1:] if fmt == "FORMAT_NCHW" or (fmt != "FORMAT_NHWC" and dims[0] in (1, 3)) else dims[:2]
        return (hw[0], hw[1]) if all(d > 0 for d in hw) else None

    def to_dict(self) -> dict:
        """Report form."""
        return {"name": self.name, "version": self.version, "config": self.config, "inputs": self.inputs,
                "max_batch_size": self.max_batch_size, "size": None if self.size() is None else list(self.size())}


def read_triton(model_path: str | os.PathLike) -> TritonModel | None:
    """The Triton view of ``<model>/<version>/<file>.onnx``, or None when it is not in that layout.

    Raises:
        ModelLoadError: the ``config.pbtxt`` exists but cannot be read or parsed.
    """
    path = Path(model_path)
    version, folder = path.parent, path.parent.parent
    config = folder / "config.pbtxt"
    if not version.name.isdigit() or not config.is_file():
        return None
    try:
        data = parse_pbtxt(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read Triton config {config}: {exc}") from None
    inputs = [{"name": str(i.get("name", [""])[0]), "data_type": str(i.get("data_type", [""])[0]),
               "dims": [int(d) for d in i.get("dims", [])], "format": str(i.get("format", [""])[0])}
              for i in data.get("input", []) if isinstance(i, dict)]
    return TritonModel(name=str(data.get("name", [folder.name])[0]), version=version.name, config=str(config),
                       inputs=inputs, max_batch_size=int(data.get("max_batch_size", [0])[0]))


def find_models(root: str | os.PathLike) -> tuple[str, list[Path]]:
    """Every ``*.onnx`` file under `root` (recursive, sorted), and ``triton`` or ``folder`` for the layout.

    Raises:
        ModelLoadError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelLoadError(f"not a folder: {root}")
    files = sorted(p for p in root.rglob("*.onnx") if p.is_file() or p.is_symlink())
    triton = any((p.parent.parent / "config.pbtxt").is_file() and p.parent.name.isdigit() for p in files)
    return ("triton" if triton else "folder"), files
