"""The `fusionrank` command line. Heavy libraries are imported inside each command so `--help` stays fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fusionrank import __version__
from fusionrank.errors import FusionrankError

app = typer.Typer(
    help="Train, gate and ship an e-commerce ranker that fuses a fine-tuned BERT with classic signals.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(
    help="Real data sources: fetch, check and convert to canonical tables.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

# Offline and quiet by default; a user may still override each one in the environment.
QUIET_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "BENTOML_DO_NOT_TRACK": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder holding the sources' files (default: $FUSIONRANK_DATA_DIR, else ../shared/data when it "
        "exists, else ~/.cache/fusionrank/data).",
        show_default=False,
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"fusionrank {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """fusionrank: compile, run and schedule the training pipeline; promote, roll back and serve models."""
    for key, value in QUIET_OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def run_cli() -> None:
    """Entry point that turns expected errors into one clear line and exit code 2, without a traceback."""
    try:
        # without standalone mode click returns a command's exit code instead of exiting with it
        code = app(standalone_mode=False)
    except FusionrankError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err_console.print("aborted")
        raise SystemExit(130) from None
    except Exception as exc:  # click's usage errors carry their own exit code and message
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            raise SystemExit(exc.exit_code) from None
        raise
    if isinstance(code, int):
        raise SystemExit(code)


@data_app.command("list")
def data_list(data_dir: DataDirOption = None) -> None:
    """List the known sources and whether a checked copy is present."""
    from fusionrank.data.sources import SOURCES, default_data_dir, verify_files

    directory = data_dir or default_data_dir()
    table = Table("source", "mode", "files", f"present in {directory}")
    for source in SOURCES.values():
        try:
            verify_files(source, directory)
            state = "[green]yes, checksums ok[/]"
        except FusionrankError as exc:
            state = f"[yellow]no[/] ({str(exc).split(':', 1)[-1].strip()[:60]}...)"
        table.add_row(source.name, source.mode, str(len(source.files)), state)
    console.print(table)


@data_app.command("pull")
def data_pull(
    name: Annotated[str, typer.Argument(help="Source name: homedepot or amazon-games.")],
    data_dir: DataDirOption = None,
    mirror: Annotated[
        str | None,
        typer.Option(
            help="Base URL holding the same relative paths (default: the public origin, pinned commit)."
        ),
    ] = None,
) -> None:
    """Fetch a source's files (SHA-256 checked); a local copy with the right checksum needs no network."""
    from fusionrank.data.sources import pull_source

    pull_source(name, data_dir, mirror=mirror, log=lambda line: console.print(line, highlight=False))


@data_app.command("ingest")
def data_ingest(
    name: Annotated[
        str, typer.Argument(help="Source name, or parquet:DIR for canonical tables of your own.")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the canonical parquet tables to.")],
    data_dir: DataDirOption = None,
    max_queries: Annotated[int, typer.Option(help="Keep this many whole queries (0 = all).")] = 0,
    max_users: Annotated[int, typer.Option(help="Keep this many whole user histories (0 = all).")] = 0,
    seed: int = 0,
) -> None:
    """Convert a source into the canonical tables (products, interactions, judgments) as parquet."""
    from fusionrank.data.ingest import ingest

    manifest = ingest(name, out, data_dir=data_dir, max_queries=max_queries, max_users=max_users, seed=seed)
    _print_manifest(manifest)


def _print_manifest(manifest: dict) -> None:
    table = Table("table", "rows", title=f"{manifest['source']}  (sha256 {manifest['data_hash'][:16]}...)")
    for name, rows in manifest["rows"].items():
        table.add_row(name, f"{rows:,}")
    for name, value in manifest["counts"].items():
        table.add_row(name, f"{value:,}")
    console.print(table)


@app.command()
def validate(
    name: Annotated[
        str, typer.Argument(help="Source name, or parquet:DIR for canonical tables of your own.")
    ],
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Folder for validation.html and validation.json.")] = Path(
        "runs/validation"
    ),
) -> None:
    """Validate a dataset against the expectation suites; exit code 1 when an expectation fails."""
    from fusionrank.data.ingest import load_tables
    from fusionrank.validation import validate_tables

    tables, sources = load_tables(name, data_dir)
    outcome = validate_tables(tables, sources=sources)
    out.mkdir(parents=True, exist_ok=True)
    outcome.write_html(out / "validation.html")
    outcome.write_json(out / "validation.json")
    console.print(outcome.summary(), highlight=False)
    console.print(f"report: {out / 'validation.html'}\nresult: {out / 'validation.json'}")
    if not outcome.success:
        raise typer.Exit(1)


