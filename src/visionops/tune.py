"""Hyperparameter tuning: an Optuna study over ``tune.space`` (``visionops tune``).

Every trial is one real training run (:func:`visionops.train.run_train`) on the prepared
splits with the sampled ``train.*`` values (and architecture, when ``model`` is in the
space), in a scratch folder that is removed afterwards:

- After every epoch the trial reports its validation metric; the pruner (median or
  hyperband) stops trials that lag behind earlier ones at the same epoch.
- The study lives in an Optuna RDB storage: ``sqlite:///tuning/optuna.db`` by default,
  ``--storage`` / ``VISIONOPS_TUNE_STORAGE`` for a shared PostgreSQL database, so
  ``visionops tune`` processes on several machines work on one study. The default study
  name is derived from the params that shape a trial, so equal ``params.yaml`` files join
  the same study and changed ones start a new study.
- With ``tune.enqueue_defaults`` the first trial uses the current train params: the
  baseline the search has to beat.
- MLflow: one parent run ``tune-<study>`` (shared by the workers through the study) and one
  nested run per trial with its values, per-epoch curves and final metrics.
- At the end: ``tuning/best_params.yaml`` (the params file with the best values: usable
  with ``--params`` or copied over ``params.yaml`` for ``dvc repro`` / ``dvc exp run``),
  ``tuning/best.json`` (values, scores, trial counts, importances and the equivalent
  ``dvc exp run -S ...`` command) and the report: ``history.png``, ``importances.png``
  and the self-contained ``report.html``.

Determinism: one process with ``--n-jobs 1`` on a new study samples the same trials for
the same params (the sampler is seeded from ``seed``). Threads (``--n-jobs``) and
concurrent workers trade that for throughput; every trial still trains with ``seed``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shlex
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from visionops.config import ChoiceDim, Params, params_from_dict, tunable_kind
from visionops.errors import ConfigError, ModelError
from visionops.layout import Layout
from visionops.study import display_url, join_study, storage_lock

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

TUNING_DIR = "tuning"
#: Params that shape a trial: a change means another study (the default name's hash).
_STUDY_KEYS = ("seed", "data", "preprocess", "train", "tune")
#: Train params that only decide where and how fast a trial runs.
_RUNTIME_TRAIN_KEYS = ("num_threads", "device", "nproc", "compile")


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class TuningPaths:
    """Where tuning writes (``<root>/tuning/``)."""

    root: Path

    @classmethod
    def of(cls, layout: Layout) -> TuningPaths:
        return cls(layout.root / TUNING_DIR)

    @property
    def storage_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def best_params(self) -> Path:
        return self.root / "best_params.yaml"

    @property
    def best_json(self) -> Path:
        return self.root / "best.json"

    @property
    def history_png(self) -> Path:
        return self.root / "history.png"

    @property
    def importances_png(self) -> Path:
        return self.root / "importances.png"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"


@dataclass(frozen=True)
class _TrialLayout(Layout):
    """A trial's outputs in a scratch folder; the prepared data of the project."""

    data_root: Path = Path(".")

    @property
    def prepared_dir(self) -> Path:
        return self.data_root / "data" / "prepared"


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class TuneResult:
    """The state of the study after this process's trials."""

    study_name: str
    storage: str
    metric: str
    direction: str
    best_value: float
    best_trial: int
    best_values: dict[str, Any]
    baseline_value: float | None
    trials_run: int
    complete: int
    pruned: int
    failed: int
    seconds: float
    best_params_file: Path
    report_files: list[Path] = field(default_factory=list)
    importances: dict[str, float] = field(default_factory=dict)
    exp_command: str = ""
    mlflow_run_id: str = ""

    def summary(self) -> dict[str, float]:
        out = {
            "best_value": self.best_value,
            "best_trial": float(self.best_trial),
            "trials_complete": float(self.complete),
            "trials_pruned": float(self.pruned),
            "trials_failed": float(self.failed),
            "tune_seconds": self.seconds,
        }
        if self.baseline_value is not None:
            out["baseline_value"] = self.baseline_value
        return out

    def describe(self) -> str:
        from visionops.train import display_path

        baseline = (
            f" (baseline {self.baseline_value:.4f})" if self.baseline_value is not None else ""
        )
        values = ", ".join(f"{k}={_short(v)}" for k, v in self.best_values.items())
        return (
            f"study '{self.study_name}': best {self.metric} {self.best_value:.4f}{baseline} "
            f"at trial {self.best_trial} ({values}); {self.trials_run} trial(s) run here, "
            f"{self.complete} complete, {self.pruned} pruned, {self.failed} failed in the "
            f"study, {self.seconds:.0f} s -> {display_path(self.best_params_file)}\n  "
            + (
                f"retrain as a DVC experiment: {self.exp_command}"
                if "-S" in self.exp_command.split()
                else "the params file already holds the best values"
            )
        )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- study setup


