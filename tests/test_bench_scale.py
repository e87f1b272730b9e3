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
                "local": {
                    "prepare": _stage(5),
                    "features_build": _stage(20),
                    "serving": {"end_to_end": {"p50_ms": 12.5, "p99_ms": 31.0}},
                },
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
    assert "p99 31.0 ms" in out  # the serving stage is the table's caption, not a timed row


def test_cli_rejects_unknown_stages_and_engines():
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "scale", "--stages", "features_build,nope"])
    assert bad.exit_code != 0 and "nope" in bad.output
    bad = runner.invoke(app, ["bench", "scale", "--engines", "spark"])
    assert bad.exit_code != 0 and "spark" in bad.output
    bad = runner.invoke(app, ["bench", "scale", "--milvus", "cluster"])
    assert bad.exit_code != 0 and "cluster" in bad.output


def test_previous_reports_merge_stage_by_stage(tmp_path, settings):
    import json

    from bench.scale import run

    data_run = {"sizes": {"5000000": {"local": {"prepare": _stage(150), "materialize": _stage(9)}}}}
    train_run = {"sizes": {"5000000": {"local": {"train": _stage(300), "materialize": _stage(8)}}}}
    paths = [tmp_path / "data.json", tmp_path / "train.json"]
    for path, report in zip(paths, (data_run, train_run), strict=True):
        path.write_text(json.dumps(report))
    out = tmp_path / "merged.json"
    merged = run(settings, ScaleBenchConfig(sizes=(), engines=("local",)), out, paths)
    local = merged["sizes"]["5000000"]["local"]
    assert {k: v["seconds"] for k, v in local.items()} == {
        "prepare": 150,
        "materialize": 8,  # measured again later: the later figure
        "train": 300,
    }
    assert json.loads(out.read_text())["sizes"] == merged["sizes"]


def test_reuse_needs_an_earlier_workdir_and_halves_distributed_steps(settings, tmp_path):
    from bench.scale import run, train_steps_per_worker

    for stages in (("train",), ("serving",)):
        cfg = ScaleBenchConfig(sizes=(1000,), engines=("local",), stages=stages, reuse=True)
        with pytest.raises(FileNotFoundError, match="--reuse"):
            run(settings.model_copy(update={"workdir": tmp_path}), cfg, tmp_path / "r.json")
    assert train_steps_per_worker(ScaleBenchConfig(train_steps=200, train_workers=2)) == 100
    assert train_steps_per_worker(ScaleBenchConfig(train_steps=1, train_workers=4)) == 1


def test_materialize_rates_compare_each_engine_with_feast_stock_of_the_same_size(capsys):
    from bench.scale import DEFAULT_STAGES, FEAST_STOCK, materialize_rates

    report = {
        "sizes": {
            "1000000": {
                "local": {FEAST_STOCK: _stage(200), "materialize": _stage(50)},
                "ray": {"materialize": _stage(40)},
            },
            "5000000": {"local": {FEAST_STOCK: _stage(900, ok=False), "materialize": _stage(250)}},
        }
    }
    rates = materialize_rates(report)
    assert rates["1000000"] == {
        "feast_stock": 5000.0,
        "local": 20000.0,
        "ray": 25000.0,
        "local_vs_feast_stock": 4.0,
        "ray_vs_feast_stock": 5.0,
    }
    assert rates["5000000"] == {"local": 20000.0}  # a failed baseline gives no ratio
    print_table(report)
    assert "local_vs_feast_stock 4.0" in capsys.readouterr().err
    assert FEAST_STOCK not in DEFAULT_STAGES and "materialize" in DEFAULT_STAGES  # opt-in