@app.command()
def evaluate(
    dataset: Annotated[str, typer.Argument(help="homedepot or amazon-games.")],
    data_dir: DataDirOption = None,
    out: Annotated[Path, typer.Option(help="Folder for report.json and report.md.")] = Path(
        "reports/baselines"
    ),
    max_queries: Annotated[int, typer.Option(help="Sample this many queries (0 = all).")] = 0,
    max_users: Annotated[int, typer.Option(help="Sample this many users (0 = all).")] = 0,
) -> None:
    """The traditional baselines on the test split, beside the published figures (LLMRank, Kaggle)."""
    from fusionrank.protocols import baseline_report

    baseline_report(
        dataset,
        data_dir=data_dir,
        out_dir=out,
        max_queries=max_queries,
        max_users=max_users,
        log=lambda line: console.print(line, highlight=False),
    )
    from rich.markdown import Markdown

    console.print(Markdown((out / "report.md").read_text()))


@app.command()
def finetune(
    source: Annotated[str, typer.Argument(help="homedepot, amazon-games, or parquet:DIR.")],
    out: Annotated[Path, typer.Option(help="Folder for the checkpoint (out/model) and its training.json.")],
    data_dir: DataDirOption = None,
    max_queries: Annotated[int, typer.Option(help="Sample this many queries first (0 = all).")] = 0,
    max_users: Annotated[int, typer.Option(help="Sample this many users first (0 = all).")] = 0,
    max_train_samples: Annotated[int, typer.Option(help="Training queries/users to use (0 = all).")] = 0,
    epochs: int = 1,
    batch_size: int = 32,
    max_length: int = 64,
    learning_rate: float = 3e-4,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (0 = no limit).")] = 0,
    base_model: Annotated[
        Path | None, typer.Option(help="Pretrained model folder (default: MiniLM).")
    ] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="A tiny random BERT (smoke runs).")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    seed: int = 0,
) -> None:
    """Fine-tune the BERT cross-encoder on a source, as the pipeline's finetune step does."""
    from fusionrank.bert import FinetuneConfig
    from fusionrank.steps import finetune_source

    config = FinetuneConfig(
        epochs=epochs,
        batch_size=batch_size,
        max_length=max_length,
        learning_rate=learning_rate,
        max_steps=max_steps or None,
        compile=compile_model,
        seed=seed,
    )
    metrics = finetune_source(
        source,
        out,
        config,
        data_dir=data_dir,
        max_queries=max_queries,
        max_users=max_users,
        max_train_samples=max_train_samples,
        base_model=base_model,
        tiny=tiny,
        seed=seed,
    )
    console.print(_json({k: v for k, v in metrics.items() if not isinstance(v, list | dict)}))
    console.print(f"checkpoint: {out / 'model'}")


def _json(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)


ParamOption = Annotated[
    list[str] | None,
    typer.Option(
        "--param", "-p", help="Pipeline parameter as key=value (repeatable); see `fusionrank params`."
    ),
]
HomeOption = Annotated[
    Path | None,
    typer.Option(
        "--home",
        help="Local state folder: registry, BentoML store, run artifacts "
        "(default: $FUSIONRANK_HOME or .fusionrank).",
    ),
]
RegistryOption = Annotated[
    str | None,
    typer.Option(
        "--registry-uri",
        help="MLflow registry URI (default: $FUSIONRANK_REGISTRY_URI, "
        "else the local SQLite registry under --home).",
    ),
]
ModelOption = Annotated[str, typer.Option("--model", help="Registered model name.")]


