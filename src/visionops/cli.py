"""The one command line: ``visionops <stage>``. Every command is a thin wrapper.

Commands parse options, load params, call one core function inside a tracked MLflow
stage run where that makes sense, and print a short result. Bad input becomes one red
line and exit code 2.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from visionops.errors import VisionOpsError

app = typer.Typer(
    name="visionops",
    help="End-to-end MLOps for image classifiers: pipeline, registry, serving, monitoring.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
pipeline_app = typer.Typer(help="Run the whole DVC pipeline.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")

console = Console(stderr=True)
out = Console()

ParamsOpt = Annotated[
    Path, typer.Option("--params", "-p", help="params file (YAML)", show_default=True)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a param, e.g. --set train.epochs=1 (repeatable)"),
]

F = TypeVar("F", bound=Callable[..., Any])


def _setup_logging() -> None:
    level = os.environ.get("VISIONOPS_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "git"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # torch's OpenMP threads busy-wait by default; on a shared 2-core machine that makes
    # training 3-4x slower. Read when torch is imported, so it is set here, before that.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def handle_errors(fn: F) -> F:
    """Turn project errors into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except VisionOpsError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except FileNotFoundError as exc:
            console.print(f"[bold red]error:[/] file not found: {exc.filename or exc}")
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _params(params_file: Path, overrides: list[str] | None, command: str) -> Any:
    """The params for ``command``; a ``--set`` of a param it does not read is an error."""
    from visionops.config import load_params
    from visionops.stages import check_overrides

    params = load_params(params_file, overrides or [])  # unknown keys first: a typo is a typo
    check_overrides(command, overrides or [])
    return params


def _declared(params: Any, command: str) -> Any:
    """What ``command``'s core code gets: only the params it declares can be read."""
    from visionops.stages import declared_view

    return declared_view(params, command)


def _layout() -> Any:
    from visionops.layout import Layout

    return Layout.at(Path.cwd())


def _print_json(obj: Any) -> None:
    out.print_json(json.dumps(obj, default=str))


# --------------------------------------------------------------------------- data


@app.command()
@handle_errors
def ingest(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Read the configured data source, verify checksums, write data/interim/."""
    from visionops import registry
    from visionops.data.ingest import run_ingest

    params, layout = _params(params_file, set_, "ingest"), _layout()
    with registry.stage_run("ingest", params, layout) as tracker:
        result = run_ingest(_declared(params, "ingest"), layout)
        tracker.log_metrics(result.summary())
    out.print(f"ingested {result.describe()}")


@app.command()
@handle_errors
def download(
    mirror: Annotated[str, typer.Option(help="base URL holding the files (or the archive URL)")],
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Fetch missing or damaged source files from a mirror and verify their checksums."""
    from visionops.data.sources import download_cifar10, download_mnist

    params = _params(params_file, set_, "download")
    dest = Path(params.data.path)
    if params.data.source == "mnist":
        written = download_mnist(dest, mirror)
        out.print(f"{len(written)} file(s) fetched into {dest}; all checksums verified")
    elif params.data.source == "cifar10":
        folder = dest.parent if dest.suffix == ".gz" else dest
        out.print(f"fetched and verified {download_cifar10(folder, mirror)}")
    else:
        from visionops.errors import ConfigError

        raise ConfigError("data.source=imagefolder has nothing to download")


@app.command()
@handle_errors
def validate(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Check shapes, labels, balance, duplicates and unreadable files; fail on broken data."""
    from visionops import registry
    from visionops.data.validate import run_validate

    params, layout = _params(params_file, set_, "validate"), _layout()
    with registry.stage_run("validate", params, layout) as tracker:
        report = run_validate(_declared(params, "validate"), layout)
        tracker.log_artifact(layout.reports_dir / "validation.json")
    out.print(f"data valid: {report.describe()}")


@app.command()
@handle_errors
def prepare(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Split train/validation from the seed and compute normalisation statistics."""
    from visionops import registry
    from visionops.data.prepare import run_prepare

    params, layout = _params(params_file, set_, "prepare"), _layout()
    with registry.stage_run("prepare", params, layout) as tracker:
        result = run_prepare(_declared(params, "prepare"), layout)
        tracker.log_metrics(result.summary())
    out.print(f"prepared {result.describe()}")


# --------------------------------------------------------------------------- model


@app.command()
@handle_errors
def train(
    model: Annotated[
        str, typer.Argument(help="architecture from the zoo: mlp, cnn, resnet or a timm model name")
    ],
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option(help="continue from the last checkpoint")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="processes on this machine; >1 trains with DistributedDataParallel "
            "through torchrun (default: train.nproc)",
        ),
    ] = None,
) -> None:
    """Train one architecture with checkpoints, early stopping and tracked metrics."""
    from visionops import registry
    from visionops.train import launch_distributed, run_train

    params, layout = _params(params_file, set_, "train"), _layout()
    nproc = nproc or params.train.nproc
    if nproc > 1:  # rank 0 tracks, prints and writes, as below
        launch_distributed(params_file, set_ or [], model, nproc, resume)
        return
    with registry.stage_run(f"train-{model}", params, layout) as tracker:
        result = run_train(
            _declared(params, "train"), layout, model, resume=resume, on_epoch=tracker.log_metrics
        )
        tracker.log_metrics(result.summary())
        tracker.log_artifacts(layout.model_dir(model), "model")
    out.print(f"trained {result.describe()}")


