"""`friendrec bench ...`: benchmarks (commands, not tests): print a table and write JSON."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Benchmarks: print a table and write JSON.", no_args_is_help=True)


def _items(value: str) -> list[str]:
    """A comma-separated option's entries, stripped, empty ones dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


def _counts(value: str) -> list[int]:
    try:
        counts = [int(part.replace("_", "")) for part in _items(value)]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not counts:
        raise typer.BadParameter("expected at least one integer")
    return counts


def _sizes(value: str) -> list[int]:
    sizes = _counts(value)
    if min(sizes) < 2:
        raise typer.BadParameter("sizes must be integers >= 2")
    return sorted(set(sizes))


@app.command()
def features(
    sizes: str = typer.Option(
        "100000,1000000", "--sizes", help="Synthetic graph sizes (users), comma-separated."
    ),
    quick: bool = typer.Option(
        False, "--quick", "--skip-1m", help="Smoke run: 100k users only, 200 requests per read."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="JSON result (a .md with the tables is written beside it). "
        "Default: bench/results/features.json (features_quick.json with --quick).",
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Benchmark artifacts (default: <settings.workdir>/bench)."
    ),
    tuned: str = typer.Option(
        "sqlite_batch10k,redis_skip_dedup,redis_skip_dedup_batch10k",
        "--tuned",
        help="Extra Feast-setting variants to materialize besides the stock sqlite and redis "
        "ones (comma-separated; empty for none). Known: sqlite_batch10k, redis_batch10k, "
        "redis_skip_dedup, redis_skip_dedup_batch10k.",
    ),
    requests: int | None = typer.Option(
        None, "--requests", min=10, help="Timed online reads per case (default 500; 200 quick)."
    ),
    repeats: str | None = typer.Option(
        None,
        "--repeats",
        help="Materializations per variant, one count per size or one for all; the table shows "
        "their median. Default: 3 below 1M users, 1 from 1M up (1 with --quick).",
    ),
    warmup: int = typer.Option(50, "--warmup", min=1, help="Untimed reads before each case."),
    profile: bool = typer.Option(
        True, "--profile/--no-profile", help="cProfile one materialization per store."
    ),
) -> None:
    """Materialization rows/s (sqlite, Redis), graph-feature job time and online read latency
    (Feast SDK and `feast listen`) on synthetic graphs; prints tables and writes JSON."""
    from bench.features import BenchConfig, default_output, print_tables, run
    from friendrec.config import load_settings

    settings = load_settings()
    size_list = [100_000] if quick else _sizes(sizes)
    if repeats is not None:
        repeat_list = _counts(repeats)
    else:
        repeat_list = [1 if quick or size >= 1_000_000 else 3 for size in size_list]
    try:
        config = BenchConfig(
            sizes=size_list,
            repeats=repeat_list,
            workdir=(workdir or settings.workdir / "bench").resolve(),
            output=(output or default_output(quick)).resolve(),
            tuned=_items(tuned),
            requests=requests or (200 if quick else 500),
            warmup=warmup,
            profile=profile,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    print_tables(run(config, settings))


@app.command()
def quality(
    datasets: str = typer.Option(
        "all",
        "--datasets",
        help="Comma-separated datasets (twitch/ENGB,github,...) or 'all' (every graph).",
    ),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Training seeds, comma-separated."),
    objectives: str = typer.Option(
        "baseline,ssmtl,cca,mae", "--objectives", help="Objectives to train and compare."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Max epochs (default: settings)."),
    tune_minutes: float = typer.Option(
        0.0,
        "--tune-minutes",
        min=0,
        help="Also run `friendrec tune` per graph within this budget (validation edges) and "
        "report the tuned model beside the fixed defaults (0: off).",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="> 1: also train the single-task model with this many data-parallel processes "
        "(`train --workers`) and compare it with the one-process model.",
    ),
    blend_without_reads: bool = typer.Option(
        False,
        "--blend-without-reads",
        help="Also fit and score each model's blend without the Milvus read of the friends of "
        "friends' vectors (serving.blend_reads_vectors false): what that latency saving costs.",
    ),
    output: Path = typer.Option(
        Path("bench/results/quality.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """Baseline vs SSMTL and its ablations on every graph: test Recall@50/100 for all and
    cold-start users with paired-bootstrap CIs, Adamic-Adar, the service's friends-of-friends
    source, each model's blend with it (weights chosen on validation edges), random, Recall@50
    per training-degree bucket, and the training step-time ratio. Long: minutes per run;
    hyper-parameters come from the settings (tuned on validation edges only)."""
    from bench.quality import OBJECTIVES, run_quality
    from friendrec.config import load_settings

    chosen = _items(objectives)
    unknown = set(chosen) - set(OBJECTIVES)
    if unknown or "baseline" not in chosen:
        raise typer.BadParameter(f"objectives must include baseline and be among {OBJECTIVES}")
    names = None if datasets == "all" else _items(datasets)
    run_quality(
        load_settings(),
        names,
        _counts(seeds),
        chosen,
        epochs,
        output,
        tune_minutes * 60,
        workers,
        blend_without_reads,
    )


@app.command()
def serving(
    datasets: str = typer.Option(
        "synthetic:100000,github", "--datasets", help="Comma-separated datasets to serve."
    ),
    requests: int = typer.Option(1000, "--requests", min=10, help="Timed single requests."),
    concurrency: int = typer.Option(8, "--concurrency", min=1, help="Threads for the QPS run."),
    duration: float = typer.Option(15.0, "--duration", min=1, help="Seconds of the QPS run."),
    k: int = typer.Option(50, "-k", min=1, help="Candidates per request (and recall@k)."),
    train_steps: int = typer.Option(
        200, "--train-steps", min=1, help="Steps of the quick SSMTL training when no model exists."
    ),
    standalone: bool = typer.Option(
        True,
        "--standalone/--lite-only",
        help="Also measure a real Milvus standalone server (PyPI `milvus`) on the same vectors.",
    ),
    output: Path = typer.Option(
        Path("bench/results/serving.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """The retrieval service end to end (Feast sqlite -> our TF Serving -> milvus-lite server)
    per dataset: p50/p99 per request and per stage, QPS at concurrency 8, ANN recall@k against
    exact search, and the Milvus-search and numpy exact-top-k floors. Prints a table and JSON."""
    from bench.serving import ServingBenchConfig, run
    from friendrec.config import load_settings

    names = tuple(_items(datasets))
    cfg = ServingBenchConfig(
        datasets=names,
        requests=requests,
        concurrency=concurrency,
        duration_s=duration,
        k=k,
        train_steps=train_steps,
        standalone=standalone,
    )
    run(load_settings(), cfg, output)


@app.command()
def streaming(
    dataset: str = typer.Option("twitch/ENGB", "--dataset", help="Prepared dataset to stream."),
    events: int = typer.Option(
        10_000, "--events", min=100, help="Friendships in the full-speed throughput phase."
    ),
    rates: str = typer.Option(
        "500,100,50,25", "--rates", help="Friendships/s of the freshness runs, comma-separated."
    ),
    duration: float = typer.Option(
        20.0, "--duration", min=1, help="Seconds of each freshness run."
    ),
    partitions: int = typer.Option(4, "--partitions", min=1, help="Partitions per topic."),
    members: int = typer.Option(
        1, "--members", min=1, help="Processes per worker (members of its consumer group)."
    ),
    dependents: bool = typer.Option(
        True,
        "--dependents/--no-dependents",
        help="Refresh the users whose sampled friends changed too (exact 2-layer embeddings).",
    ),
    train_steps: int = typer.Option(
        200, "--train-steps", min=1, help="Steps of the quick SSMTL training when no model exists."
    ),
    output: Path = typer.Option(
        Path("bench/results/streaming.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """The streaming chain with one process per worker (Tansu, Feast sqlite, our TF Serving,
    milvus-lite server): sustained friendships/s end to end (every effect in Milvus), each
    worker's CPU share, and freshness p50/p99 at a fixed event rate. Prints a table and JSON."""
    from bench.streaming import StreamingBenchConfig, run
    from friendrec.config import load_settings

    cfg = StreamingBenchConfig(
        dataset=dataset,
        events=events,
        rates=tuple(float(r) for r in _items(rates)),
        duration_s=duration,
        partitions=partitions,
        train_steps=train_steps,
        dependents=dependents,
        members=members,
    )
    run(load_settings(), cfg, output)


@app.command("blend-learning")
def blend_learning(
    datasets: str = typer.Option(
        "twitch/TW,twitch/PTBR,twitch/ES", "--datasets", help="Comma-separated graphs."
    ),
    seed: int = typer.Option(0, "--seed", help="Training seed of the single-task run."),
    epochs: int = typer.Option(8, "--epochs", help="Max epochs of the single-task run."),
    output: Path = typer.Option(
        Path("bench/results/blend_learning.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """Whether the blend's ranker is short of validation users: its out-of-sample Recall@50
    fitted on a half and a quarter of them, and the shipped default's, per graph (validation
    edges; the `bench quality` runs, trained if missing)."""
    from bench.blend_learning import run
    from friendrec.config import load_settings

    run(load_settings(), _items(datasets), seed, epochs, output)


@app.command()
def popularity(
    dataset: str = typer.Option("twitch/ENGB", "--dataset", help="Graph to measure."),
    seed: int = typer.Option(0, "--seed", help="Training seed."),
    epochs: int = typer.Option(8, "--epochs", help="Max epochs of the two single-task runs."),
    output: Path = typer.Option(
        Path("bench/results/popularity.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """How much popularity the ranking needs, on validation edges: a model without the
    popularity term with a fixed term added after training (a grid), and the learned term with
    its query scale varied, beside Adamic-Adar. Reuses `bench quality`'s runs."""
    from bench.popularity import run
    from friendrec.config import load_settings

    run(load_settings(), dataset, seed, epochs, output)


@app.command()
def views(
    datasets: str = typer.Option(
        "twitch/ENGB", "--datasets", "--dataset", help="Graphs to probe, comma-separated."
    ),
    objectives: str = typer.Option(
        "baseline,ssmtl", "--objectives", help="Models to compare, comma-separated."
    ),
    seeds: str = typer.Option("0", "--seeds", help="Training seeds, comma-separated."),
    epochs: int = typer.Option(8, "--epochs", help="Max epochs of each run."),
    output: Path = typer.Option(
        Path("bench/results/views.json"), "--output", "-o", help="JSON result (PNGs beside)."
    ),
) -> None:
    """What the auxiliary losses changed in the tower, per training-degree bucket, on validation
    queries: the agreement of two CCA-SSG views of a user, the served embedding's stability
    under them (cosine, Recall@50 and top-50 overlap of the view's query), its reliance on the
    user-id vector, its own sparse features and its friends, and the index's effective
    dimension. Reuses `bench quality`'s runs (trains the missing ones). Tables, JSON, a PNG per
    graph."""
    from bench.quality import OBJECTIVES
    from bench.views import run
    from friendrec.config import load_settings

    chosen = _items(objectives)
    if not chosen or set(chosen) - set(OBJECTIVES):
        raise typer.BadParameter(f"objectives must be among {OBJECTIVES}, got {objectives!r}")
    run(load_settings(), _items(datasets), chosen, _counts(seeds), epochs, output)


@app.command("tune-gate")
def tune_gate(
    sources: str = typer.Option(
        "bench/results/quality_tuned.json",
        "--sources",
        help="`bench quality --tune-minutes` JSON files, comma-separated.",
    ),
    output: Path = typer.Option(
        Path("bench/results/tune_gate.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """`tune --require-significance` (a trial replaces the defaults only where its validation
    gain has a 95 % CI above 0) replayed on the trials `bench quality --tune-minutes` recorded,
    from its cached runs: which trial the rule keeps per graph, and the test figures of both
    choices from the source. Nothing trains."""
    from bench.tune_gate import run
    from friendrec.config import load_settings

    run(load_settings(), [Path(s) for s in _items(sources)], output)


@app.command()
def prepare(
    users: str = typer.Option(
        "100000,1000000", "--users", help="Graph sizes (users), comma-separated."
    ),
    output: Path = typer.Option(
        Path("bench/results/prepare.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """`data prepare` of a team's own graph given as parquet (string ids, a string categorical,
    a list of string tags), in a fresh process per size: wall time, peak memory and seconds per
    million users. Prints a table and writes JSON."""
    from bench.prepare import run
    from friendrec.config import load_settings

    run(load_settings(), _sizes(users), output)


@app.command()
def scale(
    sizes: str = typer.Option(
        "1000000,5000000", "--sizes", help="Synthetic graph sizes (users), comma-separated."
    ),
    engines: str = typer.Option("local,ray", "--engines", help="Engines to compare."),
    train_steps: int = typer.Option(200, "--train-steps", min=1, help="Cap of the one epoch."),
    train_workers: int = typer.Option(
        2, "--train-workers", min=1, help="Training processes in the distributed column."
    ),
    stages: str = typer.Option(
        "all",
        "--stages",
        help="Stages to run, comma-separated (features_build, materialize_feast, materialize, "
        "train, export, index_build, serving; prepare always runs) or 'all' (every stage but "
        "materialize_feast: Feast's stock local engine into the same empty sqlite store, the "
        "baseline of the materialization ratio, ~11 GB per million users). A stage's "
        "dependents need it; with --reuse, serving alone measures the index an earlier run "
        "built.",
    ),
    previous: list[Path] = typer.Option(
        [],
        "--previous",
        help="Earlier `bench scale` JSON: its sizes join the table and the fit (a stage measured "
        "again here replaces its figure).",
    ),
    reuse: bool = typer.Option(
        False,
        "--reuse",
        help="Run only --stages, in each size's workdir from an earlier run (no prepare): a "
        "long size measured in pieces.",
    ),
    milvus: str = typer.Option(
        "lite",
        "--milvus",
        help="Vector database of the index build and serving stages: 'lite' (milvus-lite "
        "server, the embedded default) or 'standalone' (a real Milvus 2.3 server, the `milvus` "
        "package; what serves past a million users).",
    ),
    output: Path = typer.Option(
        Path("bench/results/scale.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """The batch pipeline on synthetic graphs (~20 friendships per user), local engine against
    Ray, each stage in its own process: prepare, features build, materialize, train one capped
    epoch, export, index build, then the service's p50/p99. Time and peak memory per stage,
    seconds per million users, and a linear model fitted to the sizes. Long: ~30-60 min per
    million users on 2 cores."""
    from bench.scale import DEFAULT_STAGES, STAGES, ScaleBenchConfig, run
    from friendrec.config import load_settings

    chosen = DEFAULT_STAGES if stages == "all" else tuple(x.strip() for x in stages.split(","))
    if not set(chosen) <= set(STAGES):
        raise typer.BadParameter(f"unknown stages {sorted(set(chosen) - set(STAGES))}")
    names = tuple(_items(engines))
    if not set(names) <= {"local", "ray"} or not names:
        raise typer.BadParameter(f"engines are 'local' and/or 'ray', got {engines!r}")
    if milvus not in ("lite", "standalone"):
        raise typer.BadParameter(f"--milvus is 'lite' or 'standalone', got {milvus!r}")
    cfg = ScaleBenchConfig(
        sizes=tuple(_sizes(sizes)),
        train_steps=train_steps,
        train_workers=train_workers,
        engines=names,
        stages=tuple(chosen),
        reuse=reuse,
        milvus=milvus,
    )
    run(load_settings(), cfg, output, previous)


@app.command("quality-summary")
def quality_summary(
    results: list[Path] = typer.Argument(
        None, help="`bench quality` JSON files (default: bench/results/quality*.json)."
    ),
    markdown: Path = typer.Option(
        Path("docs/quality_summary.md"), "--markdown", help="Markdown tables to write."
    ),
    plot: Path = typer.Option(
        Path("docs/img/quality_forest.png"), "--plot", help="Forest plot (PNG) to write."
    ),
) -> None:
    """Merge `bench quality` results (run a few graphs at a time) into one table and a forest
    plot of SSMTL and its ablations vs the baseline, with the issue's targets marked."""
    from bench.quality_summary import summarise

    paths = results or sorted(Path("bench/results").glob("quality*.json"))
    try:
        summarise(paths, markdown, plot)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("train-speed")
def train_speed(
    dataset: str = typer.Option("twitch/ENGB", "--dataset", help="Prepared graph to train on."),
    objective: str | None = typer.Option(
        None, "--objective", help="baseline, ssmtl, cca or mae (default: the settings')."
    ),
    batches: int = typer.Option(20, "--batches", min=2, help="Batches per measurement."),
    repeats: int = typer.Option(3, "--repeats", min=1, help="Interleaved rounds."),
    processes: bool = typer.Option(
        True,
        "--processes/--no-processes",
        help="Also the loop in fresh processes: op-thread settings, XLA auto-clustering.",
    ),
    profile: bool = typer.Option(False, "--profile", help="Top TensorFlow ops of each step."),
    output: Path = typer.Option(
        Path("bench/results/train_speed.json"), "--output", "-o", help="JSON result."
    ),
) -> None:
    """One training process: examples/s of the input generator alone, the step alone (per
    occurrence vs shared friend states), the step's parts, both together, and the levers
    (threads, XLA), interleaved rounds and ratios measured in the same round. Needs the dataset
    prepared and its features built and applied."""
    from bench.train_speed import DEFAULT_PROCESSES, TrainSpeedConfig, run
    from friendrec.config import load_settings

    if objective is not None and objective not in ("baseline", "ssmtl", "cca", "mae"):
        raise typer.BadParameter(f"unknown objective {objective!r}")
    cfg = TrainSpeedConfig(
        dataset=dataset,
        objective=objective,
        batches=batches,
        repeats=repeats,
        processes=DEFAULT_PROCESSES if processes else (),
        profile=profile,
    )
    run(load_settings(), cfg, output)