@app.command("params")
def show_params() -> None:
    """List the pipeline's parameters with their defaults and the local run's embedded defaults."""
    from fusionrank.orchestration import FULL_OVERRIDES, LOCAL_DEFAULTS
    from pipelines.training import training_pipeline

    table = Table("parameter", "type", "pipeline default", "make run", "--full")
    for name, spec in training_pipeline.component_spec.inputs.items():
        table.add_row(
            name,
            spec.type,
            _json(spec.default) if spec.default is not None else "",
            str(LOCAL_DEFAULTS.get(name, "")),
            str(FULL_OVERRIDES.get(name, "")),
        )
    console.print(table)


@app.command("compile")
def compile_cmd(
    output: Annotated[Path, typer.Option(help="Where to write the KFP IR YAML.")] = Path(
        "build/fusionrank-pipeline.yaml"
    ),
) -> None:
    """Compile the training pipeline to KFP IR YAML (for a cluster, or `kfp` tooling)."""
    from fusionrank.orchestration import compile_pipeline

    console.print(f"wrote {compile_pipeline(output)}")


@app.command("run")
def run_cmd(
    local: Annotated[
        bool, typer.Option("--local", help="Run the whole DAG on this machine (kfp.local).")
    ] = False,
    full: Annotated[
        bool, typer.Option("--full", help="All the data instead of the local sample (GPU advised).")
    ] = False,
    source: Annotated[
        str | None, typer.Option(help="Data source: homedepot, amazon-games, or parquet:DIR.")
    ] = None,
    tiny: Annotated[
        bool, typer.Option("--tiny", help="A tiny random BERT instead of MiniLM (smoke runs).")
    ] = False,
    gate_config: Annotated[
        Path | None, typer.Option(help="Gate config (YAML/JSON); see conf/gate.yaml.")
    ] = None,
    force_gate: Annotated[str | None, typer.Option(help="Force the gate: approve or reject.")] = None,
    param: ParamOption = None,
    home: HomeOption = None,
    runner: Annotated[
        str,
        typer.Option(
            help="subprocess: every step in this environment; container: every step in its image "
            "(podman, after `make image`)."
        ),
    ] = "subprocess",
) -> None:
    """Run the training pipeline; `--local` runs every step here and prints the evaluation and decision."""
    from fusionrank.orchestration import FULL_OVERRIDES, LOCAL_DEFAULTS, RUNNERS, parse_params, run_local

    if not local:
        raise FusionrankError(
            "use `fusionrank run --local` here, or `fusionrank submit --host URL` for a cluster"
        )
    params: dict[str, object] = dict(LOCAL_DEFAULTS)
    if full:
        params.update(FULL_OVERRIDES)
    if source:
        params["source"] = source
    if tiny:
        params["tiny_model"] = True
    gate = _gate_params(gate_config, force_gate)
    if gate is not None:
        params["gate_config"] = gate
    params.update(parse_params(param or []))
    if runner not in RUNNERS:
        raise FusionrankError(f"--runner takes {' or '.join(RUNNERS)}, not {runner!r}")
    console.print(f"[bold]fusionrank run --local --runner {runner}[/] {_json(params)}", highlight=False)
    result = run_local(params, home, runner=runner)
    _print_local_run(result)
    if result.error is not None:
        from fusionrank.orchestration import describe_failure

        err_console.print(f"[bold red]run failed:[/] {describe_failure(result)}", highlight=False)
        raise typer.Exit(1)


def _gate_params(path: Path | None, force: str | None) -> dict | None:
    from fusionrank.orchestration import load_gate_config
    from pipelines.training import DEFAULT_GATE

    config = load_gate_config(path)
    if force is None:
        return config
    if force not in ("approve", "reject", "auto"):
        raise FusionrankError(f"--force-gate takes approve, reject or auto, not {force!r}")
    return {**(config or DEFAULT_GATE), "force": force}


