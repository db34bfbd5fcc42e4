"""Test setup: one thread, a private APIMETA_HOME, tiny data."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "apimeta-home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("APIMETA_HOME", str(home))
    yield
