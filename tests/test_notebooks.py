"""The notebooks in notebooks/: each runs without an error, and is committed with its figures.

Each notebook is executed with nbclient in a fresh "python3" kernel (the one ipykernel
installs in the current environment), from a temporary working directory, importing the
same bnpy as these tests. To refresh the committed outputs after editing a notebook:

    BNPY_UPDATE_NOTEBOOKS=1 pytest tests/test_notebooks.py
"""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import bnpy

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
PNG = "image/png"


def kernel_environment():
    """The test process's environment, with this bnpy importable and one BLAS thread.

    The notebooks multiply small matrices: several BLAS threads only compete for the
    cores. MPLBACKEND is dropped so that the kernel's inline backend captures figures.
    """
    env = dict(os.environ)
    package_parent = str(Path(bnpy.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    for threads in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(threads, "1")
    env.pop("MPLBACKEND", None)
    return env


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def outputs_of_type(notebook, output_type):
    return [
        output
        for cell in code_cells(notebook)
        for output in cell.outputs
        if output.output_type == output_type
    ]


def images(notebook):
    return [output for output in outputs_of_type(notebook, "display_data") if PNG in output.data]


def test_there_are_eight_notebooks():
    assert [path.name[:3] for path in NOTEBOOKS] == [
        "01_",
        "02_",
        "03_",
        "04_",
        "05_",
        "06_",
        "07_",
        "08_",
    ]


WIDGET = "application/vnd.jupyter.widget-view+json"


def test_notebooks_01_and_03_have_controls_and_keep_a_static_figure_of_them():
    """The widget is stored, and the figure its function drew with the initial values
    is an ordinary image output of the same cell, what a viewer without a kernel shows."""
    for path in NOTEBOOKS[0], NOTEBOOKS[2]:
        notebook = nbformat.read(path, as_version=4)
        cells = [
            cell
            for cell in code_cells(notebook)
            if any(WIDGET in output.get("data", {}) for output in cell.outputs)
        ]
        assert cells, f"{path.name} has no ipywidgets controls"
        assert "viz.interactive(" in cells[0].source
        assert any(PNG in output.get("data", {}) for output in cells[0].outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_ends_with_exercises(path):
    last = nbformat.read(path, as_version=4).cells[-1]
    assert last.cell_type == "markdown" and "## Exercises" in last.source
    exercises = last.source.split("## Exercises")[1]
    assert len(re.findall(r"^\d+\. ", exercises, re.M)) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_without_error_and_draws_figures(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=300,
        record_timing=False,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=kernel_environment())  # raises CellExecutionError if a cell fails
    assert not outputs_of_type(notebook, "error")
    assert images(notebook), "the notebook drew no figure"
    if os.environ.get("BNPY_UPDATE_NOTEBOOKS"):
        nbformat.write(notebook, path)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_notebook_has_its_outputs(path):
    """Every code cell was run, in order, without error, and the figures are saved."""
    notebook = nbformat.read(path, as_version=4)
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1))
    assert not outputs_of_type(notebook, "error")
    assert images(notebook)
    for image in images(notebook):
        assert len(image.data[PNG]) > 10_000  # a real figure, not an empty canvas


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_reads_as_documentation_and_uses_the_public_api(path):
    notebook = nbformat.read(path, as_version=4)
    kinds = [cell.cell_type for cell in notebook.cells]
    assert notebook.cells[0].cell_type == "markdown" and notebook.cells[0].source.startswith("# ")
    assert kinds.count("markdown") >= kinds.count("code") - 1  # prose between the code
    source = "\n".join(cell.source for cell in code_cells(notebook))
    private = re.findall(r"bnpy(?:\.\w+)*\._(?!_)\w+|\b\w+\._(?!_)\w+\(", source)
    assert not private, f"private names used: {private}"
    assert "plt.savefig" not in source  # figures are outputs, not files


def test_notebook_01_maps_the_notes_symbols_to_bnpy_names():
    notebook = nbformat.read(NOTEBOOKS[0], as_version=4)
    table = next(
        cell.source for cell in notebook.cells if "From the notes to the code" in cell.source
    )
    for needed in (
        "1 - momentum",
        "`eps=1e-5`",
        "epsilon=1e-3",
        "momentum=0.99",
        "axis=-1",
        "$K$",
        "unbiased",
        "biased",
        "$\\delta$",
        "$\\alpha$",
    ):
        assert needed in table, needed