def _print_local_run(result) -> None:
    from fusionrank.orchestration import STEP_ORDER

    times = Table("step", "seconds", title=f"local run: {result.seconds:.0f} s in all")
    for step, seconds in sorted(
        result.step_seconds.items(), key=lambda kv: kv[1] and list(result.step_seconds).index(kv[0])
    ):
        times.add_row(step, f"{seconds:.1f}")
    console.print(times)
    table = result.artifact("evaluate", "table")
    if table is not None:
        from rich.markdown import Markdown

        console.print(Markdown(table.read_text()))
    decision = result.artifact("gate", "decision")
    if decision is not None:
        data = json.loads(decision.read_text())
        verdict = "[green]APPROVED[/]" if data["approved"] else "[red]REJECTED[/]"
        console.print(f"gate: {verdict}")
        for reason in data["reasons"]:
            console.print(f"  - {reason}", highlight=False)
    if result.outcome:
        console.print(f"outcome: {result.outcome}")
    if result.run_dir is not None:
        console.print(f"artifacts: {result.run_dir}")
        for step in STEP_ORDER:
            if result.ran(step):
                for path in sorted((result.run_dir / step).iterdir()):
                    console.print(f"  {step}/{path.name}", highlight=False)


@app.command("check-image")
def check_image_cmd(
    run: Annotated[
        Path | None,
        typer.Option(
            help="A finished local run that took the approved branch "
            "(default: the latest such run under --home)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the check's outputs.")] = Path("build/image-check"),
    home: HomeOption = None,
) -> None:
    """Run every executor of the compiled pipeline, with its exact command, in the built image (`make image`).

    Inputs come from a finished local run; each executor must exit 0 and write every output it declares.
    """
    from components.images import CPU_IMAGE, GPU_IMAGE
    from fusionrank.containers import check_failures, check_image
    from fusionrank.orchestration import latest_approved_run, local_home

    run_dir = run or latest_approved_run(local_home(home))
    console.print(f"checking {CPU_IMAGE} against the compiled pipeline, with the inputs of {run_dir}")
    console.print(f"(locally the fine-tuning step, whose executor names {GPU_IMAGE}, runs in the CPU image)")
    results = check_image(run_dir, out)
    table = Table("executor", "task", "exit", "seconds", "outputs written", "missing", title="image check")
    for r in results:
        table.add_row(
            r.executor,
            r.task,
            str(r.exit_code),
            f"{r.seconds:.1f}",
            ", ".join(r.outputs),
            f"[red]{', '.join(r.missing)}[/]" if r.missing else "",
        )
    console.print(table)
    failures = check_failures(results)
    if failures:
        err_console.print(f"[bold red]image check failed:[/]\n{failures}", highlight=False)
        raise typer.Exit(1)
    console.print(f"[green]all {len(results)} executors ran in the image and wrote their outputs[/]")


