"""launch/colab.ipynb, executed headless as Jupyter runs it (from launch/), on a shorter run.

Only the cell tagged `parameters` is replaced (papermill's convention); every other cell runs
as written. mmjax is installed here, so the notebook installs nothing, and without an OpenCLIP
checkpoint it downloads nothing.
"""
import json
import os
import re
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
STEPS, BATCH = 30, 32  # a quarter of the default run's examples per step; still a caption of a few words


def install_kernel_spec(jupyter_dir) -> str:
    """A kernel running this Python: a user's or the system's `python3` spec may name another."""
    spec_dir = jupyter_dir / "kernels" / "mmjax-test"
    spec_dir.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec_dir / "kernel.json").write_text(json.dumps({"argv": argv, "language": "python", "display_name": "mmjax"}))
    return spec_dir.name


def stream(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def test_colab_notebook_runs(tmp_path, monkeypatch):
    nb = nbformat.read(os.path.join(LAUNCH, "colab.ipynb"), as_version=4)
    nbformat.validate(nb)
    assert not any(cell.get("outputs") for cell in nb.cells), "store the notebook with its outputs cleared"
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    workdir = tmp_path / "coca"
    values = dict(TOTAL_STEPS=STEPS, BATCH_SIZE=BATCH, NUM_EVAL=32, WORKDIR=str(workdir), OPENCLIP_CHECKPOINT="",
                  DOWNLOAD_OPENCLIP=False)
    assert re.findall(r"^(\w+) =", params.source, re.M) == list(values)  # every parameter replaced
    params.source = "".join(f"{name} = {value!r}\n" for name, value in values.items())

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # where Jupyter looks for kernel specs first
    kernel = install_kernel_spec(tmp_path / "jupyter")
    # `!python` is the kernel's Python, as on Colab, even when this one's bin/ is not on PATH.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    # One CPU device, as on Colab, not conftest's eight (an xdist worker's XLA_FLAGS names them twice).
    xla_flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in flag]
    monkeypatch.setenv("XLA_FLAGS", " ".join(xla_flags))
    client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=600, resources={"metadata": {"path": LAUNCH}})
    cells = {cell.id: cell for cell in nb.cells}
    try:
        client.execute()  # a cell that raises fails the test with its traceback
    except nbclient.exceptions.CellExecutionError:
        print(stream(cells["train"])[-3000:])  # a failed training command raises nothing itself: its output
        raise
    train = stream(cells["train"])
    assert "Final held-out results" in train, train[-3000:]
    assert os.listdir(workdir / "checkpoints") == [str(STEPS)]
    assert (workdir / "curves.png").stat().st_size > 0
    assert any("image/png" in o.get("data", {}) for o in cells["curves"].outputs)

    predict = stream(cells["predict"])
    probs = [float(p) for p in re.findall(r"[a-z] (\d\.\d{3})", predict)]  # "  two red circles 0.912  ..."
    assert len(probs) == 4 and abs(sum(probs) - 1) <= 0.002, predict  # a softmax, printed to 3 decimals
    caption = re.search(r"caption: (.*)", predict)
    assert caption and caption.group(1).strip(), predict
    assert "skipped" in stream(cells["openclip"])  # no OpenCLIP checkpoint given
