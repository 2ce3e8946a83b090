"""The Kaggle kernel: its metadata is what Kaggle's CLI needs, and the notebook runs headless
(nbclient, `TOEX_TINY=1`) without a cell error."""

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

KAGGLE = Path(__file__).resolve().parent.parent / "kaggle"


def test_kernel_metadata_points_at_the_notebook():
    metadata = json.loads((KAGGLE / "kernel-metadata.json").read_text())
    for key in ("id", "title", "code_file", "language", "kernel_type"):
        assert metadata[key], key
    assert metadata["kernel_type"] == "notebook" and metadata["language"] == "python"
    assert (KAGGLE / metadata["code_file"]).exists()
    assert metadata["enable_internet"] is False  # the notebook runs offline


def test_notebook_runs_headless_in_tiny_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("TOEX_TINY", "1")
    monkeypatch.setenv("TOEX_OUTPUT", str(tmp_path / "out"))
    notebook = nbformat.read(KAGGLE / "toex_tf_quickstart.ipynb", as_version=4)
    # Raises CellExecutionError, naming the cell, on any error.
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    outputs = "".join(
        output.get("text", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "tiny mode" in outputs
    assert "exit layer of each new token" in outputs
    assert "'score'" in outputs  # the reloaded export lists its signatures
    assert "generate_text: 'Return the" in outputs  # tiny mode: the byte tokenizer in-graph
    assert os.path.exists(tmp_path / "out" / "saved_model" / "saved_model.pb")
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images  # the exit-curve plot was shown
    pages = [
        output["data"]["text/html"]
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "text/html" in output.get("data", {})
    ]
    assert any('class="tok"' in page and 'id="grid"' in page for page in pages)  # the report
    assert os.path.exists(tmp_path / "out" / "report.json")