@app.command()
def submit(
    host: Annotated[
        str, typer.Option(help="Kubeflow Pipelines API endpoint, e.g. https://kubeflow.example.com/pipeline.")
    ],
    experiment: Annotated[str, typer.Option(help="KFP experiment name.")] = "fusionrank",
    namespace: Annotated[
        str | None, typer.Option(help="Kubeflow profile namespace (multi-user installs).")
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Display name of the run.")] = None,
    param: ParamOption = None,
) -> None:
    """Compile the pipeline and create a run of it on a Kubeflow cluster."""
    from fusionrank.orchestration import parse_params
    from fusionrank.orchestration import submit as submit_run

    run_id = submit_run(host, parse_params(param or []), experiment, namespace, run_name)
    console.print(f"created run {run_id} on {host}")


@app.command()
def schedule(
    host: Annotated[str, typer.Option(help="Kubeflow Pipelines API endpoint.")],
    cron: Annotated[
        str, typer.Option(help="Six-field cron, seconds first: '0 0 3 * * *' is daily at 03:00.")
    ],
    name: Annotated[
        str, typer.Option(help="Recurring run name (one per name: re-running replaces it).")
    ] = "fusionrank-retraining",
    experiment: Annotated[str, typer.Option(help="KFP experiment name.")] = "fusionrank",
    namespace: Annotated[str | None, typer.Option(help="Kubeflow profile namespace.")] = None,
    param: ParamOption = None,
) -> None:
    """Create or update the recurring retraining run (max one at a time, no catch-up)."""
    from fusionrank.orchestration import parse_params
    from fusionrank.orchestration import schedule as schedule_run

    job = schedule_run(host, cron, parse_params(param or []), experiment, namespace, name)
    console.print(f"recurring run {name!r} ({job}) scheduled: {cron}")


def _registry(registry_uri: str | None, home: Path | None, model: str):
    from fusionrank.orchestration import local_home
    from fusionrank.registry import REGISTRY_URI_ENV, Registry, local_registry_uri

    uri = registry_uri or os.environ.get(REGISTRY_URI_ENV) or local_registry_uri(local_home(home))
    return Registry(uri, model)


@app.command()
def models(
    model: ModelOption = "fusionrank-homedepot", registry_uri: RegistryOption = None, home: HomeOption = None
) -> None:
    """List the registered versions with their aliases, lineage tags and headline metrics."""
    registry = _registry(registry_uri, home, model)
    table = Table(
        "version",
        "aliases",
        "ndcg@10",
        "data hash",
        "feature service",
        "git",
        title=f"{model} @ {registry.uri}",
    )
    for v in registry.versions():
        table.add_row(
            str(v.version),
            ", ".join(v.aliases),
            f"{v.metrics['ndcg@10']:.4f}" if "ndcg@10" in v.metrics else "",
            v.tags.get("data_hash", "")[:12],
            v.tags.get("feature_service", ""),
            v.tags.get("git_revision", "")[:10],
        )
    console.print(table)


@app.command()
def promote(
    version: Annotated[int, typer.Argument(help="The version to make champion.")],
    model: ModelOption = "fusionrank-homedepot",
    registry_uri: RegistryOption = None,
    home: HomeOption = None,
) -> None:
    """Make VERSION the champion; the current champion becomes `previous`."""
    info = _registry(registry_uri, home, model).promote(version)
    console.print(f"{model} version {info.version} is champion (aliases: {', '.join(info.aliases)})")


@app.command()
def serve(
    model: ModelOption = "fusionrank-homedepot",
    version: Annotated[int | None, typer.Option(help="Serve this version instead of the champion.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 3000,
    registry_uri: RegistryOption = None,
    home: HomeOption = None,
) -> None:
    """Serve the champion (or --version) over HTTP with `bentoml serve`: POST /rank, GET /readyz, /metrics."""
    import subprocess
    import sys

    from fusionrank.orchestration import local_home

    registry = _registry(registry_uri, home, model)
    info = registry.get(version) if version is not None else registry.champion()
    if info is None:
        raise FusionrankError(
            f"model '{model}' has no champion yet; run the pipeline or `fusionrank promote`"
        )
    bento = info.tags.get("bento")
    if not bento:
        raise FusionrankError(f"{model} version {info.version} names no Bento (tag 'bento' missing)")
    env = {**os.environ, "BENTOML_HOME": os.environ.get("BENTOML_HOME", str(local_home(home) / "bentoml"))}
    console.print(f"serving {model} version {info.version} ({bento}) on http://{host}:{port}")
    bentoml = [sys.executable, "-m", "bentoml", "serve", bento, "--host", host, "--port", str(port)]
    raise typer.Exit(subprocess.call(bentoml, env=env))


@app.command()
def rollback(
    model: ModelOption = "fusionrank-homedepot", registry_uri: RegistryOption = None, home: HomeOption = None
) -> None:
    """Restore the `previous` version as champion, in one step."""
    info = _registry(registry_uri, home, model).rollback()
    console.print(f"{model}: rolled back; version {info.version} is champion again")