@app.command()
@handle_errors
def tune(
    trials: Annotated[int, typer.Option(min=1, help="trials this process runs")] = 20,
    timeout: Annotated[
        float | None, typer.Option(help="start no new trial after this many seconds")
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage shared by every worker, e.g. postgresql://user@host/db "
            "(default: VISIONOPS_TUNE_STORAGE, else sqlite:///tuning/optuna.db)"
        ),
    ] = None,
    study: Annotated[
        str | None,
        typer.Option(help="study name (default: derived from the params, so equal params join)"),
    ] = None,
    n_jobs: Annotated[
        int, typer.Option("--n-jobs", min=1, help="trials run at once in this process")
    ] = 1,
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Search tune.space with Optuna; write the best params and the report to tuning/."""
    from visionops.tune import run_tune

    params, layout = _params(params_file, set_, "tune"), _layout()
    result = run_tune(
        params,
        layout,
        trials=trials,
        timeout=timeout,
        storage=storage,
        study_name=study,
        n_jobs=n_jobs,
        params_file=params_file,
    )
    # No markup (a value may look like [cnn]), no wrapping (the command is copied).
    out.print(f"tuned {result.describe()}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@handle_errors
def evaluate(
    model: Annotated[str, typer.Argument(help="a trained architecture")],
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Evaluate a trained model on the untouched test set; write metrics and plots."""
    from visionops import registry
    from visionops.evaluate import run_evaluate

    params, layout = _params(params_file, set_, "evaluate"), _layout()
    with registry.stage_run(f"evaluate-{model}", params, layout) as tracker:
        result = run_evaluate(_declared(params, "evaluate"), layout, model)
        tracker.log_metrics(result.summary())
        tracker.log_artifacts(layout.eval_report_dir(model), "evaluation")
    out.print(f"evaluated {result.describe()}")


