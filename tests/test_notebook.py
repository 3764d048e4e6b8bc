"""The Colab notebook runs top to bottom (papermill, this machine's kernel) and leaves jax alone.

Run from inside the checkout with the toy config (configs/demo.py:smoke) and no fetch, so nothing
is downloaded; its install cell runs the real `pip install -e` (offline: --no-index) against a
constraints file pinning the jax already installed, and must leave that jax as it was.
"""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "experiments", "colab", "demo.ipynb")


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _printed(nb, prefix):
    """The JSON after `prefix` on the line of the notebook's output that starts with it."""
    for o in _outputs(nb):
        for line in o.get("text", "").splitlines():
            if line.startswith(prefix):
                return json.loads(line[len(prefix):])
    raise AssertionError(f"no output line starting with {prefix!r}")


def test_notebook_parameters_default_to_the_real_model():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    ns = {}
    exec(params.source, ns)
    assert ns["CONFIG"].startswith("configs/smollm2_135m.py")
    assert ns["FETCH"].split() == ["smollm2", "bigbench"]
    assert os.path.exists(os.path.join(ROOT, ns["CONFIG"].split(":")[0]))


@pytest.mark.slow
def test_colab_notebook_executes_and_keeps_jax(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    import jax
    import nbformat

    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the kernel sees one CPU device
    wd = tmp_path / "wd"
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(
        NOTEBOOK, str(out), kernel_name="python3", progress_bar=False, cwd=ROOT,
        parameters=dict(WORKDIR=str(wd), CONFIG="configs/demo.py:smoke", FETCH="",
                        PIP_ARGS="--no-index --no-build-isolation"))
    nb = nbformat.read(str(out), as_version=4)
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, errors

    text = "".join(o.get("text", "") for o in _outputs(nb))
    assert "using the checkout " + ROOT in text            # no clone from inside a checkout
    assert "keeping this runtime's jax: jax==" + jax.__version__ in text
    before = _printed(nb, "jax before install: ")
    after = _printed(nb, "jax after install: ")
    assert before == after
    assert after["version"] == jax.__version__
    assert os.path.realpath(after["file"]) == os.path.realpath(jax.__file__)

    images = sum(1 for o in _outputs(nb) if "image/png" in o.get("data", {}))
    assert images >= 2  # the stage-2 funnel chart and the training curves
    for stage in ("self_instruct", "self_align", "engrave", "verbose_clone"):
        assert (wd / stage / "manifest.json").exists()
    assert (wd / "report.md").exists()