def default_study_name(params: Params) -> str:
    """``<registered model name>-<hash of the params that shape a trial>``."""
    raw = params.model_dump(mode="json", include=set(_STUDY_KEYS))
    for key in _RUNTIME_TRAIN_KEYS:
        raw["train"].pop(key, None)
    digest = hashlib.blake2b(json.dumps(raw, sort_keys=True).encode(), digest_size=4)
    return f"{params.model_name()}-{digest.hexdigest()}"


def resolve_storage(storage: str | None, layout: Layout) -> str:
    """``storage``, else ``VISIONOPS_TUNE_STORAGE``, else ``sqlite:///<root>/tuning/optuna.db``."""
    from visionops.config import database_url, load_settings

    url = storage or load_settings(layout.root).tune_storage
    if url:
        return database_url(url)
    return f"sqlite:///{TuningPaths.of(layout).storage_db.resolve()}"


# --------------------------------------------------------------------------- trials


def suggest_values(trial: optuna.Trial, params: Params) -> dict[str, Any]:
    """Sample one value per ``tune.space`` key (``model`` or a ``train.*`` name)."""
    values: dict[str, Any] = {}
    for key, dim in params.tune.space.items():
        if isinstance(dim, ChoiceDim):
            values[key] = trial.suggest_categorical(key, dim.choices)
        elif tunable_kind(key) == "int":
            step = int(dim.step or 1)
            values[key] = trial.suggest_int(
                key, int(dim.low), int(dim.high), step=step, log=dim.log
            )
        else:
            values[key] = trial.suggest_float(key, dim.low, dim.high, step=dim.step, log=dim.log)
    return values


def apply_values(
    params: Params, values: Mapping[str, Any], num_threads: int | None = None
) -> Params:
    """``params`` with sampled ``train.*`` values; ``model`` becomes ``train.models``.

    Without ``model`` among the values, ``train.models`` is kept (a trial trains its
    first entry).
    """
    raw = params.model_dump(mode="json")
    for key, value in values.items():
        if key == "model":
            raw["train"]["models"] = [value]
        else:
            raw["train"][key] = value
    if num_threads is not None:
        raw["train"]["num_threads"] = num_threads
    return params_from_dict(raw, source="tuning values")


def baseline_values(params: Params) -> dict[str, Any]:
    """The current train params as values of the space (those inside it)."""
    values: dict[str, Any] = {}
    for key, dim in params.tune.space.items():
        value = params.train.models[0] if key == "model" else getattr(params.train, key)
        inside = (
            value in dim.choices
            if isinstance(dim, ChoiceDim)
            else dim.low <= float(value) <= dim.high
        )
        if inside:
            values[key] = value
    return values


