"""Reading PyTorch files without running their code: weights, TorchScript, ``torch.export`` archives.

- ``torch.load`` always runs with ``weights_only=True`` first; a file that holds more than tensors and
  plain containers (a pickled ``nn.Module``, or anything with a ``__reduce__``) is refused with an
  :class:`UntrustedSourceError` unless the caller passes ``trusted=True``.
- ``torch.export.load`` unpickles some records of a ``.pt2`` archive with ``weights_only=False``, so
  every record is checked first: JSON, short text, raw tensor bytes, or a ``torch.save`` payload that
  loads with ``weights_only=True``. The archive is read once into memory and loaded from there, so
  what was checked is what is loaded.
- TorchScript archives hold TorchScript code (no Python) and load with ``torch.jit.load``.
"""

from __future__ import annotations

import io
import json
import logging
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from leapcore.errors import ModelSourceError, UntrustedSourceError

log = logging.getLogger(__name__)

TRUST_HINT = (
    "Load it only if you trust where it came from, with load_model(..., trusted=True) "
    "(CLI: --trusted); or save plain weights instead (a state_dict, safetensors or a torch.export "
    ".pt2)."
)


# ---------------------------------------------------------------------------------------------- #
# What a file is
# ---------------------------------------------------------------------------------------------- #
def zip_names(data: bytes) -> list[str] | None:
    """The member names of a zip archive, or None when ``data`` is not one."""
    if not data.startswith(b"PK"):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return None


def is_torchscript(names: list[str]) -> bool:
    return any("/code/__torch__/" in n for n in names) and any(
        n.endswith("constants.pkl") for n in names
    )


