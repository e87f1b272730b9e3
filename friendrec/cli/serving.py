"""`friendrec serve | recommend`: the retrieval service and its command-line client."""

from __future__ import annotations

import json
import signal
import threading

import typer


def _parse_profile(values: list[str]) -> dict[str, float]:
    profile = {}
    for item in values:
        name, sep, value = item.partition("=")
        try:
            profile[name] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise typer.BadParameter(f"--profile takes NAME=NUMBER, got {item!r}")
    return profile


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        port: int = typer.Option(None, help="gRPC port (default: serving.port)."),
        metrics_port: int = typer.Option(
            None, "--metrics-port", help="Prometheus /metrics port, 0 = off (serving.metrics_port)."
        ),
    ) -> None:
        """Run the FriendRecommender gRPC service: Feast online features -> TF Serving (pinned to
        the model version of the live Milvus alias) -> Milvus search -> top k. Needs a TF
        Serving endpoint (`friendrec tfserving` here) and a built index (`friendrec index build`).
        Health checking, reflection, optional TLS and bearer token per the serving settings;
        stops gracefully on SIGTERM/SIGINT."""
        from friendrec.config import load_settings
        from serving.service import start_service

        settings = load_settings()
        if metrics_port is not None:
            serving = settings.serving.model_copy(update={"metrics_port": metrics_port})
            settings = settings.model_copy(update={"serving": serving})
        service = start_service(settings, port=port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        service.stop(grace=5.0)

    @app.command()
    def recommend(
        user: int = typer.Option(None, "--user", "-u", help="User id to recommend friends for."),
        external_user: str = typer.Option(
            None,
            "--external-user",
            help="Your own (string) user id instead of --user, for a dataset prepared with "
            "string ids (its id_map); candidates then show their external ids too.",
        ),
        k: int = typer.Option(10, "-k", help="Number of candidates."),
        source: str = typer.Option(
            None,
            "--source",
            help="embedding | fof (friends of friends) | blend (default: serving.default_source).",
        ),
        exclude: list[int] = typer.Option([], "--exclude", help="User ids not to return."),
        profile: list[str] = typer.Option(
            [], "--profile", help="Request feature NAME=VALUE for a user Feast does not know."
        ),
        sparse_id: list[int] = typer.Option([], "--sparse-id", help="Request sparse feature id."),
        friend: list[int] = typer.Option([], "--friend", help="Request feature: a friend's id."),
        address: str = typer.Option(None, help="host:port (default: serving.host:serving.port)."),
        timeout: float = typer.Option(5.0, help="Deadline in seconds."),
        as_json: bool = typer.Option(False, "--json", help="Print the response as JSON."),
    ) -> None:
        """Ask the running service for friend candidates (address, TLS and token from the
        settings) and print them."""
        import grpc
        from google.protobuf.json_format import MessageToDict
        from rich.console import Console
        from rich.table import Table

        from friendrec.config import load_settings
        from friendrec.data.canonical import IdMap
        from friendrec.errors import FriendrecError
        from friendrec.paths import DatasetPaths
        from serving.client import RecommenderClient, recommend_request
        from serving.protos import recommender_pb2 as pb

        settings = load_settings()
        if source is not None and source not in ("embedding", "fof", "blend"):
            raise typer.BadParameter("--source must be embedding, fof or blend")
        id_map = IdMap.load(DatasetPaths.of(settings))
        if (user is None) == (external_user is None):
            raise typer.BadParameter("give exactly one of --user and --external-user")
        if external_user is not None:
            if id_map is None:
                raise FriendrecError("this dataset has integer ids: use --user")
            user = id_map.dense(external_user)
        with_features = bool(profile or sparse_id or friend)
        request = recommend_request(
            user,
            k,
            exclude,
            _parse_profile(profile) if with_features else None,
            sparse_id if with_features else None,
            friend if with_features else None,
            source=source or settings.serving.default_source,
        )
        with RecommenderClient(settings, address, timeout) as client:
            try:
                response = client.recommend(request)
            except grpc.RpcError as exc:
                raise FriendrecError(f"{exc.code().name}: {exc.details()}") from None
        if as_json:
            answer = MessageToDict(response, preserving_proto_field_name=True)
            if id_map is not None:
                answer["external_id"] = id_map.external_of(int(response.user_id))
                for candidate in answer.get("candidates", []):
                    candidate["external_id"] = id_map.external_of(int(candidate["user_id"]))
            typer.echo(json.dumps(answer))
            return
        source = (
            "feature store"
            if response.known_user
            else ("request features" if response.used_request_features else "defaults (cold start)")
        )
        table = Table(
            title=f"user {response.user_id}: model v{response.model_version}, features: {source}"
        )
        table.add_column("rank", justify="right")
        table.add_column("user_id", justify="right")
        table.add_column("score", justify="right")
        table.add_column("source")
        if id_map is not None:
            table.add_column("external_id")
        for rank, candidate in enumerate(response.candidates, start=1):
            extra = [str(id_map.external_of(candidate.user_id))] if id_map is not None else []
            found_by = pb.Source.Name(candidate.source).lower().replace("blend", "both")
            table.add_row(
                str(rank), str(candidate.user_id), f"{candidate.score:.4f}", found_by, *extra
            )
        Console().print(table)
