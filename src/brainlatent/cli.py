"""`brainlatent <stage>`: one thin command per pipeline stage.

Each command reads params.yaml (validated before any work), applies ``--set key=value`` overrides, calls
the library and prints where its outputs went. The DVC stages in dvc.yaml call exactly these commands.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
import yaml

from brainlatent.config import ConfigError, Params, load_params

app = typer.Typer(
    help="Generative models of 3D brain MRI with DVC pipelines, MLflow tracking and latent directions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Parameters file.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a parameter, e.g. --set data.shape=[16,16,16] (repeatable)."),
]


def _load(params_path: Path, overrides: list[str] | None) -> Params:
    parsed = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. data.workers=1")
        key, value = item.split("=", 1)
        parsed[key.strip()] = yaml.safe_load(value)
    return load_params(params_path, parsed)


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user can fix: bad params or input, and a tracking store that cannot be used (server down, no
    driver). TrackingError is looked up only once tracking.py is imported (only then can it have been raised):
    importing it here would load MLflow, seconds of start-up, for `--help` and the stages that never track."""
    tracking = sys.modules.get("brainlatent.tracking")
    return (ConfigError, ValueError, FileNotFoundError) + ((tracking.TrackingError,) if tracking else ())


def _fail(err: Exception) -> NoReturn:
    """The one `error: ...` line on stderr and exit code 2."""
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from None


def _run(fn):
    """Turn user mistakes (ValueError and friends) into one clear line and exit code 2, not a traceback."""
    import time

    start = time.perf_counter()
    try:
        result = fn()
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"done in {time.perf_counter() - start:.1f} s")
    return result


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )


