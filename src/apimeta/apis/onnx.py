"""ONNX export of API classifiers and ``OnnxAPI``: the black-box contract on onnxruntime.

The exported graph takes ``input`` (B, C, H, W) float32 images in [0, 1] (normalization is
inside the graph; the batch axis is dynamic) and returns ``scores`` (B, n_classes) logits; the
output restriction is applied after onnxruntime, as in :class:`~apimeta.apis.local.LocalAPI`.
Foreign ONNX models keep their own tensor names, datatypes and layouts (an API description or
a ``zoo.json`` entry says what :class:`OnnxAPI` cannot read from the graph).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from apimeta.apis.base import (
    API_SOURCES,
    APIInfo,
    parse_output_mode,
    restrict_output,
    validate_query,
)
from apimeta.apis.describe import ONNX_TYPES, InputAdapter, ModelSpec, spec_from_entry
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.local import load_api_model, reject_options
from apimeta.apis.manifest import MANIFEST, entry_info, read_manifest
from apimeta.apis.manifest import zoo_dir as root_of
from apimeta.errors import CheckpointError, ConfigError
from apimeta.io import atomic_write, atomic_write_json

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "scores"
OPSET = 18


_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx",
    "onnxscript",
    "onnx_ir",
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' chatter (INFO logs, progress prints, deprecation warnings)."""
    loggers = [logging.getLogger(n) for n in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    channels: int,
    image_size: int,
    *,
    dynamo: bool = True,
    check: bool = True,
) -> Path:
    """Export ``model`` ((B, C, S, S) in [0, 1] -> (B, n) logits) to ONNX at ``path``, atomically.

    Uses the ``torch.export``-based exporter (``dynamo=True``) and falls back to the TorchScript
    exporter if it fails. ``check``: run the file once with onnxruntime at batch sizes 1 and 3 and
    compare with the torch model (raises :class:`CheckpointError` above 1e-4).
    """
    path = Path(path)
    model = model.eval()
    example = torch.rand(
        2, channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )

    def write_dynamo(tmp: Path) -> None:
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        with _quiet_exporter():
            program = torch.onnx.export(
                model,
                (example,),
                None,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=True,
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
        program.save(str(tmp))

    def write_legacy(tmp: Path) -> None:
        with _quiet_exporter():
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )

    with torch.no_grad():
        if dynamo:
            try:
                atomic_write(path, write_dynamo)
            except Exception as e:  # exporter bugs vary by model/platform: use the other one
                logger.warning("dynamo ONNX export failed (%s); using the TorchScript exporter", e)
                atomic_write(path, write_legacy)
        else:
            atomic_write(path, write_legacy)
    if check:
        sess = _session(path, threads=1)
        for b in (1, 3):
            x = torch.rand(
                b, channels, image_size, image_size, generator=torch.Generator().manual_seed(b)
            )
            with torch.no_grad():
                ref = model(x).float().numpy()
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            err = float(np.abs(got - ref).max())
            if not err <= 1e-4:
                path.unlink(missing_ok=True)
                raise CheckpointError(
                    f"ONNX export of {path.name} disagrees with torch by {err:.2e} at batch {b}; "
                    "try export_onnx(..., dynamo=False)"
                )
    return path


def providers_for(device: str | torch.device | None) -> list[str]:
    """onnxruntime execution providers for a torch device: CUDA (then CPU) for ``cuda[:N]`` when
    onnxruntime has it (``pip install apimeta[gpu]``: onnxruntime-gpu), else CPU with a warning."""
    import onnxruntime as ort

    if device is None or torch.device(device).type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    logger.warning(
        "device %s asked for, but this onnxruntime has no CUDAExecutionProvider: ONNX APIs run "
        "on the CPU (install onnxruntime-gpu: pip install 'apimeta[gpu]')",
        device,
    )
    return ["CPUExecutionProvider"]


def _session(path: str | Path, threads: int | None = 1, device: str | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=providers_for(device))
    except Exception as e:  # onnxruntime raises its own exception types
        missing = _missing_external_data(Path(path))
        if missing:
            raise CheckpointError(
                f"ONNX file {path} keeps its weights in {', '.join(missing)}, which is missing "
                "next to it; copy that file beside the .onnx (or save the model with its "
                "weights inside: onnx.save(model, path, save_as_external_data=False))"
            ) from None
        raise CheckpointError(
            f"onnxruntime cannot load {path} ({str(e).strip()[:300]}); is it a valid ONNX model? "
            "(for an apimeta zoo: re-export it with `apimeta zoo export-onnx`)"
        ) from None


def _missing_external_data(path: Path) -> list[str]:
    """External weight files an ONNX model refers to that are not next to it."""
    try:
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not parseable at all: the caller reports the onnxruntime error
        return []
    names = set()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            names |= {kv.value for kv in t.external_data if kv.key == "location"}
    return sorted(n for n in names if not (path.parent / n).is_file())


