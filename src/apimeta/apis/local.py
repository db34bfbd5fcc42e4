"""``LocalAPI``: a torch classifier behind the black-box contract, in process."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apimeta.apis.base import APIInfo, restrict_output, validate_query
from apimeta.apis.ledger import QueryLedger


class LocalAPI:
    """Wraps a module (that normalizes its own input) as a :class:`BlackBoxAPI`.

    The module runs in eval mode under ``torch.inference_mode``; callers get fresh, detached
    tensors that carry no graph, so no gradient or parameter can leak. ``max_batch`` bounds
    memory by splitting large queries.
    """

    def __init__(
        self,
        model: nn.Module,
        info: APIInfo,
        ledger: QueryLedger | None = None,
        max_batch: int = 4096,
        check_range: bool = True,
    ):
        self._model = model.eval()
        for p in self._model.parameters():
            p.requires_grad_(False)
        self.info = info
        self.ledger = ledger if ledger is not None else QueryLedger()
        self.max_batch = max_batch
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
        with torch.inference_mode():
            outs = [
                self._model(chunk.to(dev, non_blocking=True))
                for chunk in x.detach().split(self.max_batch)
            ]
            out = restrict_output(torch.cat(outs).float(), self.info.output)
        # clone outside inference mode: an ordinary tensor the caller may use anywhere
        return out.clone().to(x.device)

    def __repr__(self) -> str:
        return f"LocalAPI({self.info.name!r}, classes={list(self.info.classes)})"
