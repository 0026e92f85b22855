import importlib.metadata

import numpy as np
import pytest
import torch

import dlarch_lib as dl
from dlarch_lib.core.notebook import SETUP_CELL, glue, verdict
from dlarch_lib.core.runtime import RunConfig, describe


def test_seed_everything_repeats_random_draws():
    dl.seed_everything(3)
    a = torch.randn(5)
    dl.seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_seed_rejects_bad_seed():
    with pytest.raises(ValueError, match="non-negative int"):
        dl.seed_everything(-1)


def test_run_size_from_env_and_argument(monkeypatch):
    monkeypatch.setenv("DLARCH_SIZE", "full")
    assert dl.run_size() == "full"
    assert dl.run_size("ci") == "ci"
    monkeypatch.delenv("DLARCH_SIZE")
    assert dl.run_size() == ("full" if torch.cuda.is_available() else "ci")


def test_unknown_run_size_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DLARCH_SIZE", "huge")
    with pytest.raises(ValueError, match="unknown run size 'huge'"):
        dl.run_size()


def test_pick_device_cpu_and_missing_cuda():
    assert dl.pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            dl.pick_device("cuda")


def test_setup_returns_config_and_pick(monkeypatch, capsys):
    monkeypatch.setenv("DLARCH_SIZE", "ci")
    monkeypatch.setenv("DLARCH_THREADS", "1")
    run = dl.setup(seed=1, device="cpu")
    assert isinstance(run, RunConfig) and run.is_ci and run.threads == 1
    assert run.pick(ci=1, full=2) == 1
    assert "size 'ci'" in capsys.readouterr().out
    assert describe(run) == {"seed": 1, "device": "cpu", "size": "ci", "threads": 1}


def test_setup_rejects_bad_thread_count(monkeypatch):
    monkeypatch.setenv("DLARCH_THREADS", "zero")
    with pytest.raises(ValueError, match="DLARCH_THREADS"):
        dl.setup(quiet=True)


def test_setup_cell_is_valid_python_and_imports_the_library():
    compile(SETUP_CELL, "<setup>", "exec")
    assert "import dlarch_lib as dl" in SETUP_CELL and "RUN = dl.setup(" in SETUP_CELL


def test_glue_returns_value_and_checks_name():
    assert glue("answer", 42) == 42
    with pytest.raises(ValueError, match="identifiers"):
        glue("not a name", 1)


def test_glue_converts_array_scalars_to_python_numbers():
    import numpy as np

    assert type(glue("x", np.float64(1.5))) is float
    assert type(glue("y", torch.tensor(3))) is int


def test_device_audit_fails_a_model_not_moved_to_the_run_device(monkeypatch):
    """Under DLARCH_DEVICE_AUDIT=1 a model trained without RUN.device fails on a CPU, too."""
    from torch import nn

    from dlarch_lib.core import runtime
    from dlarch_lib.core.train import fit

    monkeypatch.setenv("DLARCH_DEVICE_AUDIT", "1")
    run = dl.setup(seed=0, device="cpu", quiet=True)
    assert run.device == runtime.AUDIT_DEVICE
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,)))]
    with pytest.raises(RuntimeError, match="never moved"):
        fit(nn.Linear(3, 2), data, epochs=1, progress=False)
    with pytest.raises(RuntimeError, match="moved to cpu"):  # a library default "cpu" is not RUN.device
        fit(nn.Linear(3, 2).to("cpu"), data, epochs=1, progress=False)
    stacked = nn.Sequential(nn.Linear(3, 3).to(run.device), nn.Linear(3, 2))  # one part forgotten
    with pytest.raises(RuntimeError, match="module '1'"):
        fit(stacked, data, epochs=1, progress=False)
    history = fit(stacked.to(run.device), data, epochs=1, progress=False)
    assert history.steps == 1


def test_seeded_restores_the_callers_generator():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with dl.seeded(7):
        inside = torch.rand(2)
    with dl.seeded(7):
        assert torch.equal(torch.rand(2), inside)  # reproducible from its own seed
    assert torch.equal(torch.rand(3), expected)  # the caller's stream continues untouched


def test_require_installs_only_what_is_missing_or_out_of_range(monkeypatch):
    from dlarch_lib.core import runtime

    assert runtime.extra_requirements("onnx") == ["onnx>=1.17", "onnxruntime>=1.20", "onnxscript>=0.5"]
    with pytest.raises(ValueError, match="no optional dependency group 'tpu'"):
        runtime.extra_requirements("tpu")
    installed = importlib.metadata.version("numpy")
    monkeypatch.setattr(
        runtime, "extra_requirements", lambda group: ["numpy>=1.0", f"numpy>{installed}", "no-such-package-x>=1"]
    )
    with pytest.raises(ModuleNotFoundError, match="no-such-package-x"):
        runtime.require("any", install=False)
    calls = []
    monkeypatch.setattr(runtime.subprocess, "run", lambda cmd, check: calls.append(cmd))
    assert runtime.require("any") == [f"numpy>{installed}", "no-such-package-x>=1"]
    assert calls[0][-2:] == [f"numpy>{installed}", "no-such-package-x>=1"] and calls[0][1:4] == ["-m", "pip", "install"]


def test_verdict_chooses_the_phrase_the_numbers_make_true(monkeypatch):
    glued = {}
    monkeypatch.setattr(
        "dlarch_lib.core.notebook.glue", lambda name, value, display=False: glued.setdefault(name, value)
    )
    a, b = 0.8, 0.7
    assert verdict("wins", a > b, "wins", "loses") is True and glued["wins"] == "wins"
    assert verdict("flat", np.float64(a) < b, "rises", "falls") is False and glued["flat"] == "falls"
    with pytest.raises(TypeError, match="computed bool"):
        verdict("typed", "wins", "wins", "loses")  # a typed string is not a comparison
    with pytest.raises(ValueError, match="two different"):
        verdict("same", True, "wins", "wins")