class _Objective:
    """One trial: sample, train in a scratch folder, report every epoch, prune."""

    def __init__(
        self,
        params: Params,
        layout: Layout,
        parent: Any,
        threads: int,
        progress: Any,
        task: Any,
    ) -> None:
        self.params, self.layout, self.parent = params, layout, parent
        self.threads, self.progress, self.task = threads, progress, task

    def __call__(self, trial: optuna.Trial) -> float:
        import optuna

        from visionops import registry
        from visionops.train import run_train

        metric = self.params.tune.metric
        values = suggest_values(trial, self.params)
        trial_params = apply_values(self.params, values, self.threads)
        model = trial_params.train.models[0]
        label = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        log.info("trial %d: %s", trial.number, label)
        tags = {"optuna.study": trial.study.study_name, "optuna.trial": trial.number}
        with (
            tempfile.TemporaryDirectory(prefix=f"visionops-trial-{trial.number}-") as scratch,
            registry.nested_run(
                self.parent, f"trial-{trial.number}", tags, finished_on=(optuna.TrialPruned,)
            ) as run,
        ):
            run.log_params({**values, "model": model})
            trial.set_user_attr("mlflow_run_id", run.run_id)

            def on_epoch(metrics: dict[str, float], epoch: int) -> None:
                run.log_metrics(metrics, step=epoch)
                self.progress.update(
                    self.task,
                    status=f"trial {trial.number} epoch {epoch}: {metric} {metrics[metric]:.4f}",
                )
                trial.report(metrics[metric], epoch)
                # After the last epoch there is nothing left to save: the trial completes.
                if epoch < trial_params.train.epochs and trial.should_prune():
                    run.set_tags({"visionops.trial_state": "PRUNED"})
                    raise optuna.TrialPruned(f"{metric} {metrics[metric]:.4f} at epoch {epoch}")

            layout = _TrialLayout(root=Path(scratch), data_root=self.layout.root)
            result = run_train(trial_params, layout, model, on_epoch=on_epoch, show_progress=False)
            value = result.val_accuracy if metric == "val_accuracy" else result.val_loss
            # The per-epoch curves keep their names; the selected epoch's scores get their own.
            final = {k: v for k, v in result.summary().items() if not k.startswith("val_")}
            final.update(
                best_val_accuracy=result.val_accuracy,
                best_val_loss=result.val_loss,
                objective=value,
            )
            run.log_metrics(final)
            run.set_tags({"visionops.trial_state": "COMPLETE"})
        trial.set_user_attr("images_per_second", round(result.images_per_second, 1))
        trial.set_user_attr("epochs_run", result.epochs_run)
        return value


# --------------------------------------------------------------------------- the run


