# Copyright 2026 The dsa-jax Authors. Licensed under the Apache License, Version 2.0.
"""The walkthrough notebook runs top to bottom at its tiny size, and is stored without outputs."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
NOTEBOOK = os.path.join(ROOT, "experiments", "notebooks", "dsa_walkthrough.ipynb")


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


@pytest.mark.slow  # a notebook kernel running two phases (issue 20, item 7)
def test_walkthrough_notebook_executes(monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this environment: tiny size, one CPU device (no fake 8-device mesh).
  monkeypatch.setenv("DSA_NB_SIZE", "tiny")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setenv("PYTHONPATH", ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  client = nbclient.NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  client.execute()
  text = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  assert "per-layer recall" in text and "stability:" in text
