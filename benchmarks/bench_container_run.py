"""The whole DAG twice on the same data and seed, one run after the other: every step in this environment
(kfp.local SubprocessRunner), then every step in its image (DockerRunner against podman). Prints both wall
times, per step, and whether the evaluation metrics agree.

Needs the image of this checkout (`make image`); the podman service is started for the container run and
counted apart. Usage:
    .venv/bin/python benchmarks/bench_container_run.py [--data-dir ../shared/data] [--sample small|local]
        [--home DIR]

`small` is the tests' sample with the tiny BERT (tests/test_container.py); `local` is `make run`'s
(LOCAL_DEFAULTS, MiniLM).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from fusionrank.containers import docker_host, engine
from fusionrank.data.sources import default_data_dir
from fusionrank.orchestration import LOCAL_DEFAULTS, SMOKE_PARAMS, STEP_ORDER, LocalRun, run_local
from pipelines.training import DEFAULT_GATE

SMALL = {**SMOKE_PARAMS, "source": "homedepot", "seed": 3}


def evaluation(run: LocalRun) -> dict:
    return json.loads(run.artifact("evaluate", "evaluation").read_text())["candidate"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--sample", choices=("small", "local"), default="small")
    parser.add_argument("--home", type=Path, default=None, help="default: a new temporary folder")
    args = parser.parse_args()
    params = dict(SMALL) if args.sample == "small" else dict(LOCAL_DEFAULTS)
    params["data_dir"] = str((args.data_dir or default_data_dir()).resolve())
    params["gate_config"] = {**DEFAULT_GATE, "force": "approve"}
    home = args.home or Path(tempfile.mkdtemp(prefix="fusionrank-bench-"))

    subprocess_run = run_local(params, home / "subprocess")
    started = time.monotonic()
    with engine() as url, docker_host(url):
        service_seconds = time.monotonic() - started
        container_run = run_local(params, home / "container", runner="container")
    for name, run in (("subprocess", subprocess_run), ("container", container_run)):
        if run.error:
            raise SystemExit(f"the {name} run failed: {run.error}")

    print(f"sample: {args.sample}, data: {params['data_dir']}, home: {home}")
    print(f"podman service start: {service_seconds:.1f} s (not in the container run's time)")
    print(f"{'step':<18} {'subprocess s':>13} {'container s':>12}")
    for step in STEP_ORDER:
        if step in subprocess_run.step_seconds or step in container_run.step_seconds:
            print(
                f"{step:<18} {subprocess_run.step_seconds.get(step, 0.0):>13.1f}"
                f" {container_run.step_seconds.get(step, 0.0):>12.1f}"
            )
    print(f"{'DAG wall time':<18} {subprocess_run.seconds:>13.1f} {container_run.seconds:>12.1f}")
    a, b = evaluation(subprocess_run), evaluation(container_run)
    same = a == b
    print(f"candidate metrics identical: {same}" + ("" if same else f"\n  subprocess {a}\n  container  {b}"))


if __name__ == "__main__":
    main()