def run_tune(
    params: Params,
    layout: Layout,
    trials: int,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    n_jobs: int = 1,
    params_file: str | Path | None = "params.yaml",
    enqueue: Sequence[Mapping[str, Any]] = (),
) -> TuneResult:
    """Run ``trials`` trials of the study (fewer if ``timeout`` seconds pass first).

    ``n_jobs`` trials run at once in threads, each with ``cores // n_jobs`` torch threads
    (unless ``train.num_threads`` is set). ``enqueue`` adds trials with fixed values
    (keys of the space) before the sampled ones. ``params_file`` is the file whose text
    (comments included) becomes ``tuning/best_params.yaml`` with the best values.
    """
    import optuna

    from visionops import registry
    from visionops.train import _usable_cores, progress_bar, read_prepared_meta

    if trials < 1 or n_jobs < 1:
        raise ConfigError(f"need at least one trial and one job (got {trials} and {n_jobs})")
    if params.train.nproc > 1:
        log.warning("train.nproc=%d is ignored by tuning: trials run alone", params.train.nproc)
    read_prepared_meta(layout)  # fail before a study is created when there is no data
    started = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study_name or default_study_name(params)
    url = resolve_storage(storage, layout)
    baseline = baseline_values(params) if params.tune.enqueue_defaults else None
    study = join_study(params, name, url, baseline, enqueue)
    log.info("study '%s' in %s: %d trial(s) so far", name, display_url(url), len(study.trials))
    threads = params.train.num_threads or max(1, _usable_cores() // n_jobs)

    with ExitStack() as stack:
        with storage_lock(url):  # one MLflow parent run per study, whoever comes first
            parent_id = study.user_attrs.get("mlflow_run_id")
            parent = stack.enter_context(
                registry.tuning_run(name, params, layout, run_id=parent_id)
            )
            if parent.run_id != parent_id:
                study.set_user_attr("mlflow_run_id", parent.run_id)
        parent.set_tags({"optuna.storage": display_url(url), "optuna.study": name})
        with progress_bar() as progress, _quiet("visionops.train"):
            task = progress.add_task(f"tune {name}", total=trials, status="")
            objective = _Objective(params, layout, parent, threads, progress, task)
            done = [0]

            def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
                done[0] += 1
                try:
                    best = f"best {study.best_value:.4f} (#{study.best_trial.number})"
                except ValueError:  # no complete trial yet
                    best = "no complete trial yet"
                state = trial.state.name.lower()
                log.info("trial %d %s: %s; %s", trial.number, state, trial.value, best)
                progress.update(task, completed=done[0], status=best)

            study.optimize(
                objective, n_trials=trials, timeout=timeout, n_jobs=n_jobs, callbacks=[after_trial]
            )
        result = _finish(study, params, layout, url, params_file, done[0], started, parent.run_id)
        parent.log_metrics(result.summary())
        for path in [result.best_params_file, TuningPaths.of(layout).best_json]:
            parent.log_artifact(path)
        for path in result.report_files:
            parent.log_artifact(path, "report")
    return result


@contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Warnings only from ``logger_name`` in the block: each trial gets one line from
    tuning instead of a training run's every epoch (those go to MLflow)."""
    logger = logging.getLogger(logger_name)
    saved = logger.level
    logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        logger.setLevel(saved)


def _finish(
    study: optuna.Study,
    params: Params,
    layout: Layout,
    url: str,
    params_file: str | Path | None,
    trials_run: int,
    started: float,
    run_id: str,
) -> TuneResult:
    """Write best params, best.json and the report; the result."""
    from optuna.trial import TrialState

    all_trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in all_trials) for s in TrialState}
    if not counts[TrialState.COMPLETE]:
        raise ModelError(
            f"study '{study.study_name}': no trial completed ({counts[TrialState.PRUNED]} "
            f"pruned, {counts[TrialState.FAIL]} failed); run more trials or relax the pruner"
        )
    best = study.best_trial
    # The tuned values go into the params *file* as it is on disk: `--set` overrides of the
    # search (fewer epochs, say) stay out; best.json lists them.
    on_disk = _params_on_disk(params_file) or params
    best_params = apply_values(on_disk, best.params)
    searched_with = {
        ".".join(k): v
        for k, v in _leaves(params.model_dump(mode="json")).items()
        if _leaves(on_disk.model_dump(mode="json")).get(k) != v
    }
    baseline = next(
        (t for t in all_trials if t.user_attrs.get("baseline") and t.state == TrialState.COMPLETE),
        None,
    )
    paths = TuningPaths.of(layout)
    paths.root.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best params of Optuna study '{study.study_name}' (trial {best.number}, "
        f"{params.tune.metric} {best.value:.4f}), written by `visionops tune`.\n"
    )
    paths.best_params.write_text(header + best_params_text(best_params, params_file))
    importances = param_importances(study)
    exp_command = dvc_exp_command(on_disk, best_params)
    summary = {
        "study": study.study_name,
        "storage": display_url(url),
        "metric": params.tune.metric,
        "direction": study.direction.name.lower(),
        "best_value": best.value,
        "best_trial": best.number,
        "best_values": best.params,
        "baseline_value": baseline.value if baseline else None,
        "baseline_trial": baseline.number if baseline else None,
        "searched_with": searched_with,
        "trials": {
            "complete": counts[TrialState.COMPLETE],
            "pruned": counts[TrialState.PRUNED],
            "failed": counts[TrialState.FAIL],
            "running": counts[TrialState.RUNNING],
            "total": len(all_trials),
        },
        "importances": importances,
        "params_file": str(paths.best_params.relative_to(layout.root)),
        "dvc_exp_run": exp_command,
        "mlflow_run_id": run_id,
    }
    paths.best_json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    report_files = write_report(study, params, importances, paths)
    return TuneResult(
        study_name=study.study_name,
        storage=display_url(url),
        metric=params.tune.metric,
        direction=study.direction.name.lower(),
        best_value=float(best.value) if best.value is not None else float("nan"),
        best_trial=best.number,
        best_values=dict(best.params),
        baseline_value=float(baseline.value) if baseline and baseline.value is not None else None,
        trials_run=trials_run,
        complete=counts[TrialState.COMPLETE],
        pruned=counts[TrialState.PRUNED],
        failed=counts[TrialState.FAIL],
        seconds=time.perf_counter() - started,
        best_params_file=paths.best_params,
        report_files=report_files,
        importances=importances,
        exp_command=exp_command,
        mlflow_run_id=run_id,
    )


def param_importances(study: optuna.Study) -> dict[str, float]:
    """Optuna's parameter importances (PED-ANOVA), {} while too few trials are complete."""
    import optuna

    try:
        with warnings.catch_warnings():  # "importances will be equal" with few trials
            warnings.simplefilter("ignore", UserWarning)
            importances = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as exc:
        log.info("no parameter importances yet: %s", exc)
        return {}
    return {k: round(float(v), 4) for k, v in importances.items()}


