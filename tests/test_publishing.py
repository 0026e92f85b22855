"""The publishing workflow and the Colab path of the setup cell."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

from dlarch_lib.core.notebook import SETUP_CELL
from tests.notebooks import ROOT, chapters, load

WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def test_pages_workflow_builds_with_the_readme_command_and_deploys():
    flow = yaml.safe_load(WORKFLOW.read_text())
    steps = flow["jobs"]["build"]["steps"]
    runs = [s.get("run", "") for s in steps]
    assert "bash tools/dev.sh book" in runs
    assert "bash tools/dev.sh book" in (ROOT / "README.md").read_text()
    upload = [s for s in steps if "upload-pages-artifact" in s.get("uses", "")]
    assert upload and upload[0]["with"]["path"] == "_build/html"
    assert any("deploy-pages" in s.get("uses", "") for s in flow["jobs"]["deploy"]["steps"])
    assert flow["permissions"]["pages"] == "write"


def test_chapters_ask_colab_for_a_gpu_runtime():
    for nb in chapters():
        meta = load(nb)["metadata"]
        assert meta.get("accelerator") == "GPU", f"{nb.name}: no GPU runtime requested"
        assert meta["kernelspec"]["name"] == "python3"


def test_setup_cell_installs_dlarch_lib_on_a_simulated_colab(tmp_path):
    """Fresh venv without dlarch_lib, with the runtime's packages (torch, …) preinstalled, as on Colab.

    The setup cell must install dlarch_lib from DLARCH_SOURCE (here this checkout, offline
    for the package itself) without reinstalling torch, and the chapter imports must work.
    """
    venv = tmp_path / "colab"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Colab's preinstalled packages: this environment's site-packages, added by a .pth file.
    # (.pth files inside an added directory are not processed, so our editable dlarch_lib stays invisible.)
    (Path(site) / "colab_runtime.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    script = (
        "import importlib.util, sys, types\n"
        "sys.modules['google.colab'] = types.ModuleType('google.colab')  # what Colab has\n"
        "assert importlib.util.find_spec('dlarch_lib') is None, 'dlarch_lib must start absent'\n"
        + SETUP_CELL
        + "\nimport torch\nprint('DLARCH', dl.__file__)\nprint('TORCH', torch.__file__)\n"
        "from dlarch_lib.core.data import load_digits_split\nassert load_digits_split().num_classes == 10\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env.update(DLARCH_SOURCE=str(ROOT), DLARCH_SIZE="ci", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run([python, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("DLARCH", "TORCH")))
    assert lines["DLARCH"].startswith(site), f"dlarch_lib not installed into the fresh venv: {lines['DLARCH']}"
    assert lines["TORCH"].startswith(sysconfig.get_paths()["purelib"]), "torch was reinstalled"
    assert not list(Path(site).glob("torch-*.dist-info")), "torch was reinstalled into the venv"
