"""`estimate serve`: the estimator as an HTTP sidecar a router calls (estimator/serve/)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from estimator.cli.common import run_command

DEFAULT_PORT = 8321


def serve(
    model_dir: Annotated[Path, typer.Argument(help="An iteration model folder (estimate train --target iteration).")],
    calibration: Annotated[
        Path | None, typer.Option(help="A calibration of the running server (estimate calibrate): its engine, "
                                       "config, level and front end. Without it: the offline model.")
    ] = None,
    engine: Annotated[
        Path | None, typer.Option(help="Without --calibration: a run folder, or a JSON file with an `engine` object "
                                       "(e.g. a scheduler study's setup.json), giving the engine's limits.")
    ] = None,
    config: Annotated[
        list[str] | None, typer.Option(help="Without --calibration: config axis value AXIS=VALUE (repeatable); "
                                            "default: the model's only trained config.")
    ] = None,
    lengths: Annotated[
        Path | None, typer.Option(help="A workload file of true output lengths: predicts a request's output length "
                                       "from what it declares (else its max_tokens).")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 unless told otherwise.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    warm: Annotated[bool, typer.Option(help="Fill the llm-d table's common grid before serving (a few s).")] = True,
) -> None:
    """Serve predictions over HTTP: llm-d's latency-predictor API (/predict, /predict/bulk), a native endpoint on
    the contract's request and engine state (/v1/predict), the actuals' ingest (/v1/actuals), /healthz and
    /metrics. Ctrl-C or SIGTERM stops it."""
    from estimator.cli.simulate import chosen_configs
    from estimator.errors import EstimatorError
    from estimator.model.iteration import IterationEstimator
    from estimator.serve.predictor import load_predictor

    def go() -> None:
        if not 0 <= port <= 65535:
            raise EstimatorError(f"--port {port}: expected 0-65535")
        try:
            import uvicorn  # noqa: F401 - checked here, before the model loads

            from estimator.serve.app import build_app
        except ImportError as exc:
            raise EstimatorError(f"estimate serve needs the serve extra (pip install -e '.[serve]'): {exc}") from None
        cfg = chosen_configs(IterationEstimator.load(model_dir), config)[0] if config else None
        predictor = load_predictor(model_dir, calibration, engine, cfg, lengths)
        if warm:
            n = predictor.warm()
            typer.echo(f"llm-d table: {n} entries computed", err=True)
        typer.echo(f"estimate serve: {model_dir} ({predictor.source}, config {predictor.config}) on "
                   f"http://{host}:{port}", err=True)
        stopped_by = run_server(build_app(predictor), host, port)
        typer.echo(f"estimate serve: stopped ({stopped_by})", err=True)

    run_command(go)


def run_server(app: object, host: str, port: int) -> str:
    """Serve `app` with uvicorn until Ctrl-C or SIGTERM, then return the signal's name. The requests in flight are
    finished and the process exits 0: uvicorn by default raises the signal again once shut down, which reads as a
    crash to a supervisor. EstimatorError if it cannot listen."""
    import signal

    import uvicorn

    from estimator.errors import EstimatorError

    class Server(uvicorn.Server):
        stopped_by = "shut down"

        def handle_exit(self, sig: int, frame: object) -> None:
            super().handle_exit(sig, frame)  # type: ignore[arg-type]
            self.stopped_by = signal.Signals(sig).name
            self._captured_signals.clear()

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))  # type: ignore[arg-type]
    server.run()
    if not server.started:
        raise EstimatorError(f"could not listen on {host}:{port} (in use, or not an address of this machine)")
    return server.stopped_by