# --------------------------------------------------------------------------- best params file


def yaml_flow(value: Any) -> str:
    """``value`` as one line of YAML (and of DVC's ``-S key=value`` syntax)."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(yaml_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{yaml_flow(str(k))}: {yaml_flow(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z_][\w.-]*", value) and yaml.safe_load(value) == value
        return value if plain else json.dumps(value)
    # PyYAML's float form (1.0e-05, not 1e-05, which YAML 1.1 reads as a string).
    return yaml.safe_dump(value).splitlines()[0]


def _leaves(node: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    if isinstance(node, dict):
        out: dict[tuple[str, ...], Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, (*prefix, str(key))))
        return out
    return {prefix: node}


def _subtree(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        node = node[key]
    return node


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?P<rest>.*)$")


def _split_comment(rest: str) -> tuple[str, str]:
    """``(value part, comment)`` of the text after ``key:``; quotes are respected."""
    quote = ""
    for i, ch in enumerate(rest):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            return rest[:i], rest[i:]
    return rest, ""


def patch_yaml_text(
    text: str, target: Mapping[str, Any], changed: Sequence[tuple[str, ...]]
) -> str | None:
    """``text`` (block-style YAML) with the values at the ``changed`` key paths set to
    those of ``target``, comments and layout kept.

    A path inside a one-line flow value (``lr: {low: 0.001, high: 0.1}``) rewrites that
    whole value. None when a path has no one-line value to replace in ``text``.
    """
    lines = text.splitlines(keepends=True)
    stack: list[tuple[int, str]] = []
    one_line: dict[tuple[str, ...], int] = {}  # key path -> the line holding its value
    for i, line in enumerate(lines):
        m = _KEY_LINE.match(line.rstrip("\r\n"))
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = (*(k for _, k in stack), m["key"])
        stack.append((indent, m["key"]))
        if _split_comment(m["rest"])[0].strip():
            one_line[path] = i
    rewrite: dict[tuple[str, ...], int] = {}
    for path in changed:
        prefix = next((path[:n] for n in range(len(path), 0, -1) if path[:n] in one_line), None)
        if prefix is None:
            return None
        rewrite[prefix] = one_line[prefix]
    for path, i in rewrite.items():
        body = lines[i].rstrip("\r\n")
        newline = lines[i][len(body) :]
        m = _KEY_LINE.match(body)
        assert m is not None
        value_part, comment = _split_comment(m["rest"])
        new_part = " " + yaml_flow(_subtree(target, path))
        if comment:  # keep the comment's column when the new value fits
            width = len(value_part)
            new_part = new_part.ljust(width) if len(new_part) < width else new_part + " "
        lines[i] = f"{m['indent']}{m['key']}:{new_part}{comment}{newline}"
    return "".join(lines)


def best_params_text(best: Params, params_file: str | Path | None) -> str:
    """The params file's text with the values that differ in ``best`` replaced.

    Keeps comments and layout so that copying it over ``params.yaml`` changes only those
    lines; falls back to a plain YAML dump of ``best`` when the file is missing or not in
    a layout this can patch. Either way the text loads back to exactly ``best``.
    """
    from visionops.config import params_to_yaml

    path = Path(params_file) if params_file is not None else None
    if path is not None and path.is_file():
        text = path.read_text()
        try:
            on_disk = params_from_dict(yaml.safe_load(text) or {}, source=str(path))
        except (ConfigError, yaml.YAMLError):
            on_disk = None
        if on_disk is not None:
            target = best.model_dump(mode="json")
            old = _leaves(on_disk.model_dump(mode="json"))
            changed = [k for k, v in _leaves(target).items() if old.get(k, object()) != v]
            patched = patch_yaml_text(text, target, changed)
            if patched is not None and _loads_to(patched, best):
                return patched
        log.info("%s: cannot patch it in place; writing the full params instead", path)
    return params_to_yaml(best)


def _loads_to(text: str, params: Params) -> bool:
    try:
        return params_from_dict(yaml.safe_load(text) or {}) == params
    except (ConfigError, yaml.YAMLError):
        return False


def dvc_exp_command(params: Params, best: Params) -> str:
    """``dvc exp run -S train.lr=... ...``: the params that differ, as a command."""
    old = _leaves(params.model_dump(mode="json"))
    sets = [
        f"{'.'.join(k)}={yaml_flow(v)}"
        for k, v in _leaves(best.model_dump(mode="json")).items()
        if old.get(k) != v
    ]
    return shlex.join(["dvc", "exp", "run", *[a for s in sets for a in ("-S", s)]])


def _params_on_disk(params_file: str | Path | None) -> Params | None:
    """The params file without overrides (None when absent or unreadable)."""
    from visionops.config import load_params

    if params_file is None or not Path(params_file).is_file():
        return None
    try:
        return load_params(params_file)
    except ConfigError:
        return None


# --------------------------------------------------------------------------- report


def _figure(width: float, height: float) -> Figure:
    # A bare Figure with the Agg canvas: no pyplot, no global backend, thread-safe.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _shown_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """A trial's value, or its last reported one (a pruned trial may have no value)."""
    if trial.value is not None:
        return float(trial.value)
    step = trial.last_step
    return None if step is None else float(trial.intermediate_values[step])