@app.command()
@handle_errors
def compare(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Compare every trained model (table + plot) and select the best for export."""
    from visionops import registry
    from visionops.evaluate import run_compare

    params, layout = _params(params_file, set_, "compare"), _layout()
    with registry.stage_run("compare", params, layout) as tracker:
        result = run_compare(_declared(params, "compare"), layout)
        tracker.log_artifact(layout.reports_dir / "models.md")
    out.print(result.describe())


@app.command()
@handle_errors
def export(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Export the selected model to ONNX and check parity with torch."""
    from visionops import registry
    from visionops.export import run_export

    params, layout = _params(params_file, set_, "export"), _layout()
    with registry.stage_run("export", params, layout) as tracker:
        result = run_export(_declared(params, "export"), layout)
        tracker.log_metrics(result.summary())
    out.print(f"exported {result.describe()}")


@app.command()
@handle_errors
def register(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Register the exported model in MLflow with alias 'challenger'."""
    from visionops import registry

    params, layout = _params(params_file, set_, "register"), _layout()
    result = registry.run_register(_declared(params, "register"), layout)
    out.print(f"registered {result.describe()}")


@app.command()
@handle_errors
def gate(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Promote the challenger to 'champion' only if it is not worse (decision in JSON)."""
    from visionops import registry

    params, layout = _params(params_file, set_, "gate"), _layout()
    decision = registry.run_gate(_declared(params, "gate"), layout)
    out.print(decision.describe())


@app.command()
@handle_errors
def promote(
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    version: Annotated[
        str | None, typer.Option(help="version to promote (default: the challenger)")
    ] = None,
    force: Annotated[bool, typer.Option(help="skip the gate and promote anyway")] = False,
) -> None:
    """Promote a version to 'champion' (through the gate unless --force)."""
    from visionops import registry

    params, layout = _params(params_file, set_, "promote"), _layout()
    decision = registry.promote(params, layout, version=version, force=force)
    out.print(decision.describe())


@app.command()
@handle_errors
def rollback(params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Give 'champion' back to the previous champion."""
    from visionops import registry

    params, layout = _params(params_file, set_, "rollback"), _layout()
    result = registry.rollback(params, layout)
    out.print(result.describe())


report_app = typer.Typer(
    help="Write reports/summary.md for the pipeline run and close its MLflow parent run; "
    "`report compare` writes the pull-request report.",
    invoke_without_command=True,
)
app.add_typer(report_app, name="report")


@report_app.callback()
@handle_errors
def report(
    ctx: typer.Context, params_file: ParamsOpt = Path("params.yaml"), set_: SetOpt = None
) -> None:
    """Write reports/summary.md for the pipeline run and close its MLflow parent run."""
    if ctx.invoked_subcommand is not None:
        return  # `visionops report compare ...`: the subcommand does the work
    from visionops.report import run_report

    params, layout = _params(params_file, set_, "report"), _layout()
    result = run_report(_declared(params, "report"), layout)
    out.print(result.describe())


@report_app.command("compare")
@handle_errors
def report_compare(
    base: Annotated[
        str,
        typer.Option(
            help="what to compare with: a git ref (its committed metrics/, plots/, "
            "params.yaml), another workspace folder, or a JSON metrics file "
            "(`dvc metrics show --json`)"
        ),
    ] = "main",
    output: Annotated[Path, typer.Option("--out", "-o", help="Markdown file to write")] = Path(
        "reports/compare.md"
    ),
    images: Annotated[
        Path | None,
        typer.Option(help="folder for the images (default: beside the report, REPORT-img/)"),
    ] = None,
    title: Annotated[str, typer.Option(help="the report's heading")] = "Model report",
) -> None:
    """Compare this workspace's metrics, params and plots with a base (the PR report)."""
    from visionops.compare_report import run_compare_report

    result = run_compare_report(_layout(), base=base, out=output, images_dir=images, title=title)
    out.print(result.describe())


# --------------------------------------------------------------------------- pipeline


@pipeline_app.command("run")
@handle_errors
def pipeline_run(
    force: Annotated[bool, typer.Option(help="re-run every stage (dvc repro --force)")] = False,
) -> None:
    """Run `dvc repro` under one MLflow parent run and print a summary."""
    from visionops.pipeline import run_pipeline

    summary = run_pipeline(_layout(), force=force)
    out.print(summary)


@pipeline_app.command("summary")
@handle_errors
def pipeline_summary() -> None:
    """Print the summary of the last pipeline run."""
    from visionops.pipeline import summarize

    out.print(summarize(_layout()))


predlog_app = typer.Typer(
    help="The prediction log written by `visionops serve`.", no_args_is_help=True
)
app.add_typer(predlog_app, name="predlog")


@app.command()
@handle_errors
def serve(
    model_uri: Annotated[
        str | None,
        typer.Option(
            "--model-uri",
            help="models:/NAME@ALIAS, models:/NAME/VERSION or an exported folder "
            "(default: models:/<registry model name>@champion)",
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    params_file: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="server processes on the one port (default: the usable CPU cores); "
            "metrics, the prediction log and reloads cover all of them"
        ),
    ] = None,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="log one line per request (with its id)")
    ] = False,
) -> None:
    """Serve the model over HTTP (FastAPI + ONNX Runtime); web page at /, docs at /docs."""
    from visionops.serve.app import run_server
    from visionops.serve.model import default_threads
    from visionops.stages import check_overrides

    check_overrides("serve", set_ or [])
    run_server(
        model_uri=model_uri,
        host=host,
        port=port,
        params_file=params_file,
        overrides=set_ or [],
        workers=default_threads() if workers is None else workers,
        access_log=access_log,
    )


@predlog_app.command("export")
@handle_errors
def predlog_export(
    output: Annotated[Path, typer.Option("--out", "-o", help="file to write")] = Path(
        "predictions.parquet"
    ),
    fmt: Annotated[
        str | None,
        typer.Option("--format", "-f", help="parquet or csv (default: from the file suffix)"),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="database URL (default: VISIONOPS_PREDLOG_URL, else ./predictions.db)"),
    ] = None,
) -> None:
    """Export every logged prediction to Parquet or CSV."""
    from visionops.config import load_settings
    from visionops.serve.predlog import export_predlog

    fmt = fmt or ("csv" if output.suffix.lower() == ".csv" else "parquet")
    result = export_predlog(url or load_settings().predlog_url, output, format=fmt)
    out.print(f"exported {result.describe()}")