def _graph_io(sess: Any, where: str, input_name: str | None, output_name: str | None) -> tuple:
    """(input, output) NodeArgs of an onnxruntime session: its only input (or the one named)
    and its first output (or the one named); the input must be a float tensor."""
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    if input_name is not None:
        inputs = [i for i in inputs if i.name == input_name] or inputs
        if inputs[0].name != input_name:
            raise ConfigError(
                f"{where} has no input {input_name!r} (inputs: "
                f"{', '.join(i.name for i in sess.get_inputs())})"
            )
    if len(inputs) != 1:
        raise ConfigError(
            f"{where} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); apimeta "
            "sends one image tensor: name it with input_name"
        )
    if output_name is not None:
        named = [o for o in outputs if o.name == output_name]
        if not named:
            raise ConfigError(
                f"{where} has no output {output_name!r} (outputs: "
                f"{', '.join(o.name for o in outputs)})"
            )
        outputs = named
    if inputs[0].type not in ONNX_TYPES:
        raise ConfigError(
            f"{where} takes {inputs[0].type} input {inputs[0].name!r}; apimeta sends float "
            "images (float, float16 or double)"
        )
    return inputs[0], outputs[0]


class OnnxAPI:
    """An ONNX classifier on onnxruntime (CPU), as a :class:`BlackBoxAPI`.

    The tensor names and the input datatype are the graph's own (or ``input_name`` /
    ``output_name``); its input and output shapes are checked against ``info`` and the
    ``adapter`` (layout and scaling of a foreign model; default: (B, C, H, W) in [0, 1]) when
    the API is created. ``native_output``: what the graph returns; logits are restricted to
    ``info.output``, anything else is passed on as it is. ``device``: a CUDA torch device runs
    the graph on onnxruntime's CUDA provider where installed (see :func:`providers_for`). ``threads``: onnxruntime intra-op threads (None: onnxruntime's default,
    all cores). ``max_batch``: images per ``run`` call.
    """

    platform = "onnxruntime_onnx"

    def __init__(
        self,
        path: str | Path,
        info: APIInfo,
        ledger: QueryLedger | None = None,
        *,
        threads: int | None = 1,
        max_batch: int = 4096,
        check_range: bool = True,
        adapter: InputAdapter | None = None,
        input_name: str | None = None,
        output_name: str | None = None,
        native_output: str = "logits",
        session: Any = None,
        device: str | None = None,
    ):
        parse_output_mode(info.output)
        if native_output not in ("logits", info.output):
            raise ConfigError(
                f"API {info.name!r} returns {native_output!r}; it cannot answer {info.output!r} "
                f"(only logits can be restricted further)"
            )
        self.native_output = native_output
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(
                f"ONNX file {self.path} of API {info.name!r} is missing; put it there (for an "
                "apimeta zoo: run `apimeta zoo export-onnx DIR`)"
            )
        self.info = info
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.max_batch = max_batch
        self.check_range = check_range
        self._sess = session if session is not None else _session(self.path, threads, device)
        where = f"ONNX model {self.path.name} (API {info.name!r})"
        tin, tout = _graph_io(self._sess, where, input_name, output_name)
        adapter = adapter if adapter is not None else InputAdapter()
        self.adapter = dataclasses.replace(adapter, dtype=ONNX_TYPES[tin.type])
        self.input_name, self.output_name = tin.name, tout.name
        check = ModelSpec(
            info.name, info.dataset, info.classes, info.class_names, info.output,
            info.channels, info.image_size, self.adapter,
        )  # fmt: skip
        check.complete(tin.shape, tout.shape, where)

    @classmethod
    def from_spec(
        cls,
        path: str | Path,
        spec: ModelSpec,
        ledger: QueryLedger | None = None,
        output: str | None = None,
        **kw: Any,
    ) -> OnnxAPI:
        """The described model ``spec`` in the ONNX file ``path``; channels and image size the
        description leaves out come from the graph. ``output``: a restriction of a model that
        returns logits (None or ``logits``: as the model answers)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"ONNX file {path} of API {spec.name!r} is missing")
        sess = _session(path, kw.pop("threads", 1), kw.pop("device", None))
        where = f"ONNX model {path.name} (API {spec.name!r})"
        tin, tout = _graph_io(sess, where, spec.input_name, spec.output_name)
        info = spec.complete(tin.shape, tout.shape, where, tags={"file": path.name})
        if output not in (None, "logits", spec.output):
            info = dataclasses.replace(info, output=output)
        return cls(
            path,
            info,
            ledger,
            native_output=spec.output,
            adapter=spec.adapter,
            input_name=tin.name,
            output_name=tout.name,
            session=sess,
            **kw,
        )

    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, n_classes) scores in the API's output mode."""
        validate_query(x, self.info, self.check_range)
        self.ledger.charge(self.info.name, int(x.shape[0]))
        arr = self.adapter(x)
        outs = [
            self._sess.run([self.output_name], {self.input_name: arr[i : i + self.max_batch]})[0]
            for i in range(0, arr.shape[0], self.max_batch)
        ]
        out = np.concatenate(outs) if len(outs) > 1 else outs[0]
        if out.ndim != 2 or out.shape != (arr.shape[0], self.info.n_classes):
            raise CheckpointError(
                f"ONNX model {self.path.name} returned shape {list(out.shape)}; expected "
                f"[{arr.shape[0]}, {self.info.n_classes}]"
            )
        scores = torch.from_numpy(np.asarray(out, dtype=np.float32))
        if self.native_output == "logits":
            scores = restrict_output(scores, self.info.output)
        return scores.to(x.device)

    def __repr__(self) -> str:
        return f"OnnxAPI({self.info.name!r}, {self.path.name!r})"


