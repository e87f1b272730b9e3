"""`friendrec tfserving`: the TF Serving gRPC API over the model base path (a stand-in for
`tensorflow_model_server`, which cannot be installed on these machines)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import typer

log = logging.getLogger(__name__)


def register(app: typer.Typer) -> None:
    @app.command()
    def tfserving(
        port: int = typer.Option(
            None, "--port", "-p", help="gRPC port (default: tfserving.port; 0: a free one)."
        ),
        host: str = typer.Option(None, "--host", help="Bind address (default: tfserving.host)."),
        model_config_file: Path = typer.Option(
            None,
            "--model-config-file",
            exists=True,
            dir_okay=False,
            help="A TF Serving ModelServerConfig (e.g. infra/tfserving/models.config): model "
            "names and version policies come from it instead of the settings.",
        ),
        config_base_path: bool = typer.Option(
            False,
            "--config-base-path",
            help="With --model-config-file: serve each model's base_path as written in the file. "
            "Default: <model base path from the settings>/<model name>, because the file's "
            "base_path (/models/<name>) is a container path.",
        ),
    ) -> None:
        """Serve the exported user tower over TensorFlow Serving's gRPC API.

        A stand-in for `tensorflow_model_server`: the same PredictionService (Predict,
        GetModelMetadata), ModelService (GetModelStatus), gRPC health checking and reflection,
        over the same model base path that `friendrec export` writes
        (<serving.model_base_path>/<serving.model_name>/<version>/). It polls for new versions
        every tfserving.poll_seconds, replays each version's warmup requests before it takes
        traffic and applies tfserving.version_policy (latest N / all / specific). Clients work
        unchanged against the official server (see infra/tfserving/README.md). Runs until
        SIGTERM or SIGINT, then drains in-flight requests and exits 0.
        """
        import serving  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
        from friendrec.config import load_settings
        from serving.tfserving.models import read_model_config_file
        from serving.tfserving.server import serve

        settings = load_settings()
        models = None
        if model_config_file is not None:
            root = None if config_base_path else settings.model_base_path
            models = read_model_config_file(model_config_file, models_root=root)
        stop = threading.Event()

        def request_stop(signum: int, _frame: object) -> None:
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        server = serve(settings, port=port, host=host, block=False, models=models)
        try:
            while not stop.wait(1.0):
                pass
        finally:
            server.stop()
