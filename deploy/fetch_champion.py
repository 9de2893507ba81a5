"""Put the registry's serving model into this pod's BentoML model store: the ranker's init container.

Settings (environment, set by manifests/base/ranker.yaml):
  FUSIONRANK_REGISTRY_URI    the MLflow tracking server, e.g. http://mlflow.fusionrank.svc.cluster.local:5000
  FUSIONRANK_MODEL_NAME      the registered model the pipeline registers (its `model_name` parameter)
  FUSIONRANK_MODEL_VERSION   an alias (champion, the default) or a version number, to pin one
  BENTOML_HOME               the model store: an emptyDir the server container shares

The bundle goes in as the one `fusionrank-ranker` model of the store, so the server's default
`fusionrank-ranker:latest` is exactly this version; its labels name the registered model and version.
Run twice (a restarted init container), it keeps the model it already fetched for the same version.
Exit status 0 on success, 1 with one line on stderr when the model cannot be fetched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fusionrank.errors import ConfigError, FusionrankError, RegistryError
from fusionrank.packaging import BUNDLE_DIR, MODEL_NAME, model_labels
from fusionrank.registry import CHAMPION, ModelVersionInfo, Registry

REGISTERED_MODEL_LABEL = "registered_model"
REGISTERED_VERSION_LABEL = "registered_version"


def resolve(registry: Registry, reference: str) -> ModelVersionInfo:
    """The version a reference names: a version number, or an alias such as `champion`."""
    if reference.isdigit():
        return registry.get(int(reference))
    info = registry.by_alias(reference)
    if info is None:
        raise RegistryError(
            f"model '{registry.name}' in {registry.uri} has no version aliased '{reference}': "
            "register one with the pipeline and promote it (`fusionrank promote VERSION`)"
        )
    return info


def fetch_into_store(registry_uri: str, model_name: str, reference: str = CHAMPION) -> tuple[str, int]:
    """Download the referenced version's bundle into the BentoML store; return its BentoML tag and version."""
    registry = Registry(registry_uri, model_name)
    info = resolve(registry, reference)
    import bentoml

    # A restarted init container finds the model it fetched. (list(name) raises on an empty store.)
    wanted = (MODEL_NAME, model_name, str(info.version))
    for model in bentoml.models.list():
        found = model.info.labels
        if (model.tag.name, found.get(REGISTERED_MODEL_LABEL), found.get(REGISTERED_VERSION_LABEL)) == wanted:
            return str(model.tag), info.version
    with tempfile.TemporaryDirectory(prefix="fusionrank-fetch-") as work:
        bundle = registry.download(info.version, work)
        manifest_path = bundle / "manifest.json"
        if not manifest_path.is_file():
            raise RegistryError(f"version {info.version} of '{model_name}' holds no ranker bundle ({bundle})")
        manifest = json.loads(manifest_path.read_text())
        labels = {
            **model_labels(manifest),
            REGISTERED_MODEL_LABEL: model_name,
            REGISTERED_VERSION_LABEL: str(info.version),
        }
        with bentoml.models.create(MODEL_NAME, labels=labels) as model:
            shutil.copytree(bundle, Path(model.path) / BUNDLE_DIR)
    return str(model.tag), info.version


def main() -> int:
    """Read the settings from the environment, fetch, and report in one line."""
    try:
        registry_uri = os.environ.get("FUSIONRANK_REGISTRY_URI", "")
        model_name = os.environ.get("FUSIONRANK_MODEL_NAME", "")
        if not registry_uri or not model_name:
            raise ConfigError("set FUSIONRANK_REGISTRY_URI and FUSIONRANK_MODEL_NAME")
        reference = os.environ.get("FUSIONRANK_MODEL_VERSION") or CHAMPION
        tag, version = fetch_into_store(registry_uri, model_name, reference)
    except FusionrankError as exc:
        print(f"fetch_champion: {exc}", file=sys.stderr)
        return 1
    print(f"{tag}: version {version} ({reference}) of '{model_name}' from {registry_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
