"""examples/colab.ipynb runs top to bottom (nbclient + ipykernel) offline: REAL_RUN off, the synthetic base."""
from __future__ import annotations

import os

import pytest

from .conftest import REPO

NOTEBOOK = REPO / "examples" / "colab.ipynb"


def test_colab_notebook_runs_top_to_bottom_offline(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    monkeypatch.setenv("LORA_DREAMBOOTH_NOTEBOOK_REAL_RUN", "0")
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio-tmp"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                   ).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    assert "real run (GPU + network): False" in outputs
    assert "5 photos in" in outputs and "Wrote" in outputs
    assert "sks-triangle ×1" in outputs, outputs[-2000:]
    work = tmp_path / "lora-dreambooth-work"
    assert (work / "adapters" / "sks-triangle" / "pytorch_lora_weights.safetensors").is_file()
    assert len(list((work / "samples").glob("*/grid.png"))) == 2
    assert "Traceback" not in outputs