def export_zoo_onnx(
    zoo_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    dynamo: bool = True,
    progress: Any = None,
) -> Path:
    """Write ``<api>.onnx`` for every API of the zoo and a ``zoo.json`` with ``onnx_file`` keys.

    ``out_dir``: None updates ``zoo_dir`` in place; another folder receives a complete zoo (the
    ONNX files, the weight files copied over and the updated manifest). ``progress``: called
    with (index, n, name) after each API. Returns the folder written.
    """
    src = Path(zoo_dir)
    if src.is_file():
        src = src.parent
    data = read_manifest(src)
    out = Path(out_dir) if out_dir is not None else src
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, entry in enumerate(data["apis"]):
        if "file" not in entry:  # a foreign ONNX model: nothing to export
            if out.resolve() != src.resolve():
                shutil.copy2(src / entry["onnx_file"], out / entry["onnx_file"])
            entries.append(entry)
            continue
        model = load_api_model(src, entry)
        onnx_file = f"{Path(entry['file']).stem}.onnx"
        export_onnx(
            model, out / onnx_file, int(entry["channels"]), int(entry["image_size"]), dynamo=dynamo
        )
        if out.resolve() != src.resolve():
            target = out / entry["file"]
            if not target.exists():
                shutil.copy2(src / entry["file"], target)
        entries.append({**entry, "onnx_file": onnx_file})
        if progress is not None:
            progress(i, len(data["apis"]), entry["name"])
    atomic_write_json(out / MANIFEST, {**data, "apis": entries})
    return out


def load_onnx_zoo(
    path: str | Path,
    ledger: QueryLedger | None = None,
    output: str = "logits",
    *,
    threads: int | None = 1,
    max_batch: int = 4096,
    device: str | None = None,
) -> list[OnnxAPI]:
    """Every API of a zoo with ONNX files as :class:`OnnxAPI` s sharing one ledger.

    Entries of apimeta-built APIs (with ``file``) need ``onnx_file`` (``apimeta zoo
    export-onnx``); entries without ``file`` are foreign ONNX models described by the keys of
    :mod:`apimeta.apis.describe` (see :mod:`apimeta.apis.manifest`). ``output``: the output
    restriction of apimeta-built APIs (a foreign model answers in its own ``output``)."""
    parse_output_mode(output)
    root = root_of(path)
    data = read_manifest(root)
    missing = [e["name"] for e in data["apis"] if "onnx_file" not in e]
    if missing or not data["apis"]:
        raise ConfigError(
            f"the zoo at {root} has no ONNX files for {len(missing)} APIs "
            f"({', '.join(missing[:3])}...); run `apimeta zoo export-onnx {root}` first"
            if missing
            else f"the zoo at {root} has no APIs; run `apimeta zoo build`"
        )
    ledger = ledger if ledger is not None else QueryLedger()
    apis = []
    for i, e in enumerate(data["apis"]):
        kw = {"threads": threads, "max_batch": max_batch, "device": device}
        if "file" in e:
            apis.append(OnnxAPI(root / e["onnx_file"], entry_info(e, output), ledger, **kw))
        else:
            spec = spec_from_entry(e, f"{root / MANIFEST}, API {i} ({e['name']!r})")
            apis.append(OnnxAPI.from_spec(root / e["onnx_file"], spec, ledger, output, **kw))
    return apis


@API_SOURCES.register("onnx")
class OnnxZoo:
    """A zoo directory with exported ONNX files (``apimeta zoo export-onnx``) on onnxruntime."""

    priority = 10
    handles_cache = False

    @staticmethod
    def matches(source: str) -> bool:
        root = root_of(source)
        if not (root / MANIFEST).is_file():
            return False
        if any(root.glob("*.onnx")):
            return True
        try:
            return any("onnx_file" in e for e in read_manifest(root)["apis"])
        except ConfigError:
            return False

    @staticmethod
    def load(
        source: str, *, ledger: QueryLedger, output: str, device: str = "cpu", **options: Any
    ) -> list[OnnxAPI]:
        options.pop("max_batch", None)  # onnxruntime runs its own default batches
        reject_options(options, source)
        return load_onnx_zoo(source, ledger=ledger, output=output, device=device)


__all__ = [
    "OnnxAPI",
    "OnnxZoo",
    "export_onnx",
    "export_zoo_onnx",
    "load_onnx_zoo",
    "providers_for",
]