# --------------------------------------------------------------------------- monitoring

monitor_app = typer.Typer(
    help="Watch the served model: drift checks and the monitoring report.", no_args_is_help=True
)
app.add_typer(monitor_app, name="monitor")

ReferenceOpt = Annotated[
    str,
    typer.Option(
        "--reference",
        help="model folder holding reference.json, the file itself, or models:/NAME@ALIAS",
    ),
]
PredlogOpt = Annotated[
    str | None,
    typer.Option(
        "--predlog-url", help="database URL (default: VISIONOPS_PREDLOG_URL, else ./predictions.db)"
    ),
]
ConfidenceThresholdOpt = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        max=1.0,
        help="the server's serve.confidence_threshold (default: params.yaml's)",
    ),
]


@app.command()
@handle_errors
def simulate(
    scenario: Annotated[
        str,
        typer.Option(
            help="digit models: mnist, foreign-digits, noise, rotation, inverted, blur, "
            "label-shift or printed; photo models: photos, photos-dark, photos-blur or "
            "photos-colour-cast"
        ),
    ] = "mnist",
    count: Annotated[int, typer.Option("--n", "--count", "-n", help="images to send")] = 200,
    url: Annotated[str, typer.Option(help="the running service")] = "http://127.0.0.1:8000",
    rate: Annotated[
        float | None, typer.Option(help="requests per second (default: as fast as answered)")
    ] = None,
    batch: Annotated[int, typer.Option(help="images per request")] = 1,
    image_format: Annotated[
        str,
        typer.Option("--format", help="json (the service sees these pixels) or png uploads"),
    ] = "json",
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 10.0,
    max_seconds: Annotated[float, typer.Option(help="stop sending after this long")] = 300.0,
    seed: Annotated[int, typer.Option(help="which images")] = 0,
    mnist_dir: Annotated[Path, typer.Option(help="folder with the MNIST t10k-* files")] = Path(
        "data/raw/mnist"
    ),
    allow_remote: Annotated[
        bool, typer.Option(help="allow a host other than localhost / 127.0.0.1 / ::1")
    ] = False,
    photos_dir: Annotated[
        Path | None,
        typer.Option(help="image folder the photo scenarios send (default: generated shapes)"),
    ] = None,
) -> None:
    """Send real requests with known drift (or none) to a running service."""
    from visionops.monitor.simulate import simulate as send

    result = send(
        url,
        scenario,
        count,
        rate=rate,
        batch=batch,
        timeout=timeout,
        image_format=image_format,
        allow_remote=allow_remote,
        seed=seed,
        mnist_dir=mnist_dir,
        max_seconds=max_seconds,
        photos_dir=photos_dir,
    )
    out.print(f"simulated {result.describe()}")
    if result.ok == 0:
        raise typer.Exit(1)


