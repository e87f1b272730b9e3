"""`friendrec train | evaluate | export`: the SSMTL model's life cycle."""

from __future__ import annotations

import json

import typer

DATASET = typer.Option(None, "--dataset", "-d", help="Dataset (default: data.dataset).")


def _training_settings(objective: str | None, epochs: int | None, max_steps: int | None, seed):
    from friendrec.config import load_settings

    settings = load_settings()
    updates = {
        k: v
        for k, v in {
            "objective": objective,
            "epochs": epochs,
            "max_steps_per_epoch": max_steps,
            "seed": seed,
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
    ) -> None:
        """Train the user tower: in-batch retrieval loss (+ CCA-SSG, + masked reconstruction).
        Checkpoints every epoch, resumes an interrupted run, stops early on validation
        Recall@50 and keeps the best weights."""
        from training.train import TrainingContext
        from training.train import train as run

        settings = _training_settings(objective, epochs, max_steps, seed)
        ctx = TrainingContext.load(settings, dataset)
        result, _ = run(ctx)
        typer.echo(json.dumps(result.as_dict(), indent=2))

