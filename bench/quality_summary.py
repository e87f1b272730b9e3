"""`friendrec bench quality-summary`: one table and one plot over every `bench quality` result.

`bench quality` runs take hours per graph on a small machine, so they are run a few graphs at a
time, each writing its own JSON. This merges them: per graph it keeps the result with the most
seeds, then the most objectives, then the newest; it prints and writes a markdown table (the
numbers in docs/quality.md come from it; one table holds, per graph, the auxiliary weights chosen
on validation edges) and a forest plot of SSMTL and its ablations minus the
baseline (relative Recall@50 with the paired-bootstrap 95 % CI), the issue's targets drawn in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from friendrec.config import TrainingSettings

log = logging.getLogger(__name__)
SLICES = {"all": "all users", "cold_start": "cold-start users (training degree <= 2)"}
METHODS = ("ssmtl", "cca", "mae")
LABELS = {
    "baseline": "baseline (retrieval only)",
    "ssmtl": "SSMTL (retrieval + CCA-SSG + masked reconstruction)",
    "cca": "retrieval + CCA-SSG",
    "mae": "retrieval + masked reconstruction",
    "adamic_adar": "Adamic-Adar",
    "random": "random",
    "tuned": "the model friendrec tune chose on validation edges",
}


@dataclass(frozen=True)
class GraphResult:
    """One graph's entry of a `bench quality` JSON, with where it came from."""

    source: Path
    created_at: str
    seeds: tuple[int, ...]
    targets: dict[str, Any]
    entry: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)  # the run's settings, as recorded

    @property
    def dataset(self) -> str:
        return self.entry["dataset"]

    @property
    def objectives(self) -> list[str]:
        return list(self.entry["seed_recall50"])

    def rank(self) -> tuple[int, int, str]:
        return (len(self.seeds), len(self.objectives), self.created_at)

    def comparison(self, method: str, slice_name: str) -> dict[str, float] | None:
        """``method`` minus baseline at Recall@50 on a slice, relative to the baseline too."""
        for c in self.entry["comparisons"]:
            if (c["a"], c["metric"], c["slice"]) == (method, "recall@50", slice_name):
                base = self.entry["results"]["baseline"][slice_name]["recall@50"]
                scale = 1.0 / base if base else float("nan")
                return {**c, "rel": c["diff"] * scale, "rel_lo": c["lo"] * scale,
                        "rel_hi": c["hi"] * scale}  # fmt: skip
        return None


def load_results(paths: list[Path]) -> list[GraphResult]:
    """The best result per graph over the given files (see module docstring), in file order."""
    best: dict[str, GraphResult] = {}
    for path in paths:
        try:
            payload = json.loads(path.read_text())
            entries = payload["datasets"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a `friendrec bench quality` result ({exc})") from None
        for entry in entries:
            result = GraphResult(
                source=path,
                created_at=payload.get("created_at", ""),
                seeds=tuple(payload.get("seeds", ())),
                targets=payload.get("targets", {}),
                entry=entry,
                training=payload.get("training", {}),
            )
            held = best.get(result.dataset)
            if held is None or result.rank() > held.rank():
                best[result.dataset] = result
    if not best:
        raise ValueError("no quality results in the given files")
    return list(best.values())


def chosen_on_validation(result: GraphResult) -> str | None:
    """The per-graph auxiliary weights picked on validation edges only: of SSMTL and its
    ablations run (a grid over (w_cca, w_mae): each objective's weights, from
    ``LossConfig.for_objective``), the one with the best validation Recall@50 averaged over seeds.
    None unless at least two were run."""
    val = result.entry.get("val_recall50", {})
    run = [m for m in METHODS if val.get(m)]
    if len(run) < 2:
        return None
    return max(run, key=lambda m: float(np.mean(val[m])))


def verdicts(result: GraphResult, method: str = "ssmtl") -> dict[str, bool | None]:
    """The issue's four targets for one graph and method (None: not measurable here)."""
    gains = result.targets.get("relative_recall50_gain", {"all": 0.05, "cold_start": 0.02})
    out: dict[str, bool | None] = {}
    for slice_name in SLICES:
        c = result.comparison(method, slice_name)
        out[f"gain_{slice_name}"] = None if c is None else c["rel"] >= gains[slice_name]
    res = result.entry["results"]
    out["above_adamic_adar"] = (
        res[method]["all"]["recall@50"] > res["adamic_adar"]["all"]["recall@50"]
        if method in res
        else None
    )
    ratio = result.entry["step_ratio_vs_baseline"].get(method)
    out["step_ratio"] = (
        None if ratio is None else ratio <= result.targets.get("max_step_ratio", 1.5)
    )
    return out


def _cell(c: dict[str, float] | None) -> str:
    if c is None:
        return "n/a"
    return f"{c['rel']:+.1%} [{c['rel_lo']:+.1%}, {c['rel_hi']:+.1%}]"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "missed")


