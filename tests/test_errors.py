"""Expected errors share one base and print as one line; anything else is a bug and keeps its traceback."""

import subprocess
import sys

import pytest

from medsight.errors import InputNotFoundError, MedsightError, UsageError


def _expected_error_classes():
    from medsight.api import OutputExistsError
    from medsight.checkpoint import CheckpointError
    from medsight.config import ConfigError
    from medsight.data import DataError, ImageReadError
    from medsight.data.cache import CacheError
    from medsight.data.grades import GradeOrderError
    from medsight.data.imageio import ImageTooLargeError
    from medsight.data.multilabel import MultiLabelDataError
    from medsight.engine import TrainingError
    from medsight.engine.budget import BudgetError
    from medsight.engine.loggers import LoggerUnavailable
    from medsight.evaluation.runs import EnsembleError
    from medsight.inference import EnsembleFileError, ExportError, NoImagesError
    from medsight.models import ModelError
    from medsight.serve.batching import ServerBusyError
    from medsight.serve.service import ExplainUnavailableError, UnknownClassError, UnknownMethodError
    from medsight.tasks import TaskConfigError
    from medsight.utils.device import DeviceError
    from medsight.utils.files import OutputNotWritableError

    return {OutputExistsError: FileExistsError, CheckpointError: ValueError, ConfigError: ValueError,
            DataError: ValueError, ImageReadError: ValueError, CacheError: ValueError, GradeOrderError: ValueError,
            ImageTooLargeError: ValueError, MultiLabelDataError: ValueError, TrainingError: RuntimeError,
            BudgetError: ValueError, LoggerUnavailable: RuntimeError, EnsembleError: ValueError,
            EnsembleFileError: ValueError, ExportError: RuntimeError, NoImagesError: ValueError, ModelError: ValueError,
            ServerBusyError: RuntimeError, ExplainUnavailableError: RuntimeError, UnknownClassError: ValueError,
            UnknownMethodError: ValueError, TaskConfigError: ValueError, DeviceError: ValueError,
            OutputNotWritableError: PermissionError, UsageError: ValueError, InputNotFoundError: FileNotFoundError}


def test_every_expected_error_derives_from_one_base_and_keeps_its_builtin_base():
    for cls, builtin in _expected_error_classes().items():
        assert issubclass(cls, MedsightError), cls.__name__
        assert issubclass(cls, builtin), cls.__name__  # callers that catch the built-in base still work


def _run_cli_with(raise_expr: str) -> subprocess.CompletedProcess:
    """The CLI's ``models`` command replaced by one that raises ``raise_expr``, in a fresh interpreter."""
    code = ("import sys, medsight.cli as c\n"
            "from medsight.errors import UsageError\n"
            "def boom(args):\n"
            f"    raise {raise_expr}\n"
            "c._cmd_models = boom\n"
            "sys.exit(c.main(['models']))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("planted", ["ValueError('shapes (3,) and (4,) not aligned')", "ZeroDivisionError('x')",
                                     "FileNotFoundError('internal.tmp')"])
def test_a_bug_in_the_library_shows_its_traceback(planted):
    """A numpy- or scikit-learn-style ValueError used to print as one 'medsight: error' line with no traceback."""
    done = _run_cli_with(planted)
    assert done.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in done.stderr
    assert planted.split("(")[0] in done.stderr
    assert "medsight: error" not in done.stderr


def test_an_expected_error_prints_one_line_and_returns_2():
    done = _run_cli_with("UsageError('--rho must be > 0, got -1')")
    assert done.returncode == 2
    assert done.stderr.strip() == "medsight: error: --rho must be > 0, got -1"


def test_a_missing_image_is_an_expected_error(tmp_path, capsys):
    from medsight.inference.predictor import collect_images

    with pytest.raises(InputNotFoundError, match="nothing-here.png"):
        collect_images([str(tmp_path / "nothing-here.png")])


def test_robustness_prints_each_change_with_its_own_sign(monkeypatch, capsys):
    # a corruption that raises the score printed "(−-0.0075)": the change is signed once
    import medsight.api
    from medsight.cli import main

    rows = [{"severity": 1, "auc": 0.75, "drop": -0.0075}, {"severity": 2, "auc": 0.70, "drop": 0.0425}]
    fake = {"metric": "auc", "data": "d.npz", "clean": 0.7425, "n": 4, "corruptions": {"brightness": rows},
            "mean_drop": 0.0175}
    monkeypatch.setattr(medsight.api, "robustness_check", lambda *a, **k: fake)
    assert main(["robustness", "run/best.pt"]) == 0
    out = capsys.readouterr().out
    assert "s1 0.7500 (+0.0075)" in out and "s2 0.7000 (-0.0425)" in out and "−-" not in out
