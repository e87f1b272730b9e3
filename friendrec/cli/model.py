"""`friendrec train | evaluate | export`: the SSMTL model's life cycle."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DATASET = typer.Option(None, "--dataset", "-d", help="Dataset (default: data.dataset).")


def _training_settings(
    objective: str | None,
    epochs: int | None,
    max_steps: int | None,
    seed: int | None,
    workers: int | None = None,
):
    from friendrec.config import load_settings

    settings = load_settings()
    updates = {
        k: v
        for k, v in {
            "objective": objective,
            "epochs": epochs,
            "max_steps_per_epoch": max_steps,
            "seed": seed,
            "workers": workers,
        }.items()
        if v is not None
    }
    training = settings.training.model_validate({**settings.training.model_dump(), **updates})
    return settings.model_copy(update={"training": training})


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        objective: str = typer.Option(
            None, "--objective", "-o", help="baseline | ssmtl | cca | mae (default: settings)."
        ),
        dataset: str = DATASET,
        epochs: int = typer.Option(None, help="Maximum epochs (early stopping may end sooner)."),
        max_steps: int = typer.Option(None, "--max-steps", help="Cap steps per epoch."),
        seed: int = typer.Option(None, help="Seed of initialisation, sampling, augmentation."),
        workers: int = typer.Option(
            None,
            "--workers",
            min=1,
            help="Data-parallel worker processes (default: training.workers; 1: in-process). "
            "Global batch = workers x batch_size: a different model (docs/model.md).",
        ),
        join: bool = typer.Option(
            False,
            "--join",
            help="Be one worker of a group on several machines: TF_CONFIG, or "
            "TRAIN_GROUP_PEERS and JOB_COMPLETION_INDEX (infra/k8s/jobs/train-group.yaml).",
        ),
    ) -> None:
        """Train the user tower: in-batch retrieval loss (+ CCA-SSG, + masked reconstruction).
        Checkpoints every epoch, resumes an interrupted run, stops early on validation
        Recall@50 and keeps the best weights. With --workers N > 1: N processes under
        MultiWorkerMirroredStrategy on loopback, relaunched from the last checkpoint when one
        dies (training.max_restarts). With --join: one worker of a group across machines."""
        settings = _training_settings(objective, epochs, max_steps, seed, workers)
        if join:
            from training.distributed import join_group

            result = join_group(settings, dataset)
        elif settings.training.workers > 1:
            from training.distributed import train_distributed

            result = train_distributed(settings, dataset).result
        else:
            from training.train import TrainingContext
            from training.train import train as run

            ctx = TrainingContext.load(settings, dataset)
            result, _ = run(ctx)
        typer.echo(json.dumps(result.as_dict(), indent=2))

    @app.command()
    def evaluate(
        dataset: str = DATASET,
        objective: list[str] = typer.Option(
            ["baseline", "ssmtl"], "--objective", "-o", help="Runs to compare (latest of each)."
        ),
        seed: int = typer.Option(None, help="Only runs of this seed."),
        split: str = typer.Option("test", help="test (report) or val (tuning)."),
        json_path: Path = typer.Option(None, "--json", help="Also write the results here."),
    ) -> None:
        """Exact top-K over all users (the user and its training friends excluded) for the latest
        run of each objective, plus Adamic-Adar and random; Recall/HitRate@10/50/100, NDCG@50,
        MRR for all and cold-start users; paired bootstrap CIs against the baseline. Writes JSON,
        a markdown table and a Recall@K plot."""
        from friendrec.config import load_settings
        from training.runs import evaluate_runs, latest_run
        from training.train import TrainingContext

        ctx = TrainingContext.load(load_settings(), dataset)
        runs = {name: latest_run(ctx, name, seed) for name in objective}
        out_dir = ctx.settings.workdir / "reports" / ctx.paths.slug / split
        report = evaluate_runs(ctx, runs, out_dir, split=split)
        for name, run_dir in runs.items():
            (run_dir / f"evaluation_{split}.json").write_text(
                json.dumps(report["results"][name], indent=2)
            )
        if json_path:
            json_path.write_text(json.dumps(report, indent=2))
        typer.echo(Path(report["files"]["markdown"]).read_text())

    @app.command()
    def export(
        dataset: str = DATASET,
        objective: str = typer.Option("ssmtl", "--objective", "-o", help="Latest run of this."),
        run: Path = typer.Option(None, "--run", help="A run folder instead of the latest."),
        version: int = typer.Option(None, help="Version number (default: next free)."),
    ) -> None:
        """Export the user tower as a TF Serving SavedModel (<base>/<model_name>/<version>/)
        with a raw-feature serving signature, warmup requests and a model card."""
        from friendrec.config import load_settings
        from training.publish import export_run
        from training.train import TrainingContext

        ctx = TrainingContext.load(load_settings(), dataset)
        path = export_run(ctx, run, objective, version)
        typer.echo(str(path))

    @app.command()
    def tune(
        dataset: str = DATASET,
        budget_minutes: float = typer.Option(
            60.0, "--budget-minutes", min=1, help="No trial starts past this (average trial)."
        ),
        epochs: int = typer.Option(None, help="Maximum epochs per trial (default: settings)."),
        output: Path = typer.Option(
            None, "--output", "-o", help="Settings YAML (default: <workdir>/tuned/<dataset>.yaml)."
        ),
        require_significance: bool = typer.Option(
            False,
            "--require-significance",
            help="Replace the defaults only with a trial whose validation gain over them has a "
            "95 % CI above 0 (conservative: with 1-4k validation users it kept the defaults on all "
            "six Twitch graphs).",
        ),
    ) -> None:
        """Choose the auxiliary-loss weights, temperature and width, then the friends-of-friends
        blend, for this graph on validation edges: a bounded search within a time budget, each
        trial's gain over the defaults with its 95 % CI. Writes a settings YAML (`friendrec
        --config FILE train`, `friendrec --config FILE up`) and the table of every trial beside
        it (.md, .json)."""
        from friendrec.config import load_settings
        from friendrec.paths import DatasetPaths
        from training.train import TrainingContext
        from training.tune import tune as run_tune
        from training.tune import write_outputs

        settings = load_settings()
        ctx = TrainingContext.load(settings, dataset)
        target = (
            output or settings.workdir / "tuned" / f"{DatasetPaths.of(settings, dataset).slug}.yaml"
        )
        result = run_tune(
            ctx, budget_minutes * 60, epochs, require_significance=require_significance
        )
        paths = write_outputs(result, target)
        typer.echo(paths["table"].read_text())
        typer.echo(f"settings: {paths['settings']}")
