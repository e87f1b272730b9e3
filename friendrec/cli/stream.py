"""`friendrec stream ...`: the Kafka workers that keep features and embeddings fresh, the local
broker, topic and state set-up, and event replay."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading

import typer

app = typer.Typer(
    help="Real-time refresh over Kafka: friendship/profile events -> Feast -> TF Serving -> "
    "Milvus. Workers join consumer groups (run more of one to scale it).",
    no_args_is_help=True,
)
log = logging.getLogger(__name__)


def _run_worker(kind: str) -> None:
    from friendrec.config import load_settings
    from streaming.worker import Worker, serve_metrics

    settings = load_settings()
    if kind == "feature-updater":
        from streaming.feature_updater import FeatureUpdater

        processor = FeatureUpdater(settings)
    elif kind == "embedding-refresher":
        from streaming.refresher import EmbeddingRefresher

        processor = EmbeddingRefresher(settings)
    else:
        from streaming.milvus_sink import MilvusSink

        processor = MilvusSink(settings)
    worker = Worker(settings, processor)
    worker.install_signal_handlers()
    serve_metrics(settings)
    worker.run()


@app.command("feature-updater")
def feature_updater() -> None:
    """Friendship/profile events -> Feast push (profile, degree, friend sample, aggregates) ->
    refresh requests for every user whose embedding inputs changed."""
    _run_worker("feature-updater")


@app.command("embedding-refresher")
def embedding_refresher() -> None:
    """Refresh requests -> TF Serving (pinned to the live model version) -> embeddings topic."""
    _run_worker("embedding-refresher")


@app.command("milvus-sink")
def milvus_sink() -> None:
    """Embeddings topic -> upsert into the live Milvus collection (other versions dropped)."""
    _run_worker("milvus-sink")


@app.command()
def health() -> None:
    """A worker's readiness from its heartbeat file (`streaming.heartbeat_file`): prints ready,
    starting or stalled with its figures; exits 0 only when ready (a container exec probe)."""
    from friendrec.config import load_settings
    from streaming.worker import heartbeat_health

    status = heartbeat_health(load_settings())
    typer.echo(status)
    if not status.startswith("ready"):
        raise typer.Exit(1)


@app.command()
def broker(
    port: int | None = typer.Option(
        None, "--port", help="Loopback port (default: the port of streaming.bootstrap_servers)."
    ),
) -> None:
    """Run a local Tansu broker (memory storage) until Ctrl-C / SIGTERM."""
    from friendrec.config import load_settings
    from friendrec.local_services import TansuProcess

    if port is None:
        port = int(load_settings().streaming.bootstrap_servers.split(",")[0].rsplit(":", 1)[1])
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    with TansuProcess(port) as tansu:
        typer.echo(f"tansu broker on {tansu.bootstrap_servers} (Ctrl-C to stop)")
        done.wait()


@app.command("create-topics")
def create_topics() -> None:
    """Create the missing topics with the configured partition counts."""
    from friendrec.config import load_settings
    from streaming.topics import create_topics as create

    typer.echo(json.dumps({"created": create(load_settings())}))


@app.command("init-state")
def init_state() -> None:
    """(Re)seed the feature updater's friend sets from the prepared dataset's training
    friendships (the graph the batch features were built from)."""
    from friendrec.config import load_settings
    from friendrec.friend_sets import open_state, seed_state

    settings = load_settings()
    state = open_state(settings, seed_if_empty=False)
    try:
        rows = seed_state(settings, state)
    finally:
        state.close()
    typer.echo(json.dumps({"state": str(state.path), "directed_friendships": rows}))


@app.command()
def replay(
    dataset: str | None = typer.Option(
        None, "--dataset", help="Prepared dataset (default: data.dataset)."
    ),
    rate: float | None = typer.Option(
        None, "--rate", min=0.1, help="Friendships per second (default: as fast as possible)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="At most this many."),
    synthetic: int | None = typer.Option(
        None, "--synthetic", min=1, help="N random friendships instead of the held-out ones."
    ),
    remove: bool = typer.Option(False, "--remove", help="Produce removals instead of adds."),
) -> None:
    """Produce friendship events: the dataset's held-out (validation + test) friendships, oldest
    first, or synthetic ones; each is produced keyed by both endpoints."""
    from friendrec.config import load_settings
    from streaming.replay import held_out_pairs, replay, synthetic_pairs

    settings = load_settings()
    if dataset:
        settings = settings.model_copy(
            update={"data": settings.data.model_copy(update={"dataset": dataset})}
        )
    pairs = synthetic_pairs(settings, synthetic) if synthetic else held_out_pairs(settings)
    report = replay(settings, pairs[:limit], rate, "remove" if remove else "add")
    typer.echo(
        json.dumps(
            {
                "friendships": report.friendships,
                "messages": report.messages,
                "seconds": round(report.seconds, 3),
                "friendships_per_s": round(report.rate, 1),
            }
        )
    )


@app.command()
def profile(
    user: int = typer.Option(..., "--user", help="The user whose profile changed."),
    features: str = typer.Option(
        ...,
        "--features",
        help="New raw values of declared features, as a JSON object, e.g. "
        '\'{"country": "FR", "tags": ["jazz", "synthwave"], "plays": 12}\'. Checked against the '
        "dataset's contract before it is sent.",
    ),
) -> None:
    """Produce one profile event (profile.v1) for a user: the feature updater encodes it with the
    dataset's contract (a value outside a vocabulary goes to its out-of-vocabulary id), pushes it
    to Feast and has the user and its dependents re-embedded."""
    import time

    from friendrec import contract
    from friendrec.config import load_settings
    from friendrec.errors import FriendrecError
    from friendrec.paths import DatasetPaths
    from streaming.schemas import ProfileUpdate
    from streaming.topics import Topics, create_topics, producer

    settings = load_settings()
    try:
        values = json.loads(features)
    except json.JSONDecodeError as exc:
        raise FriendrecError(f"--features is not JSON: {exc.msg}") from None
    if not isinstance(values, dict):
        raise FriendrecError("--features must be a JSON object of feature name -> value")
    try:
        contract.load(DatasetPaths.of(settings).data_dir).encode_profile(values)
    except ValueError as exc:
        raise FriendrecError(f"--features: {exc}") from None
    event = ProfileUpdate(user_id=user, profile=values, event_ts=int(time.time() * 1000))
    create_topics(settings)
    topic = Topics.of(settings).profiles
    with contextlib.closing(producer(settings)) as sender:
        sender.send(topic, key=event.key, value=event.encode()).get(timeout=30)
    typer.echo(json.dumps({"topic": topic, "user_id": user, "profile": values}))


@app.command()
def redrive(
    reason: str | None = typer.Option(
        None, "--reason", help="Only letters whose reason contains this (case-sensitive)."
    ),
    source_topic: str | None = typer.Option(
        None, "--source-topic", help="Only letters from this original topic (exact name)."
    ),
    since: int | None = typer.Option(
        None, "--since", min=0, help="Only letters dead-lettered at or after this (Unix ms)."
    ),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Re-produce at most this many."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Count what would be re-produced; produce nothing."
    ),
    connect_timeout: float = typer.Option(
        10.0, "--connect-timeout", min=0.1, help="Seconds to wait for the broker."
    ),
) -> None:
    """Re-produce dead letters (original key and bytes) to their original topics, once their
    cause is fixed. Reads the whole dead-letter topic as it stood at the start and commits
    nothing, so letters a filter leaves out stay for a later run (see streaming/redrive.py)."""
    from friendrec.config import load_settings
    from streaming.redrive import RedriveFilter
    from streaming.redrive import redrive as run

    report = run(
        load_settings(),
        RedriveFilter(reason=reason, source_topic=source_topic, since_ms=since),
        limit=limit,
        dry_run=dry_run,
        connect_timeout_s=connect_timeout,
    )
    typer.echo(json.dumps(report.as_dict(), indent=2))
