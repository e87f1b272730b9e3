"""Writes tiny MUSAE-format datasets (hand-checkable graphs and deliberately broken files)."""

from __future__ import annotations

import json
from pathlib import Path

TARGET_HEADER = "id,days,mature,views,partner,new_id"


def write_twitch(
    datasets_dir: Path,
    language: str,
    edges: list[tuple[int, int]] | str,
    features: dict[int, list[int]] | str,
    target: list[str] | None = None,
    num_users: int | None = None,
) -> Path:
    """Write <datasets_dir>/twitch_social/<LANG>/ files; strings are written verbatim."""
    base = datasets_dir / "twitch_social" / language
    base.mkdir(parents=True, exist_ok=True)
    if isinstance(edges, str):
        (base / f"{language}_edges.csv").write_text(edges)
    else:
        lines = ["from,to", *(f"{a},{b}" for a, b in edges)]
        (base / f"{language}_edges.csv").write_text("\n".join(lines) + "\n")
    if isinstance(features, str):
        (base / f"{language}_features.json").write_text(features)
    else:
        (base / f"{language}_features.json").write_text(
            json.dumps({str(k): v for k, v in features.items()})
        )
    if target is None:
        n = (
            num_users
            if num_users is not None
            else 1
            + max(
                max(a, b)
                for a, b in edges  # type: ignore[union-attr]
            )
        )
        target = [
            f"{1000 + u},{100 * (u + 1)},{'True' if u % 2 else 'False'},{10 * u},False,{u}"
            for u in range(n)
        ]
    (base / f"{language}_target.csv").write_text("\n".join([TARGET_HEADER, *target]) + "\n")
    return base


def prepare_all_train(tmp_path: Path, edges: list[tuple[int, int]], features, num_users: int):
    """A hand-made graph prepared with every friendship in the training split:
    returns (settings, PreparedDataset)."""
    from friendrec.config import load_settings
    from friendrec.data.canonical import load_prepared, prepare
    from friendrec.paths import DatasetPaths

    # A private datasets folder holding the graph as one of the shipped schema's variants.
    datasets = tmp_path / "datasets"
    write_twitch(datasets, "ENGB", edges, features, num_users=num_users)
    settings = load_settings(
        workdir=tmp_path / "work",
        datasets_dir=datasets,
        data={"val_fraction": 0.0, "test_fraction": 0.0},
    )
    prepare(settings, "twitch/ENGB")
    return settings, load_prepared(DatasetPaths.of(settings, "twitch/ENGB"))
