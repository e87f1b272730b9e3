"""`bench scale`'s arithmetic and options (the benchmark itself is a command, not a test)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from bench.scale import ScaleBenchConfig, fit_linear, fitted_models, print_table
from friendrec.cli import app


def _stage(seconds: float, ok: bool = True) -> dict:
    return {"seconds": seconds, "peak_mb": 100.0, "ok": ok, "log": "x.log"}


def test_fit_recovers_a_line_and_needs_two_sizes():
    model = fit_linear([250_000, 1_000_000], [10.0 + 0.25 * 40, 10.0 + 1.0 * 40])
    assert model == pytest.approx({"fixed_s": 10.0, "s_per_million": 40.0})
    assert fit_linear([1_000_000], [50.0]) is None


def test_models_use_only_successful_stages_of_each_engine(capsys):
    report = {
        "sizes": {
            "250000": {
                "local": {"prepare": _stage(5), "features_build": _stage(20)},
                "ray": {"features_build": _stage(30)},
            },
            "1000000": {
                "local": {"prepare": _stage(20), "features_build": _stage(80)},
                "ray": {"features_build": _stage(60, ok=False)},
            },
        }
    }
    models = fitted_models(report, ScaleBenchConfig())
    assert models["local/features_build"]["s_per_million"] == pytest.approx(80.0)
    assert models["local/prepare"]["s_per_million"] == pytest.approx(20.0)
    assert "ray/features_build" not in models  # one successful size: no line
    report["models"] = models
    print_table(report)
    out = capsys.readouterr().err
    assert "failed" in out and "1.50x" in out  # 30 / 20 at 250k


def test_cli_rejects_unknown_stages_and_engines():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "scale", "--stages", "features_build,nope"])
    assert bad.exit_code != 0 and "nope" in bad.output
    bad = runner.invoke(app, ["bench", "scale", "--engines", "spark"])
    assert bad.exit_code != 0 and "spark" in bad.output