def plot_history(study: optuna.Study, metric: str) -> Figure:
    """Objective per trial (complete and pruned) and the running best."""
    from optuna.trial import TrialState

    fig = _figure(7, 4)
    ax = fig.add_subplot(1, 1, 1)
    maximize = study.direction.name.lower() == "maximize"
    best_x, best_y, running = [], [], None
    for state, marker, colour in (
        (TrialState.COMPLETE, "o", "tab:blue"),
        (TrialState.PRUNED, "x", "tab:grey"),
    ):
        trials = study.get_trials(deepcopy=False, states=(state,))
        pts = [(t.number, v) for t in trials if (v := _shown_value(t)) is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            label = f"{state.name.lower()} ({len(pts)})"
            ax.scatter(xs, ys, marker=marker, color=colour, label=label, zorder=3)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        value = float(t.value) if t.value is not None else None
        if value is None:
            continue
        if running is None or (value > running if maximize else value < running):
            running = value
        best_x.append(t.number)
        best_y.append(running)
    if best_x:
        ax.step(best_x, best_y, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.set_title(f"Optimisation history: {study.study_name}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right" if maximize else "upper right")
    fig.tight_layout()
    return fig


def plot_importances(importances: Mapping[str, float]) -> Figure:
    """Horizontal bars of the parameter importances."""
    fig = _figure(7, 0.5 + 0.45 * max(1, len(importances)))
    ax = fig.add_subplot(1, 1, 1)
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:blue")
        ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    else:
        ax.text(0.5, 0.5, "too few complete trials", ha="center", va="center")
        ax.set_axis_off()
    ax.set_title("Parameter importances")
    fig.tight_layout()
    return fig


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_report(
    study: optuna.Study, params: Params, importances: Mapping[str, float], paths: TuningPaths
) -> list[Path]:
    """``history.png``, ``importances.png`` and ``report.html`` (images embedded)."""
    import html

    plot_history(study, params.tune.metric).savefig(paths.history_png, format="png")
    plot_importances(importances).savefig(paths.importances_png, format="png")
    keys = list(params.tune.space)
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = t.duration.total_seconds() if t.duration else None
        cells = [
            str(t.number),
            t.state.name.lower() + (" (baseline)" if t.user_attrs.get("baseline") else ""),
            f"{t.value:.4f}" if t.value is not None else "",
            str(t.last_step or ""),
            *(_short(t.params[k]) if k in t.params else "" for k in keys),
            f"{seconds:.0f}" if seconds is not None else "",
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = ["trial", "state", params.tune.metric, "epochs", *keys, "seconds"]
    table = (
        "<table><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + "</table>"
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tuning: {html.escape(study.study_name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2rem;max-width:70rem}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem;text-align:right}}
img{{max-width:100%}}</style></head><body>
<h1>Tuning study {html.escape(study.study_name)}</h1>
<p>{len(study.trials)} trials; metric {html.escape(params.tune.metric)}
({html.escape(study.direction.name.lower())}); best params in
<code>tuning/best_params.yaml</code>.</p>
<img alt="optimisation history" src="{_png_data_uri(paths.history_png)}">
<img alt="parameter importances" src="{_png_data_uri(paths.importances_png)}">
<h2>Trials</h2>
{table}
</body></html>
"""
    paths.report_html.write_text(page)
    return [paths.history_png, paths.importances_png, paths.report_html]
