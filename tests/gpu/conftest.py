"""Undo the root conftest's "needs a CUDA device" skip for CPU tests in this folder.

The root hook tests ``"gpu" in item.keywords``, and keywords include the folder name
``gpu``, so it would skip every test here. Only tests marked ``@pytest.mark.gpu`` need CUDA.
(Remove once the root hook uses ``item.get_closest_marker("gpu")``.)
"""

from __future__ import annotations

import pytest
import torch


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    for item in items:
        if item.get_closest_marker("gpu") is None and "tests/gpu/" in item.nodeid:
            item.own_markers = [
                m for m in item.own_markers
                if not (m.name == "skip" and m.kwargs.get("reason") == "needs a CUDA device")
            ]  # fmt: skip