@monitor_app.command("check")
@handle_errors
def monitor_check(
    window: Annotated[
        int | None, typer.Option(help="the last N predictions (with --since: of that range)")
    ] = 500,
    since: Annotated[str | None, typer.Option(help="ISO 8601 start, UTC if no offset")] = None,
    until: Annotated[str | None, typer.Option(help="ISO 8601 end (exclusive)")] = None,
    reference: ReferenceOpt = "exported",
    predlog_url: PredlogOpt = None,
    webhook: Annotated[
        str | None,
        typer.Option(help="POST a JSON alert here on an alarm (default: VISIONOPS_ALERT_WEBHOOK)"),
    ] = None,
    confidence_threshold: ConfidenceThresholdOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the full verdict")] = False,
) -> None:
    """Check recent predictions: exit 0 without an alarm (data drift alone is a warning),
    1 on an alarm (a risk to the model's performance), 2 on bad input."""
    from visionops.config import load_settings
    from visionops.monitor.check import run_check

    settings = load_settings()
    result = run_check(
        window,
        predlog_url or settings.predlog_url,
        reference,
        webhook or settings.webhook_url,
        since=since,
        until=until,
        confidence_threshold=_serving_threshold(confidence_threshold),
    )
    if json_output:
        _print_json(result.verdict.to_dict())
    else:
        out.print(result.describe())
        for reason in result.verdict.performance.reasons:
            out.print(f"  alarm: {reason}", highlight=False)
        for test in result.report.drifted:
            out.print(f"  data drift: {test.verdict}", highlight=False)
    raise typer.Exit(result.exit_code)


def _serving_threshold(value: float | None) -> float:
    """``value``, else params.yaml's ``serve.confidence_threshold`` (its default without
    a params.yaml)."""
    from visionops.config import ServeParams, load_params

    if value is not None:
        return value
    if Path("params.yaml").is_file():
        return load_params("params.yaml").serve.confidence_threshold
    return ServeParams().confidence_threshold


@monitor_app.command("report")
@handle_errors
def monitor_report(
    window: Annotated[int, typer.Option(help="the last N predictions")] = 500,
    reference: ReferenceOpt = "exported",
    predlog_url: PredlogOpt = None,
    output: Annotated[Path, typer.Option("--out", "-o", help="HTML file to write")] = Path(
        "reports/monitoring.html"
    ),
    history: Annotated[int, typer.Option(help="windows in the drift-over-time plot")] = 12,
    confidence_threshold: ConfidenceThresholdOpt = None,
) -> None:
    """Write the self-contained HTML monitoring report (also served at /monitoring)."""
    from visionops.config import load_settings
    from visionops.monitor.reference import resolve_reference
    from visionops.monitor.report import write_monitoring_report

    result = write_monitoring_report(
        resolve_reference(reference),
        predlog_url or load_settings().predlog_url,
        output,
        window,
        history_windows=history,
        confidence_threshold=_serving_threshold(confidence_threshold),
    )
    out.print(result.describe())


feedback_app = typer.Typer(
    help="True labels of served predictions, back into training.", no_args_is_help=True
)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("export")
@handle_errors
def feedback_export(
    output: Annotated[
        Path, typer.Option("--out", "-o", help="image folder to write (<class>/*.png)")
    ] = Path("data/feedback"),
    predlog_url: PredlogOpt = None,
    model_version: Annotated[
        str | None, typer.Option(help="only predictions of this model version")
    ] = None,
) -> None:
    """Write every labelled logged input as an image folder (data.extra_path trains on it)."""
    from visionops.config import load_settings
    from visionops.monitor.feedback import export_feedback_images

    result = export_feedback_images(
        predlog_url or load_settings().predlog_url, output, model_version=model_version
    )
    out.print(f"exported {result.describe()}")


def main() -> None:
    app(prog_name="visionops")


if __name__ == "__main__":  # pragma: no cover
    main()
