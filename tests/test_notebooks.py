"""Every notebook in examples/notebooks runs top to bottom at small settings (JAXDIFF_SMALL=1).

Each notebook is executed in a fresh kernel by nbclient; the notebooks' own cells assert their results (the
bit-exact resume, the steering gain, CBO finding the minimum, ...). Outputs go to a temporary folder.
"""

import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("JAXDIFF_SMALL", "1")
    monkeypatch.setenv("JAXDIFF_OUTPUT", str(tmp_path))
    # the kernel is a new process: the suite's 8 fake devices and float64 do not apply to it
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