@app.command()
def synth(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Build the synthetic HCP-layout cohort with planted sex and age effects (DVC stage `synthesize`)."""

    def go():
        from brainlatent.data.synthetic import synthesize

        p = _load(params, set_)
        out = synthesize(p.synth)
        typer.echo(f"synthetic cohort: {p.synth.n_subjects} subjects written to {out}")

    _run(go)


@app.command()
def prepare(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Load the cohort (synthetic, HCP or manifest), preprocess it and write data/processed (DVC stage `prepare`)."""

    def go():
        from brainlatent.data.preprocess import prepare as run_prepare

        p = _load(params, set_)
        result = run_prepare(p.data)
        typer.echo(
            f"prepared {result.n_accepted} subjects ({result.n_rejected} rejected) into {result.out_dir}"
        )

    _run(go)


@app.command()
def plant(
    out: Annotated[Path, typer.Option(help="Folder of the new cohort (manifest.csv, images/, planted.json, map).")],
    effect: Annotated[str, typer.Option(help="enlarge (an atlas region), scale (the brain) or intensity.")] = "enlarge",
    region: Annotated[str, typer.Option(help="enlarge / intensity: an anatomy.LOCAL_REGIONS key.")] = "occipital_poles",
    magnitude: Annotated[float, typer.Option(help="enlarge: region volume x(1+m); scale: brain volume x(1+m); "
                                                  "intensity: x(1+m) at the region centres.")] = 0.3,
    seed: Annotated[int, typer.Option(help="Chooses the planted half and the sub-voxel shifts.")] = 0,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Positive control: plant a known effect into a seeded half of the cohort `data` describes, as a new
    manifest cohort with a `planted` label (docs/positive_controls.md). The input is never modified."""

    def go():
        from pydantic import ValidationError

        from brainlatent.data.plant import PlantSpec
        from brainlatent.data.plant import plant as run_plant

        p = _load(params, set_)
        try:
            spec = PlantSpec(effect=effect, region=region, magnitude=magnitude, seed=seed)
        except ValidationError as err:  # one clear line, like every other bad input
            messages = [e["msg"].removeprefix("Value error, ") for e in err.errors()]
            raise ValueError("plant: " + "; ".join(messages)) from None
        result = run_plant(spec, p.data, out)
        covariates = ",".join(p.data.covariates)
        typer.echo(
            f"planted {spec.effect} into {result.n_planted} subjects ({result.n_control} controls, "
            f"{len(result.rejected)} left out) -> {result.manifest}\n  next: brainlatent prepare "
            f"--set data.source=manifest --set data.path={result.manifest}"
            + (f" --set data.covariates=[{covariates}]" if covariates else "")
        )

    _run(go)


FamilyOpt = Annotated[str, typer.Option("--model", "-m", help="Model family: ae, vae, gan or stylegan.")]
ModelUriOpt = Annotated[
    Optional[str],
    typer.Option(help="Use this registered version (models:/<name>@<alias> or models:/<name>/<version>) instead of "
                 "the one train@<family> registered (trained/<family>.json). Its results stay out of the DVC outputs."),
]


@app.command()
def train(
    model: FamilyOpt,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an unfinished checkpoint of the same config and data, in its MLflow run.")
    ] = False,
    stop_after_epoch: Annotated[
        Optional[int], typer.Option(help="Checkpoint and stop after this epoch (resume later with --resume).")
    ] = None,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            envvar="BRAINLATENT_NPROC_PER_NODE", min=1,
            help="Train with this many processes on this node (one per GPU) by starting torchrun; the batch "
            "size stays the global one. Ignored inside torchrun.",
        ),
    ] = 1,
) -> None:
    """Train one model family, log it to MLflow and register it (DVC stage `train@<family>`).

    Multi-GPU / multi-node: run it under torchrun (`torchrun --nproc-per-node 4 -m brainlatent.cli train ...`),
    or set BRAINLATENT_NPROC_PER_NODE for a single node (it works through `dvc repro` too)."""
    from brainlatent.train import distributed

    if nproc_per_node > 1 and not distributed.launched():
        raise typer.Exit(_torchrun_train(nproc_per_node, model, params, set_, resume, stop_after_epoch))
    rank0 = distributed.env_rank() == 0
    if not rank0:  # one log, one progress bar, one summary: rank 0's
        logging.getLogger("brainlatent").setLevel(logging.WARNING)

    def go():
        from brainlatent.train.runner import train_family
        from brainlatent.tuning import resolve_tuned

        tuned = resolve_tuned(_load(params, set_), model)
        out = train_family(model, tuned.params, resume=resume, stop_after_epoch=stop_after_epoch, tuned=tuned)
        distributed.cleanup()
        if not rank0:
            return
        state = "finished" if out.finished else "stopped (resumable)"
        typer.echo(f"{model}: {state}; MLflow run {out.run_id}\n  {out.run_url}")
        if out.model_version:
            typer.echo(f"  registered brainlatent-{model} version {out.model_version} (alias candidate; "
                       f"trained/{model}.json names it for evaluate@{model} and directions@{model})")
        for key, (mine, theirs) in tuned.overridden.items():
            typer.echo(f"  note: {model}.{key} = {theirs!r} from tuning, not params.yaml's {mine!r} "
                       f"(pin it with tune.pinned.{model}, docs/tuning.md)")
        keys = [k for k in ("val/mse", "val/psnr", "val/ssim", "val/proxy") if k in out.metrics]
        typer.echo("  " + "  ".join(f"{k}={out.metrics[k]:.4g}" for k in keys))

    _run(go)


def _torchrun_train(nproc: int, model, params, set_, resume, stop_after_epoch) -> int:
    """Run this same train command under torchrun with ``nproc`` processes on this node; its exit code."""
    import subprocess
    import sys

    args = ["train", "--model", model, "--params", str(params), "--resume" if resume else "--no-resume"]
    for item in set_ or []:
        args += ["--set", item]
    if stop_after_epoch is not None:
        args += ["--stop-after-epoch", str(stop_after_epoch)]
    if logging.getLogger().level == logging.DEBUG:
        args.insert(0, "--verbose")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "brainlatent.cli", *args]
    typer.echo(f"starting {nproc} training processes: {' '.join(cmd[1:])}")
    return subprocess.call(cmd)


@app.command()
def tune(model: FamilyOpt, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run (or join) the family's Optuna study; writes tuned/<family>.json for `train` (DVC stage `tune@<family>`).

    Start the same command in more shells or machines with a shared storage to add workers (docs/tuning.md)."""

    def go():
        from brainlatent.tuning import tune_family

        out = tune_family(model, _load(params, set_))
        if out.skipped:
            typer.echo(f"{model}: tuning switched off (tune.families); train uses params.yaml as is -> {out.path}")
            return
        typer.echo(
            f"{model}: study {out.study}: {out.n_complete} complete, {out.n_pruned} pruned, {out.n_failed} failed; "
            f"best {out.metric}={out.best_value:.4g} (trial {out.best_trial}) {out.best_params}\n  -> {out.path}"
        )

    _run(go)


@app.command()
def featurenet(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Train and register the feature network behind 3D FID/KID (DVC stage `featurenet`)."""

    def go():
        from brainlatent.evaluation import train_featurenet

        out = train_featurenet(_load(params, set_))
        typer.echo(f"featurenet: version {out.model_version}; " + _fmt(out.metrics) + f"\n  {out.run_url}")

    _run(go)


@app.command()
def evaluate(
    model: FamilyOpt, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, model_uri: ModelUriOpt = None
) -> None:
    """Metrics of the model train@<family> registered, then the champion decision (DVC stage `evaluate@<family>`)."""

    def go():
        from brainlatent.evaluation import evaluate_family

        out = evaluate_family(model, _load(params, set_), model_uri=model_uri)
        typer.echo(f"{model} v{out.model_version}: " + _fmt(out.metrics) + f"\n  {out.champion.reason}"
                   f"\n  {out.run_url}")

    _run(go)


@app.command()
def directions(
    model: FamilyOpt, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, model_uri: ModelUriOpt = None
) -> None:
    """Probe the latent space for sex and age, fit directions, traverse, measure (DVC stage `directions@<family>`)."""

    def go():
        from brainlatent.directions.experiment import run_directions

        out = run_directions(model, _load(params, set_), model_uri=model_uri)
        typer.echo(f"{model}: outputs in {out.out_dir}; " + _fmt(out.metrics, 8) + f"\n  {out.run_url}")

    _run(go)


@app.command()
def report(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Compare every registered champion: tables, sample figure, metric plots (DVC stage `report`)."""

    def go():
        from brainlatent.report import build_report

        out = build_report(_load(params, set_))
        typer.echo(f"report written to {out.out_dir} ({len(out.table)} models)\n  {out.run_url}")

    _run(go)


@app.command()
def traverse(
    model_uri: Annotated[str, typer.Option(help="Registered model, e.g. models:/brainlatent-vae@champion.")],
    input: Annotated[Path, typer.Option("--input", "-i", help="A T1w NIfTI (brain-extracted).")],
    direction: Annotated[str, typer.Option(help="A fitted direction: sex, age_old, age_group, sex_size_controlled.")],
    steps: Annotated[str, typer.Option(help="Comma-separated steps in SDs of the latent projection.")] = "-2,-1,0,1,2",
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("traversal"),
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Move a user's scan along a fitted latent direction; writes one NIfTI per step and a PNG strip."""

    def go():
        from brainlatent.directions.scan import traverse_scan

        try:
            values = [float(v) for v in steps.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--steps {steps!r}: expected comma-separated numbers, e.g. -2,-1,0,1,2") from None
        p = _load(params, set_)
        from brainlatent import tracking

        tracking.configure()
        files = traverse_scan(model_uri, input, direction, values, out, p)
        typer.echo(f"{len(files)} files written to {out}")

    _run(go)


@app.command()
def show(uri: Annotated[str, typer.Argument(help="models:/<name>@<alias> or models:/<name>/<version>.")]) -> None:
    """A registered model version: aliases, metrics, lineage (git commit, data hash), source run."""

    def go():
        from brainlatent import tracking
        from brainlatent.registry import describe_version

        tracking.configure()
        typer.echo(describe_version(uri))

    _run(go)


@app.command()
def ui(
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[str, typer.Option(help="Bind address; keep 127.0.0.1 unless you know why.")] = "127.0.0.1",
) -> None:
    """Start the MLflow UI on the project's store (127.0.0.1 by default)."""
    import os
    import subprocess

    from brainlatent import tracking

    uri = tracking.tracking_uri()
    try:
        tracking.configure()  # a server or database that does not answer: one line, not `mlflow server`'s traceback
        if uri.startswith(("http://", "https://")):
            raise ValueError(f"MLFLOW_TRACKING_URI is the tracking server {tracking.redact_url(uri)}: open its UI "
                             "there (`brainlatent ui` serves a SQLite or database store)")
    except _user_errors() as err:
        _fail(err)
    art = (tracking.project_root() / "mlartifacts").as_uri()
    typer.echo(f"MLflow UI on http://{host}:{port} (store {tracking.redact_url(uri)})")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port)]
    if uri.startswith("sqlite:"):
        cmd += ["--default-artifact-root", art]
    raise typer.Exit(subprocess.call(cmd, env=os.environ.copy()))


def _fmt(metrics: dict, limit: int = 6) -> str:
    keys = list(metrics)[:limit]
    return "  ".join(f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys)


@app.command("registry")
def registry_cmd() -> None:
    """List registered models, their versions, aliases and key metrics."""

    def go():
        from brainlatent import tracking
        from brainlatent.registry import describe_registry

        tracking.configure()
        typer.echo(describe_registry())

    _run(go)


if __name__ == "__main__":  # pragma: no cover
    app()
