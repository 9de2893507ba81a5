"""The model registry (MLflow): register approved bundles, move the champion alias, roll back in one command.

Aliases: `challenger` (the newest registered version), `champion` (what is served), `previous` (the champion
before the current one, what `rollback` restores). A promotion or rollback either moves every alias it
touches or, on an error, none of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from fusionrank.errors import RegistryError, ServiceUnavailable

CHALLENGER, CHAMPION, PREVIOUS = "challenger", "champion", "previous"
RUN_ID_TAG = "train_run_id"
REGISTRY_URI_ENV = "FUSIONRANK_REGISTRY_URI"


def local_registry_uri(home: str | Path) -> str:
    """The SQLite registry URI for a local fusionrank home folder (absolute, so the cwd does not matter)."""
    return f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


@dataclass
class ModelVersionInfo:
    """One registered version, as the CLI and the pipeline see it."""

    name: str
    version: int
    aliases: list[str]
    tags: dict[str, str]
    source: str
    created: int
    metrics: dict[str, float] = field(default_factory=dict)


class Registry:
    """A registered model in an MLflow registry (SQLite file locally, a tracking server on a cluster)."""

    def __init__(self, uri: str, model_name: str) -> None:
        if not uri:
            raise RegistryError(f"no registry URI given (set --registry-uri or ${REGISTRY_URI_ENV})")
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("DO_NOT_TRACK", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        self.uri = uri
        self.name = model_name
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)

    # reads

    def versions(self) -> list[ModelVersionInfo]:
        """Every version of the model, newest first (empty when the model was never registered)."""
        found = self._call(lambda: self.client.search_model_versions(f"name = '{self.name}'"))
        # search results carry no aliases in MLflow 3: read each version itself
        return sorted((self.get(int(v.version)) for v in found), key=lambda v: v.version, reverse=True)

    def by_alias(self, alias: str) -> ModelVersionInfo | None:
        """The version an alias points at, or None when the alias (or the model) does not exist."""
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise self._unavailable(exc) from exc

    def champion(self) -> ModelVersionInfo | None:
        return self.by_alias(CHAMPION)

    def get(self, version: int) -> ModelVersionInfo:
        """The version numbered `version`; RegistryError naming the known versions otherwise."""
        from mlflow.exceptions import MlflowException

        try:
            return self._info(self.client.get_model_version(self.name, str(version)))
        except MlflowException as exc:
            known = [v.version for v in self.versions()]
            raise RegistryError(
                f"model '{self.name}' has no version {version} in {self.uri} (versions: {known or 'none'})"
            ) from exc

    def download(self, version: int, dst: str | Path) -> Path:
        """Copy the bundle of `version` into `dst` and return its folder."""
        import mlflow

        info = self.get(version)
        dst = Path(dst)
        dst.mkdir(parents=True, exist_ok=True)
        path = self._call(
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=info.source, dst_path=str(dst), tracking_uri=self.uri
            )
        )
        return Path(path)

    # writes

    def register(
        self,
        bundle_dir: str | Path,
        run_id: str,
        tags: dict[str, str],
        metrics: dict[str, float] | None = None,
    ) -> ModelVersionInfo:
        """Register the bundle as a new version aliased `challenger`, once per training run.

        Re-registering the same `run_id` returns the version it created the first time.
        """
        existing = self._call(
            lambda: self.client.search_model_versions(
                f"name = '{self.name}' and tags.{RUN_ID_TAG} = '{run_id}'"
            )
        )
        if existing:
            return self._info(existing[0])
        from mlflow.exceptions import MlflowException

        experiment = self._experiment_id()
        run = self._call(
            lambda: self.client.create_run(experiment, run_name=run_id, tags={RUN_ID_TAG: run_id})
        )
        rid = run.info.run_id
        for key, value in (metrics or {}).items():
            self.client.log_metric(rid, key.replace("@", "_at_"), float(value))
        self.client.log_artifacts(rid, str(bundle_dir), artifact_path="bundle")
        self.client.set_terminated(rid)
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            self.client.create_registered_model(self.name)
        source = f"{self.client.get_run(rid).info.artifact_uri}/bundle"
        version = self.client.create_model_version(
            self.name, source=source, run_id=rid, tags={**tags, RUN_ID_TAG: run_id}
        )
        self.client.set_registered_model_alias(self.name, CHALLENGER, version.version)
        return self.get(int(version.version))

    def promote(self, version: int) -> ModelVersionInfo:
        """Make `version` the champion; the champion it replaces becomes `previous`."""
        target = self.get(version)
        current = self.champion()
        if current is not None and current.version == target.version:
            return target
        if current is not None:
            self.client.set_registered_model_alias(self.name, PREVIOUS, str(current.version))
        self.client.set_registered_model_alias(self.name, CHAMPION, str(target.version))
        return self.get(version)

    def rollback(self) -> ModelVersionInfo:
        """Restore the `previous` version as champion; the version rolled back from is tagged."""
        previous = self.by_alias(PREVIOUS)
        if previous is None:
            raise RegistryError(
                f"model '{self.name}' has no 'previous' version to roll back to; aliases are unchanged"
            )
        current = self.champion()
        self.client.set_registered_model_alias(self.name, CHAMPION, str(previous.version))
        self.client.delete_registered_model_alias(self.name, PREVIOUS)
        if current is not None:
            self.client.set_model_version_tag(self.name, str(current.version), "rolled_back", "true")
        return self.get(previous.version)

    # internals

    def _experiment_id(self) -> str:
        name = f"{self.name}-training"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):
            # Without an explicit location MLflow writes artifacts under ./mlruns of whatever the cwd is.
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / "artifacts").resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def _info(self, version) -> ModelVersionInfo:
        metrics: dict[str, float] = {}
        if version.run_id:
            try:
                metrics = {
                    k.replace("_at_", "@"): v
                    for k, v in self.client.get_run(version.run_id).data.metrics.items()
                }
            except Exception:  # a version whose run was deleted still lists
                metrics = {}
        return ModelVersionInfo(
            name=version.name,
            version=int(version.version),
            aliases=sorted(version.aliases),
            tags=dict(version.tags),
            source=version.source,
            created=int(version.creation_timestamp),
            metrics=metrics,
        )

    def _call(self, fn):
        from mlflow.exceptions import MlflowException

        try:
            return fn()
        except MlflowException as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: Exception) -> Exception:
        text = str(exc)
        if "Connection" in text or "Max retries" in text or "API request" in text:
            return ServiceUnavailable(f"model registry {self.uri} is unreachable: {text.splitlines()[0]}")
        return RegistryError(f"registry {self.uri}: {text.splitlines()[0]}")


def download_champion(registry: Registry, dst: str | Path) -> tuple[ModelVersionInfo, Path] | None:
    """The champion's info and a local copy of its bundle, or None without a champion."""
    champion = registry.champion()
    if champion is None:
        return None
    tmp = Path(tempfile.mkdtemp(dir=dst))
    try:
        return champion, registry.download(champion.version, tmp)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
