"""`bench quality-summary` on hand-made `bench quality` results: which result wins per graph, the
targets' verdicts, the markdown and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality_summary import chosen_on_validation, load_results, markdown, plot, verdicts
from friendrec.config import TrainingSettings

TARGETS = {"relative_recall50_gain": {"all": 0.05, "cold_start": 0.02}, "max_step_ratio": 1.5}


def _slices(all50: float, cold50: float) -> dict:
    return {"all": {"recall@50": all50}, "cold_start": {"recall@50": cold50}}


def _entry(dataset: str, ssmtl_all: float, ssmtl_cold: float, objectives=("baseline", "ssmtl")):
    results = {
        "baseline": _slices(0.20, 0.10),
        "ssmtl": _slices(ssmtl_all, ssmtl_cold),
        "adamic_adar": _slices(0.25, 0.05),
        "random": _slices(0.01, 0.01),
    }
    comparisons = [
        {"a": "ssmtl", "b": "baseline", "metric": "recall@50", "slice": s, "diff": d,
         "lo": d - 0.01, "hi": d + 0.01}
        for s, d in (("all", ssmtl_all - 0.20), ("cold_start", ssmtl_cold - 0.10))
    ]  # fmt: skip
    return {
        "dataset": dataset,
        "users": 1000,
        "test_queries": 500,
        "cold_start_queries": 50,
        "results": results,
        "comparisons": comparisons,
        "seed_recall50": {o: [0.2] for o in objectives},
        "step_ratio_vs_baseline": {"baseline": 1.0, "ssmtl": 1.2},
    }


def _write(
    path: Path, seeds: list[int], created: str, *entries: dict, training: dict | None = None
) -> Path:
    payload = {"created_at": created, "seeds": seeds, "targets": TARGETS, "datasets": entries}
    if training is not None:
        payload["training"] = training
    path.write_text(json.dumps(payload))
    return path


def test_the_result_with_more_seeds_wins_and_targets_are_judged(tmp_path: Path):
    one_seed = _write(tmp_path / "a.json", [0], "2026-01-02", _entry("g/A", 0.30, 0.30))
    three = _write(
        tmp_path / "b.json",
        [0, 1, 2],
        "2026-01-01",
        _entry("g/A", 0.205, 0.103),
        _entry("g/B", 0.26, 0.09),
    )
    results = {r.dataset: r for r in load_results([one_seed, three])}
    assert results["g/A"].source == three  # three seeds beat one, even though older
    a = verdicts(results["g/A"])
    # +2.5 % all (< 5 %), +3 % cold (>= 2 %), 0.205 < Adamic-Adar 0.25, step 1.2 <= 1.5.
    assert a == {
        "gain_all": False,
        "gain_cold_start": True,
        "above_adamic_adar": False,
        "step_ratio": True,
    }
    b = verdicts(results["g/B"])
    assert (b["gain_all"], b["gain_cold_start"], b["above_adamic_adar"]) == (True, False, True)
    text = markdown(list(results.values()))
    assert "| g/A | 1,000 | 500 (50) | 3 | 0.2000 | 0.2050 | 0.2500 | +2.5% [-2.5%, +7.5%]" in text
    assert "| g/B | met | missed | met | met |" in text
    # A: +3 % cold-start meets the target by its point estimate only (CI -7 %, +13 %).
    assert "| g/A | missed | met (CI includes 0) | missed | met |" in text


def test_each_source_names_its_settings_that_are_not_todays_defaults(tmp_path: Path):
    """A table made before a default moved says which models it measured; a run's own seed and
    objective are not such a setting, and a source at today's defaults names nothing."""
    today = TrainingSettings().model_dump()
    old = _write(
        tmp_path / "old.json",
        [0],
        "2026-01-01",
        _entry("g/A", 0.2, 0.1),
        training={**today, "feature_drop": 0.35, "seed": 7, "objective": "mae"},
    )
    new = _write(tmp_path / "new.json", [0], "2026-01-02", _entry("g/B", 0.2, 0.1), training=today)
    text = markdown(load_results([old, new]))
    assert f"- `{old}`: feature_drop 0.35\n" in text
    assert f"`{new}`:" not in text and "seed 7" not in text


def test_plot_is_written_and_bad_files_are_named(tmp_path: Path):
    source = _write(tmp_path / "q.json", [0, 1], "2026-01-01", _entry("g/A", 0.21, 0.09))
    png = tmp_path / "img" / "forest.png"
    plot(load_results([source]), png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=r"broken\.json: not a `friendrec bench quality` result"):
        load_results([broken])


def test_a_graph_with_either_ablation_is_in_the_ablation_table(tmp_path: Path):
    cca_only = _entry("g/C", 0.21, 0.10, objectives=("baseline", "ssmtl", "cca"))
    source = _write(tmp_path / "c.json", [0, 1, 2], "2026-01-01", cca_only, _entry("g/D", 0.2, 0.1))
    text = markdown(load_results([source]))
    assert "| g/C | 3 | retrieval + CCA-SSG |" in text
    assert "| g/C | 3 | retrieval + masked reconstruction |" not in text
    assert "| g/D | 3 | SSMTL" not in text  # no ablation run: not in that table


def test_popularity_of_the_top_50_is_tabled_where_recorded(tmp_path: Path):
    recorded = _entry("g/E", 0.21, 0.10)
    recorded["popularity@50"] = {
        "all": {"baseline": 3.1, "ssmtl": 3.2, "adamic_adar": 4.4, "heldout_friends": 4.0},
        "cold_start": {"baseline": 1.7, "ssmtl": 1.6, "adamic_adar": 3.5, "heldout_friends": 4.1},
    }
    source = _write(tmp_path / "e.json", [0], "2026-01-01", recorded, _entry("g/F", 0.2, 0.1))
    text = markdown(load_results([source]))
    assert "| g/E | cold_start | 4.10 | 1.70 | 1.60 | n/a | n/a | 3.50 |" in text
    assert "| g/F | all |" not in text  # measured before the column existed: left out