def is_pt2(names: list[str]) -> bool:
    return any(n.endswith("models/model.json") or "/models/" in n for n in names) and any(
        n.endswith("archive_format") for n in names
    )


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` globals that pickle streams reference, read without unpickling them.

    ``data`` may hold several pickles back to back (torch's legacy format does).
    """
    names: list[str] = []
    stream = io.BytesIO(data)
    for _ in range(16):
        strings: list[str] = []
        try:
            for opcode, arg, _pos in pickletools.genops(stream):
                if opcode.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                if isinstance(arg, str) and "UNICODE" in opcode.name:
                    strings.append(arg)
        except Exception:
            break
        if stream.tell() >= len(data):
            break
    return sorted(set(names))


def _file_globals(data: bytes) -> list[str]:
    names = zip_names(data)
    if names is None:
        return pickle_globals(data)
    found: list[str] = []
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for name in names:
            if name.endswith(".pkl"):
                found += pickle_globals(archive.read(name))
    return sorted(set(found))


def _is_unsafe_pickle_error(err: Exception) -> bool:
    text = str(err)
    return "Weights only load failed" in text or "WeightsUnpickler" in text


# ---------------------------------------------------------------------------------------------- #
# torch.load: weights, checkpoints, and (trusted only) whole pickled modules
# ---------------------------------------------------------------------------------------------- #
def load_torch_file(path: Path, trusted: bool = False) -> Any:
    """Read a ``torch.save`` / TorchScript file: a state dict, a checkpoint dict, or a module.

    Raises:
        UntrustedSourceError: the file is a pickle of Python objects and ``trusted`` is False.
        ModelSourceError: the file is not something ``torch`` wrote.
    """
    data = Path(path).read_bytes()
    names = zip_names(data)
    if names is not None and is_torchscript(names):
        return load_torchscript(data)
    if names is not None and is_pt2(names):
        return load_pt2(data, path, trusted)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:
        if not _is_unsafe_pickle_error(err):
            raise ModelSourceError(
                f"{path} is not a model file that torch can read ({type(err).__name__}: "
                f"{str(err)[:200]}). Expected a state_dict / checkpoint (.pt, .pth, .bin), "
                "safetensors, TorchScript, a torch.export .pt2, .keras or a SavedModel folder."
            ) from None
        if not trusted:
            found = [g for g in _file_globals(data) if not g.startswith(("torch.", "collections."))]
            refs = f" (it references {', '.join(found[:5])})" if found else ""
            raise UntrustedSourceError(
                f"{path} is a pickled Python object, not plain weights{refs}: unpickling it can run "
                f"arbitrary code, so leapcore refused to load it. {TRUST_HINT}"
            ) from None
    log.warning("unpickling %s with weights_only=False because trusted=True", path)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def load_torchscript(data: bytes) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


# ---------------------------------------------------------------------------------------------- #
# torch.export archives
# ---------------------------------------------------------------------------------------------- #
_TEXT_RECORDS = {"version", "archive_format", "archive_version", "byteorder", "serialization_id"}
_TEXT_CONTENT = re.compile(rb"[A-Za-z0-9._-]{1,64}\n?")
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(?:weights|constants)/[^/]+_config\.json$")


def _raw_tensor_records(archive: zipfile.ZipFile) -> set[str]:
    """Records that the weight/constant configs say are raw tensor bytes (never unpickled)."""
    raw: set[str] = set()
    for name in archive.namelist():
        if not _PAYLOAD_CONFIG.search(name):
            continue
        try:
            entries = json.loads(archive.read(name)).get("config", {})
        except (ValueError, AttributeError):
            continue
        folder = name.rsplit("/", 1)[0]
        for entry in entries.values() if isinstance(entries, dict) else []:
            record = entry.get("path_name") if isinstance(entry, dict) else None
            if (
                isinstance(record, str)
                and "/" not in record
                and entry.get("use_pickle") is False
                and record.startswith(("weight_", "tensor_"))
            ):
                raw.add(f"{folder}/{record}")
    return raw


def check_pt2_pickle_free(data: bytes, where: str | Path) -> None:
    """Raise :class:`UntrustedSourceError` unless every record of a ``.pt2`` archive is inert."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ModelSourceError(
            f"{where} is not a torch.export .pt2 archive (not a zip file)."
        ) from None
    with archive:
        raw = _raw_tensor_records(archive)
        for info in archive.infolist():
            if info.is_dir() or info.filename in raw:
                continue
            content = archive.read(info)
            base = info.filename.rsplit("/", 1)[-1]
            if base in _TEXT_RECORDS and _TEXT_CONTENT.fullmatch(content):
                continue
            try:
                json.loads(content.decode("utf-8"))
                continue
            except (UnicodeDecodeError, ValueError):
                pass
            try:
                torch.load(io.BytesIO(content), map_location="cpu", weights_only=True)
                continue
            except Exception:
                raise UntrustedSourceError(
                    f"{where}: record {info.filename!r} of the .pt2 archive is not plain tensor "
                    "data (torch.export.load would unpickle it, which can run arbitrary code), so "
                    f"leapcore refused to load it. {TRUST_HINT}"
                ) from None


def load_pt2(data: bytes, where: str | Path, trusted: bool = False) -> ExportedModel:
    """Load a ``torch.export`` archive (checked to be pickle-free unless ``trusted``)."""
    if not trusted:
        check_pt2_pickle_free(data, where)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise ModelSourceError(
            f"{where} could not be read as a torch.export .pt2 archive ({type(err).__name__}: "
            f"{str(err)[:200]})."
        ) from None
    return ExportedModel(program)


class ExportedModel(nn.Module):
    """A ``torch.export`` program as a module the engine can drive.

    The program's own module refuses ``train()``/``eval()`` (it is always in the mode it was exported
    in), so it is held out of ``modules()``; its weights are frozen; ``.to(device)`` re-targets the
    program with ``move_to_device_pass``. A program exported with a fixed batch size (an
    ``input_example`` of one image) is called in slices of that size.
    """

    def __init__(self, program: torch.export.ExportedProgram):
        super().__init__()
        self._set(program)
        shape = self.example_shape
        self.fixed_batch = shape[0] if shape and isinstance(shape[0], int) else None

    def _set(self, program: torch.export.ExportedProgram) -> None:
        module = program.module()
        for p in module.parameters():
            p.requires_grad_(False)
        object.__setattr__(self, "program", program)
        object.__setattr__(self, "graph_module", module)

    @property
    def example_shape(self) -> tuple | None:
        """The shape of the first user input as exported (ints are static, others symbolic)."""
        names = set(self.program.graph_signature.user_inputs)
        for node in self.program.graph.nodes:
            if node.op == "placeholder" and node.name in names:
                val = node.meta.get("val")
                if val is None:
                    return None
                return tuple(int(d) if isinstance(d, int) else None for d in val.shape)
        return None

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """``(C, H, W)`` when the program fixes all three."""
        shape = self.example_shape
        if shape and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            return (shape[1], shape[2], shape[3])
        return None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.graph_module.state_dict(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> ExportedModel:  # type: ignore[override]
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        current = next(iter(self.graph_module.state_dict().values()), None)
        if device is not None and (current is None or current.device != torch.device(device)):
            from torch.export.passes import move_to_device_pass

            self._set(move_to_device_pass(self.program, device))
        return self

    def forward(self, x: torch.Tensor) -> Any:
        n = self.fixed_batch
        if n is None or x.shape[0] == n:
            return self.graph_module(x)
        if x.shape[0] % n:
            raise ModelSourceError(
                f"the exported model takes batches of exactly {n} (it was exported with a fixed "
                f"batch size) and got {x.shape[0]}; export it with a dynamic batch dimension."
            )
        outputs = [self.graph_module(x[i : i + n]) for i in range(0, x.shape[0], n)]
        if isinstance(outputs[0], torch.Tensor):
            return torch.cat(outputs)
        if isinstance(outputs[0], (tuple, list)):
            return torch.cat([o[0] for o in outputs])
        if isinstance(outputs[0], dict) and "logits" in outputs[0]:
            return {"logits": torch.cat([o["logits"] for o in outputs])}
        raise ModelSourceError("the exported model returns something other than logits.")

    def __repr__(self) -> str:
        return f"ExportedModel(input={self.example_shape}, fixed_batch={self.fixed_batch})"