def _gain_mark(result: GraphResult, ok: bool | None, slice_name: str, method: str) -> str:
    """A gain target met by the point estimate alone says so: its CI still reaches 0."""
    c = result.comparison(method, slice_name)
    if ok and c is not None and c["rel_lo"] <= 0:
        return "met (CI includes 0)"
    return _mark(ok)


def verdict_marks(result: GraphResult, method: str = "ssmtl") -> list[str]:
    """The four targets' table cells for one method: +5 % all, +2 % cold-start, above
    Adamic-Adar, step time."""
    v = verdicts(result, method)
    return [
        _gain_mark(result, v["gain_all"], "all", method),
        _gain_mark(result, v["gain_cold_start"], "cold_start", method),
        _mark(v["above_adamic_adar"]),
        _mark(v["step_ratio"]),
    ]


def markdown(results: list[GraphResult]) -> str:
    """The summary tables in markdown (per graph; then the ablations where they were run)."""
    lines = [
        "| graph | users | test users (cold) | seeds | baseline R@50 | SSMTL R@50 | Adamic-Adar "
        "R@50 | SSMTL vs baseline, R@50 all [95 % CI] | cold-start [95 % CI] | step x |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        e, res = r.entry, r.entry["results"]
        ssmtl = res.get("ssmtl", {}).get("all", {}).get("recall@50")
        ratio = e["step_ratio_vs_baseline"].get("ssmtl")
        lines.append(
            f"| {r.dataset} | {e['users']:,} | {e['test_queries']:,} ({e['cold_start_queries']:,})"
            f" | {len(r.seeds)} | {res['baseline']['all']['recall@50']:.4f} | "
            f"{'n/a' if ssmtl is None else f'{ssmtl:.4f}'} | "
            f"{res['adamic_adar']['all']['recall@50']:.4f} | {_cell(r.comparison('ssmtl', 'all'))}"
            f" | {_cell(r.comparison('ssmtl', 'cold_start'))} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}'} |"
        )
    lines += [
        "",
        "| graph | +5 % R@50, all | +2 % R@50, cold-start | above Adamic-Adar | step <= 1.5x |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.dataset} | " + " | ".join(verdict_marks(r)) + " |")
    ablated = [r for r in results if {"cca", "mae"} & set(r.objectives)]
    if ablated:
        lines += [
            "",
            "| graph | seeds | method | R@50 all vs baseline [95 % CI] | cold-start [95 % CI] |"
            " step x |",
            "|---|---:|---|---|---|---:|",
        ]
        for r in ablated:
            for m in (m for m in METHODS if m in r.objectives):
                ratio = r.entry["step_ratio_vs_baseline"].get(m)
                lines.append(
                    f"| {r.dataset} | {len(r.seeds)} | {LABELS[m]} | "
                    f"{_cell(r.comparison(m, 'all'))} | {_cell(r.comparison(m, 'cold_start'))} | "
                    f"{'n/a' if ratio is None else f'{ratio:.2f}'} |"
                )
    lines += _chosen_table(results)
    lines += _tuned_table(results)
    lines += _blend_table(results)
    lines += _degree_table(results)
    lines += _popularity_table(results)
    lines += ["", "Sources: " + ", ".join(sorted({f"`{r.source}`" for r in results}))]
    lines += _settings_lines(results)
    return "\n".join(lines) + "\n"


# Recorded per run rather than per source: what a row's seeds and objectives already say.
PER_RUN = {"objective", "seed", "epochs", "patience", "max_restarts"}


def _settings_lines(results: list[GraphResult]) -> list[str]:
    """Per source, the recorded training settings that differ from today's defaults: a table
    made before a default moved says which models it measured."""
    defaults = TrainingSettings().model_dump()
    lines = []
    for source in sorted({r.source for r in results}):
        recorded = next(r.training for r in results if r.source == source)
        changed = [
            f"{k} {v}"
            for k, v in sorted(recorded.items())
            if k in defaults and k not in PER_RUN and v != defaults[k]
        ]
        if changed:
            lines.append(f"- `{source}`: " + ", ".join(changed))
    if lines:
        lines = [
            "",
            "Settings other than today's defaults (`friendrec.config.TrainingSettings`):",
            *lines,
        ]
    return lines


def _chosen_table(results: list[GraphResult]) -> list[str]:
    """Per graph, the auxiliary weights chosen on validation and the targets judged on them."""
    chosen = [(r, m) for r in results if (m := chosen_on_validation(r))]
    if not chosen:
        return []
    lines = [
        "",
        "Auxiliary weights chosen per graph on validation edges (best mean validation Recall@50"
        " of SSMTL and the ablations run), judged on test edges:",
        "",
        "| graph | seeds | validation R@50: baseline / SSMTL / +CCA-SSG / +masked | chosen |"
        " R@50 all vs baseline [95 % CI] | cold-start [95 % CI] | +5 % all | +2 % cold-start |"
        " above Adamic-Adar |",
        "|---|---:|---|---|---|---|---|---|---|",
    ]
    for r, m in chosen:
        val = r.entry["val_recall50"]
        cells = [
            str(len(r.seeds)),
            " / ".join(
                f"{np.mean(val[o]):.4f}" if val.get(o) else "n/a" for o in ("baseline", *METHODS)
            ),
            LABELS[m],
            _cell(r.comparison(m, "all")),
            _cell(r.comparison(m, "cold_start")),
            *verdict_marks(r, m)[:3],  # the step-time target is judged on SSMTL above
        ]
        lines.append(f"| {r.dataset} | " + " | ".join(cells) + " |")
    return lines


def _tuned_table(results: list[GraphResult]) -> list[str]:
    """Per graph, what `friendrec tune` chose on validation edges (``bench quality
    --tune-minutes``), trained with every seed and judged on test edges."""
    tuned = [r for r in results if r.entry.get("tuned") and "tuned" in r.entry["results"]]
    if not tuned:
        return []
    lines = [
        "",
        "`friendrec tune` per graph (a bounded search on validation edges: the auxiliary weights,"
        " then, around the best, the auxiliary losses on uniformly drawn users, the paper's "
        "feature masking in CCA-SSG's views, temperature, embedding and id widths, mixed "
        "negatives and the log-Q strength), its choice trained with every seed and judged on "
        "test edges:",
        "",
        "| graph | seeds | chosen (trials) | validation R@50 | R@50 all vs baseline [95 % CI] |"
        " cold-start [95 % CI] | +5 % all | +2 % cold-start | above Adamic-Adar |",
        "|---|---:|---|---:|---|---|---|---|---|",
    ]
    for r in tuned:
        info = r.entry["tuned"]
        shown = {k: v for k, v in info["best"].items() if k not in ("popularity_bias", "epochs")}
        choice = ", ".join(f"{k} {v}" for k, v in shown.items())
        cells = [
            str(len(r.seeds)),
            f"{choice} ({len(info.get('trials', []))})",
            f"{info['val_recall50']:.4f}",
            _cell(r.comparison("tuned", "all")),
            _cell(r.comparison("tuned", "cold_start")),
            *verdict_marks(r, "tuned")[:3],
        ]
        lines.append(f"| {r.dataset} | " + " | ".join(cells) + " |")
    return lines


def _blend_table(results: list[GraphResult]) -> list[str]:
    """Per graph and learned model: the friends-of-friends blend against its two sources."""
    measured = [r for r in results if r.entry.get("blend_gain")]
    if not measured:
        return []
    lines = [
        "",
        "The service's blend of embedding retrieval and friends-of-friends (its ranker fitted per "
        "model on validation edges), test Recall@50; gain over the better of its two sources; "
        "the share of held-out friends in either list the blend merges (its ceiling at any k):",
        "",
        "| graph | model | model R@50 all / cold | Adamic-Adar all / cold | blend all / cold |"
        " blend gain, all | blend gain, cold-start | both lists' recall all / cold |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for r in measured:
        res = r.entry["results"]
        aa = res["adamic_adar"]
        ceilings = r.entry.get("blend_ceiling", {})
        for objective, gain in r.entry["blend_gain"].items():
            ceiling = ceilings.get(objective)
            model, blended = res[objective], res[f"blend ({objective})"]
            cells = [
                LABELS.get(objective, objective),
                f"{model['all']['recall@50']:.4f} / {model['cold_start']['recall@50']:.4f}",
                f"{aa['all']['recall@50']:.4f} / {aa['cold_start']['recall@50']:.4f}",
                f"{blended['all']['recall@50']:.4f} / {blended['cold_start']['recall@50']:.4f}",
                f"{gain['all']:+.1%}",
                f"{gain['cold_start']:+.1%}",
                f"{ceiling['all']:.4f} / {ceiling['cold_start']:.4f}" if ceiling else "n/a",
            ]
            lines.append(f"| {r.dataset} | " + " | ".join(cells) + " |")
    return lines


def _degree_table(results: list[GraphResult]) -> list[str]:
    """Test Recall@50 per training-degree bucket of the query user, per method."""
    measured = [r for r in results if r.entry.get("by_degree")]
    if not measured:
        return []
    buckets = list(next(iter(measured[0].entry["by_degree"].values())))
    lines = [
        "",
        "Test Recall@50 by training degree of the query user (users per bucket in brackets):",
        "",
        "| graph | method | " + " | ".join(buckets) + " |",
        "|---|---|" + "---:|" * len(buckets),
    ]
    for r in measured:
        by_degree = r.entry["by_degree"]
        first = next(iter(by_degree.values()))
        lines.append(
            f"| {r.dataset} | (users) | "
            + " | ".join(f"({int(first[b]['users']):,})" for b in buckets)
            + " |"
        )
        for method, row in by_degree.items():
            if method == "random":
                continue
            values = [row[b]["recall@50"] for b in buckets]
            cells = ["n/a" if v is None or v != v else f"{v:.4f}" for v in values]  # None, NaN
            lines.append(
                f"| {r.dataset} | {LABELS.get(method, method)} | " + " | ".join(cells) + " |"
            )
    return lines


def _popularity_table(results: list[GraphResult]) -> list[str]:
    """Mean log(1 + training degree) of what each method puts in the top 50, beside that of the
    true held-out friends, per slice (graphs measured since `bench quality` records it)."""
    measured = [r for r in results if "popularity@50" in r.entry]
    if not measured:
        return []
    methods = ("baseline", *METHODS, "adamic_adar")
    lines = [
        "",
        "Popularity of the top 50: mean log(1 + training degree) of the retrieved users, and of "
        "the held-out friends they should find.",
        "",
        "| graph | slice | held-out friends | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---|---:|" + "---:|" * len(methods),
    ]
    for r in measured:
        for slice_name, values in r.entry["popularity@50"].items():
            cells = [f"{values[m]:.2f}" if m in values else "n/a" for m in methods]
            lines.append(
                f"| {r.dataset} | {slice_name} | {values['heldout_friends']:.2f} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def plot(results: list[GraphResult], path: Path) -> None:
    """Forest plot: relative Recall@50 change vs the baseline per graph and method, with CIs."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.6 * len(results) + 2.8), sharey=True)
    gains = results[0].targets.get("relative_recall50_gain", {"all": 0.05, "cold_start": 0.02})
    offsets = {"ssmtl": 0.0, "cca": 0.22, "mae": -0.22, "tuned": 0.33}
    colours = {"ssmtl": "tab:blue", "cca": "tab:orange", "mae": "tab:green", "tuned": "tab:red"}
    for ax, (slice_name, title) in zip(axes, SLICES.items(), strict=True):
        for y, r in enumerate(results):
            for m in (*METHODS, "tuned"):  # the tuned model where `tune` ran
                c = r.comparison(m, slice_name)
                if c is None:
                    continue
                ax.errorbar(
                    100 * c["rel"],
                    y + offsets[m],
                    xerr=[[100 * (c["rel"] - c["rel_lo"])], [100 * (c["rel_hi"] - c["rel"])]],
                    fmt="o",
                    color=colours[m],
                    capsize=3,
                    label=LABELS[m],  # repeated labels are merged into one legend entry
                )
        ax.axvline(0, color="black", linewidth=1)
        ax.axvline(
            100 * gains[slice_name],
            color="red",
            linestyle="--",
            linewidth=1,
            label="target (+5 % all users, +2 % cold-start)",
        )
        ax.set_title(f"Recall@50, {title}")
        ax.set_xlabel("change vs baseline (%), paired bootstrap 95 % CI")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(
        range(len(results)),
        [f"{r.dataset} ({len(r.seeds)} seed{'s' if len(r.seeds) > 1 else ''})" for r in results],
    )
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: list[GraphResult]) -> Table:
    table = Table(title="SSMTL vs baseline, test Recall@50 (relative change, 95 % CI)")
    for column in ("graph", "seeds", "method", "all users", "cold-start", "step x"):
        table.add_column(column)
    for r in results:
        for m in METHODS:
            if m in r.objectives:
                ratio = r.entry["step_ratio_vs_baseline"].get(m)
                table.add_row(r.dataset, str(len(r.seeds)), m, _cell(r.comparison(m, "all")),
                              _cell(r.comparison(m, "cold_start")),
                              "" if ratio is None else f"{ratio:.2f}")  # fmt: skip
    return table


def summarise(paths: list[Path], markdown_path: Path, plot_path: Path) -> list[GraphResult]:
    results = load_results(paths)
    Console().print(render(results))
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(markdown(results))
    plot(results, plot_path)
    log.info("wrote %s and %s", markdown_path, plot_path)
    return results
