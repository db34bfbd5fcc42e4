"""``LocalAPI``: a torch classifier behind the black-box contract, in process; and the ``torch``
API source: a zoo directory of safetensors weights opened as ``LocalAPI`` s."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from apimeta.apis.base import API_SOURCES, APIInfo, restrict_output, validate_query
from apimeta.apis.ledger import QueryLedger
from apimeta.apis.manifest import MANIFEST, entry_info, read_manifest, zoo_dir
from apimeta.apis.recipe import build_api_model
from apimeta.errors import CheckpointError, ConfigError

#: images per forward of a CPU query (BENCHMARKS.md, "API forward": NCHW max-pool is memory-bound
#: at big batches, so a 550-image query is faster in chunks; 25-128 measured alike, 100 best)
CPU_CHUNK = 100


class LocalAPI:
    """Wraps a module (that normalizes its own input) as a :class:`BlackBoxAPI`.

    The module runs in eval mode under ``torch.inference_mode``; callers get fresh, detached
    tensors that carry no graph, so no gradient or parameter can leak. ``max_batch`` bounds
    memory by splitting large queries. Speed (same answers up to float rounding):
    ``channels_last`` runs a convolutional module in NHWC layout; ``chunk``: images per forward
    (default :data:`CPU_CHUNK` on CPU, ``max_batch`` on an accelerator).
    """

    def __init__(
        self,
        model: nn.Module,
        info: APIInfo,
        ledger: QueryLedger | None = None,
        max_batch: int = 4096,
        check_range: bool = True,
        *,
        channels_last: bool = True,
        chunk: int | None = None,
    ):
        self._model = model.eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        self.channels_last = channels_last and any(p.dim() == 4 for p in model.parameters())
        if self.channels_last:
            self._model = self._model.to(memory_format=torch.channels_last)
        self.info = info
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.max_batch = max_batch
        if chunk is None:
            chunk = CPU_CHUNK if self.device.type == "cpu" else max_batch
        self.chunk = max(1, min(int(chunk), max_batch))
        self.check_range = check_range

    @property
    def device(self) -> torch.device:
        p = next(self._model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def white_box_model(self) -> nn.Module:
        """The wrapped module, for white-box *upper-bound* experiments only.

        This breaks the black-box contract on purpose (``--white-box`` recovery uses true
        gradients through it); black-box learners never call it.
        """
        return self._model

    def query(self, x: Tensor) -> Tensor:
        """(B, C, H, W) in [0, 1] -> (B, n_classes) scores in the API's output mode."""
        validate_query(x, self.info, self.check_range)
        self.ledger.charge(self.info.name, int(x.shape[0]))
        dev = self.device
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode():
            outs = [
                self._model(part.to(dev, non_blocking=True).contiguous(memory_format=layout))
                for part in x.detach().split(self.chunk)
            ]
            out = restrict_output(torch.cat(outs).float(), self.info.output)
        # clone outside inference mode: an ordinary tensor the caller may use anywhere
        return out.clone().to(x.device)

    def __repr__(self) -> str:
        return f"LocalAPI({self.info.name!r}, classes={list(self.info.classes)})"


def load_api_model(path: str | Path, entry: dict[str, Any]) -> nn.Module:
    """Rebuild the classifier of one manifest ``entry`` of the zoo at ``path``, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = Path(path) / entry["file"]
    if not f.is_file():
        raise CheckpointError(
            f"weights file {f} of API {entry.get('name')!r} is missing; re-run "
            "`apimeta zoo build` with the same arguments to rebuild it"
        )
    model = build_api_model(
        entry["arch"],
        len(entry["classes"]),
        int(entry["channels"]),
        int(entry["image_size"]),
        float(entry["width"]),
        entry["mean"],
        entry["std"],
    )
    try:
        state = load_file(str(f))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(
            f"cannot load {f} into a {entry['arch']} (width {entry['width']}): {e}. "
            "The file is corrupt or does not match zoo.json; rebuild the zoo with --force."
        ) from None
    return model.eval()


def check_weights(root: str | Path, entry: dict[str, Any]) -> str | None:
    """What is wrong with an entry's weights file (missing, truncated, not safetensors), or None.
    Reads the header only. A foreign ONNX entry (no ``file``): its ONNX file must parse."""
    from safetensors import SafetensorError, safe_open

    if "file" not in entry:
        return _check_onnx(Path(root) / entry["onnx_file"])
    f = Path(root) / entry["file"]
    if not f.is_file():
        return f"weights file {entry['file']} is missing"
    try:
        with safe_open(str(f), "pt") as h:
            h.keys()
    except (SafetensorError, OSError) as e:
        return f"weights file {entry['file']} is unreadable ({e})"
    return None


def _check_onnx(f: Path) -> str | None:
    if not f.is_file():
        return f"ONNX file {f.name} is missing"
    try:
        import onnx

        onnx.load(str(f), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, ... on a damaged file
        return f"ONNX file {f.name} is unreadable ({type(e).__name__})"
    return None


def reject_options(options: dict[str, Any], source: str | Path) -> None:
    """HTTP client options given for a zoo that is not served over HTTP: one clear error."""
    if options:
        raise ConfigError(
            f"HTTP client options ({', '.join(sorted(options))}) only apply to a zoo "
            f"served over HTTP; {source} is a local zoo"
        )


@API_SOURCES.register("torch")
class TorchZoo:
    """A zoo directory (``zoo.json`` + safetensors weights) as in-process :class:`LocalAPI` s."""

    priority = 20
    handles_cache = False

    @staticmethod
    def matches(source: str) -> bool:
        p = Path(source)
        return p.is_dir() or p.name == MANIFEST

    @staticmethod
    def load(
        source: str,
        *,
        ledger: QueryLedger,
        output: str,
        device: str = "cpu",
        max_batch: int = 4096,
        **options: Any,
    ) -> list[LocalAPI]:
        reject_options(options, source)
        data = read_manifest(source)
        path = zoo_dir(source)
        if not data["apis"]:
            raise ConfigError(
                f"the zoo at {path} has no finished APIs yet; run `apimeta zoo build`"
            )
        foreign = [e["name"] for e in data["apis"] if "file" not in e]
        if foreign:
            raise ConfigError(
                f"APIs {', '.join(foreign[:3])} of the zoo at {path} are ONNX models only (no "
                "weights file); open the zoo with the onnx backend"
            )
        return [
            LocalAPI(load_api_model(path, e).to(device), entry_info(e, output), ledger, max_batch)
            for e in data["apis"]
        ]


__all__ = ["CPU_CHUNK", "LocalAPI", "TorchZoo", "check_weights", "load_api_model", "reject_options"]
