"""tune-inat where its users work: in a real Jupyter kernel (ipykernel, driven by nbclient and jupyter_client).

The quickstart notebook runs as committed (its parameters cell made smaller); a live search shows one
status area updated in place, nothing of Ray's console, stops on a kernel interrupt, resumes, and
runs again in the same kernel on the notebook's own Ray.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.manager import start_new_kernel
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "examples" / "quickstart.ipynb"
# What Ray, tqdm or a traceback would put in a cell: Ray's log lines, its workers' prefixed output, advice
NOISE = re.compile(r"\b(INFO|WARNING|ERROR)\b|pid=|raylet|Missing packages|IProgress|Traceback|ray\.init|ipywidgets")
SMALL = "max_epochs=2, num_samples=4"  # the demo space, made smaller for the tests


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache (and demo folder) for the module's kernels."""
    return tmp_path_factory.mktemp("kernel-cache")


def stream_text(outputs: list) -> str:
    return "".join(o.get("text", "") for o in outputs if o.get("output_type", o.get("msg_type")) == "stream")


def test_the_quickstart_notebook_runs_in_a_real_kernel(kernel_cache: Path, tmp_path: Path, monkeypatch) -> None:
    committed = nbformat.read(QUICKSTART, as_version=4)
    code_cells = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), "the notebook is committed executed"
    assert any(o.get("data", {}).get("image/png") for c in code_cells for o in c.outputs), "with its figures"
    assert any("<table" in o.get("data", {}).get("text/html", "") for c in code_cells for o in c.outputs)

    notebook = nbformat.read(QUICKSTART, as_version=4)
    (parameters,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source += f"\nsearch_options.update({SMALL})\nfinal_options.update(max_epochs=1)"
    monkeypatch.setenv("TUNE_INAT_CACHE", str(kernel_cache))
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    cells = [c for c in notebook.cells if c.cell_type == "code"]
    for cell in cells:
        assert not [o for o in cell.outputs if o.output_type == "error"], cell.source
        assert not NOISE.search(stream_text(cell.outputs)), (cell.source, stream_text(cell.outputs))

    def outputs_of(code: str) -> list:
        return next(cell.outputs for cell in cells if code in cell.source)

    search = outputs_of("tune_inat.search(")
    (status,) = [o for o in search if o.output_type == "display_data"]  # one status area, updated in place
    assert re.match(r"\[\d+:\d\d\] trials: 0 running, 0 to start, \d completed", status.data["text/plain"])
    (board,) = [o for o in search if o.output_type == "execute_result"]
    assert "(done)" in board.data["text/html"].split("</p>")[0] and board.data["text/html"].count("<tr") == 1 + 4
    curves = outputs_of("result.plot_curves()")
    assert [o for o in curves if "image/png" in o.get("data", {})], "the curves are a figure in the cell"
    final = outputs_of("result.final(")
    assert re.search(r"test accuracy \d+\.\d%; model: .*final/model\.pt", stream_text(final))
    predictions = outputs_of("tune_inat.predict(")
    assert predictions[0].data["text/html"].count("<tr") == 1 + 4  # the header and four photos
    assert "top 2</th>" in predictions[0].data["text/html"]
    freezing = outputs_of('groupby("freeze_fraction")')
    assert "freeze_fraction" in freezing[0].data["text/plain"]


class Kernel:
    """A real ipykernel, cells run one at a time, every output of each cell kept (jupyter_client)."""

    def __init__(self, cwd: Path) -> None:
        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=str(cwd))

    def run(self, code: str, interrupt_when: str | None = None, timeout: float = 600) -> list[dict]:
        """The cell's outputs as iopub messages' (type, content); interrupt the kernel when a text appears."""
        msg_id = self.client.execute(code)
        outputs: list[dict] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.client.get_iopub_msg(timeout=timeout)
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "status" and content["execution_state"] == "idle":
                return outputs
            if kind in ("stream", "display_data", "update_display_data", "execute_result", "error"):
                outputs.append({"msg_type": kind, **content})
                if interrupt_when and interrupt_when in json.dumps(content):
                    self.manager.interrupt_kernel()  # what the notebook's stop button sends
                    interrupt_when = None
        raise TimeoutError(code)

    def value(self, expression: str) -> object:
        """A plain value (JSON) computed in the kernel."""
        (result,) = [o for o in self.run(f"import json; print(json.dumps({expression}))") if o["msg_type"] == "stream"]
        return json.loads(result["text"])

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def status_areas(outputs: list[dict]) -> set[str]:
    return {o["transient"]["display_id"] for o in outputs if o["msg_type"] in ("display_data", "update_display_data")}


def test_a_live_search_in_a_kernel_is_one_area_stops_on_interrupt_resumes_and_runs_twice(
    kernel_cache: Path, tmp_path: Path
) -> None:
    kernel = Kernel(tmp_path)
    try:
        kernel.run("import ray; ray.init(num_cpus=2, include_dashboard=False); import tune_inat")  # the notebook's Ray
        options = (
            f"demo=True, {SMALL}, scheduler='fifo', set={{'image_size': 32}}, no_wandb=True, status_interval=2, "
            f"cache_dir={str(kernel_cache)!r}, results='results'"
        )
        first = kernel.run(f"r = tune_inat.search({options}, name='live')", interrupt_when="best val_acc")
        assert kernel.value("r.exit_code") == 130, stream_text(first)
        assert "resume=True, name='live'" in kernel.value("r._repr_html_()")
        assert kernel.value("ray.is_initialized()") is True  # the notebook's Ray is left running
        assert kernel.value("bool(len(r.trials) > 0 and (r.trials['status'] != 'completed').any())")

        resumed = kernel.run(f"r = tune_inat.search({options}, name='live', resume=True)")
        assert kernel.value("r.exit_code") == 0, stream_text(resumed)
        assert kernel.value("sorted(map(str, r.trials['status']))") == ["completed"] * 4
        again = kernel.run(f"r2 = tune_inat.search({options}, name='second')")
        assert kernel.value("(r2.exit_code, len(r2.trials))") == [0, 4]

        # The notebook's own Ray sends its workers' stderr to the cell (log_to_driver, Ray's default): an interrupt
        # ends trial processes, and what Python prints as Ray stops them comes from there, not from the search.
        ours = [line for line in stream_text(first).splitlines() if "(fine_tune_trial pid=" not in line]
        assert not NOISE.search("\n".join(ours)), stream_text(first)
        assert not NOISE.search(stream_text(again)), stream_text(again)  # nothing interrupted: nothing at all
        for outputs in (first, again):
            assert len(status_areas(outputs)) == 1  # one output area ...
            assert sum(o["msg_type"] == "display_data" for o in outputs) == 1
            assert sum(o["msg_type"] == "update_display_data" for o in outputs) >= 2  # ... updated in place
        # The notebook's own Ray sends its workers' lines to the cell (log_to_driver): the trials keep Ray's
        # quiet, except the one line Ray's trainable logs on restoring a checkpoint, before the trial runs.
        lines = [line for line in stream_text(resumed).splitlines() if "Restored on" not in line]
        assert not NOISE.search("\n".join(lines)), stream_text(resumed)
        assert len(status_areas(resumed)) == 1
    finally:
        kernel.close()