def test_auxiliary_weights_are_chosen_on_validation_and_judged_on_test(tmp_path: Path):
    entry = _entry("g/G", 0.20, 0.10, objectives=("baseline", "ssmtl", "cca", "mae"))
    # masked reconstruction: best on validation, +6 % all and +10 % cold-start on test
    entry["results"]["mae"] = _slices(0.212, 0.11)
    entry["comparisons"] += [
        {"a": "mae", "b": "baseline", "metric": "recall@50", "slice": s, "diff": d,
         "lo": d - 0.005, "hi": d + 0.005}
        for s, d in (("all", 0.012), ("cold_start", 0.01))
    ]  # fmt: skip
    entry["step_ratio_vs_baseline"]["mae"] = 1.05
    entry["val_recall50"] = {
        "baseline": [0.30, 0.32],
        "ssmtl": [0.33, 0.29],  # 0.31
        "cca": [0.28, 0.30],  # 0.29
        "mae": [0.32, 0.31],  # 0.315: chosen, although a single seed of SSMTL is higher
    }
    no_choice = _entry("g/H", 0.21, 0.10)
    no_choice["val_recall50"] = {"baseline": [0.3], "ssmtl": [0.31]}
    two = _entry("g/I", 0.21, 0.10, objectives=("baseline", "ssmtl", "cca"))
    two["val_recall50"] = {"baseline": [0.3], "ssmtl": [0.31], "cca": [0.32]}
    source = _write(tmp_path / "g.json", [0, 1], "2026-01-01", entry, no_choice, two)
    results = {r.dataset: r for r in load_results([source])}
    assert chosen_on_validation(results["g/G"]) == "mae"
    assert chosen_on_validation(results["g/H"]) is None  # SSMTL alone: nothing to choose from
    assert chosen_on_validation(results["g/I"]) == "cca"  # of the two run
    assert verdicts(results["g/G"], "mae") == {
        "gain_all": True,  # +6 %
        "gain_cold_start": True,  # +10 %
        "above_adamic_adar": False,  # 0.212 < 0.25
        "step_ratio": True,
    }
    text = markdown(list(results.values()))
    assert (
        "| g/G | 2 | 0.3100 / 0.3100 / 0.2900 / 0.3150 | retrieval + masked reconstruction |"
        " +6.0% [+3.5%, +8.5%] | +10.0% [+5.0%, +15.0%] | met | met | missed |" in text
    )
    assert "| g/H | 2 | 0.3000" not in text
    assert "| g/I | 2 | 0.3000 / 0.3100 / 0.3200 / n/a | retrieval + CCA-SSG |" in text


def test_blend_and_per_degree_tables_where_recorded(tmp_path: Path):
    recorded = _entry("g/E", 0.21, 0.10)
    recorded["results"]["blend (baseline)"] = _slices(0.30, 0.12)
    recorded["blend_gain"] = {"baseline": {"all": 0.30 / 0.25 - 1, "cold_start": 0.12 / 0.10 - 1}}
    recorded["blend_ceiling"] = {"baseline": {"all": 0.41, "cold_start": 0.2}}
    bucket = {"users": 10.0, "recall@50": 0.5}
    recorded["by_degree"] = {
        "baseline": {"0": {"users": 3.0, "recall@50": float("nan")}, ">20": bucket},
        "random": {"0": {"users": 3.0, "recall@50": 0.0}, ">20": bucket},
    }
    source = _write(tmp_path / "e.json", [0], "2026-01-01", recorded, _entry("g/F", 0.2, 0.1))
    text = markdown(load_results([source]))
    assert (
        "| g/E | baseline (retrieval only) | 0.2000 / 0.1000 | 0.2500 / 0.0500 | "
        "0.3000 / 0.1200 | +20.0% | +20.0% | 0.4100 / 0.2000 |"
    ) in text
    assert "| g/E | (users) | (3) | (10) |" in text
    assert "| g/E | baseline (retrieval only) | n/a | 0.5000 |" in text  # NaN: no such users
    assert "| g/E | random |" not in text and "| g/F | (users)" not in text


def test_the_tuned_model_is_judged_where_tune_ran(tmp_path: Path):
    """A graph run with ``--tune-minutes`` gets a row: tune's choice (without the fixed
    settings), its validation figure and trial count, and the tuned model judged on test."""
    tuned = _entry("g/T", 0.21, 0.10)
    tuned["results"]["tuned"] = _slices(0.22, 0.08)
    tuned["comparisons"] += [
        {"a": "tuned", "b": "baseline", "metric": "recall@50", "slice": s, "diff": d,
         "lo": d - 0.005, "hi": d + 0.005}
        for s, d in (("all", 0.02), ("cold_start", -0.02))
    ]  # fmt: skip
    tuned["tuned"] = {
        "best": {"objective": "ssmtl", "cca_weight": 0.05, "popularity_bias": True, "epochs": 8},
        "val_recall50": 0.4321,
        "trials": [{}, {}, {}],
    }
    source = _write(tmp_path / "t.json", [0], "2026-01-01", tuned, _entry("g/U", 0.2, 0.1))
    text = markdown(load_results([source]))
    row = next(line for line in text.splitlines() if line.startswith("| g/T | 1 | objective"))
    assert row.startswith("| g/T | 1 | objective ssmtl, cca_weight 0.05 (3) | 0.4321 | +10.0% [")
    assert "popularity_bias" not in row and row.endswith("| met | missed | missed |")
    assert not any(line.startswith("| g/U | 1 | objective") for line in text.splitlines())
