"""Package a ranker bundle for serving: the BentoML model store, a Bento, and the contract check.

`save_to_bentoml` stores the bundle folder as one BentoML model (labels and metadata from its manifest)
and builds a Bento from `serving/` whose `model` argument pins that exact model version. The Bento's
`src/` holds the service and a copy of the `fusionrank` package, so it serves the code it was built with;
`serving/bentofile.yaml` pins the dependencies (locking off: it resolves torch to a CUDA build).

`contract_check` is the InfraValidator of this project, without Docker: it loads the built Bento in this
process, sends golden requests over its ASGI app, checks the answers, and checks that a batched call and
single calls give the same scores. Promote a version only when it passes.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fusionrank.errors import ConfigError, DataError

MODEL_NAME = "fusionrank-ranker"
BUNDLE_DIR = "bundle"  # the bundle's folder inside the BentoML model (serving/service.py reads it)
BENTOFILE = "bentofile.yaml"
SERVICE_FILE = "service.py"
# BERT's padding differs between a batch and a single request: scores agree to float32 noise, not bits.
SCORE_TOLERANCE = 1e-4
UNKNOWN_PRODUCT = "fusionrank-contract-check-unknown-product"
UNKNOWN_USER = "fusionrank-contract-check-unknown-user"


def default_serving_dir() -> Path:
    """The project's `serving/` folder (next to `src/` in a checkout or a component image)."""
    return Path(__file__).resolve().parents[2] / "serving"


def model_labels(manifest: dict) -> dict[str, str]:
    """The BentoML labels of a bundle: what `bentoml models list` shows and filters on."""
    labels = {
        "mode": manifest.get("mode"),
        "fusion": manifest.get("selected_fusion"),
        "feature_service": manifest.get("feature_service"),
        "data_hash": str(manifest.get("data_hash") or "")[:16],
        "git_revision": str(manifest.get("git_revision") or "")[:12],
    }
    return {key: str(value) for key, value in labels.items() if value}


def _metadata(manifest: dict) -> dict[str, Any]:
    """The manifest as BentoML metadata, which takes no None (dropped) and only plain JSON values."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [clean(v) for v in value if v is not None]
        return value

    return clean(json.loads(json.dumps(manifest, default=str)))


def save_to_bentoml(
    bundle_dir: Path,
    manifest: dict,
    model_name: str = MODEL_NAME,
    serving_dir: Path | None = None,
) -> dict:
    """Save the bundle to the BentoML model store and build the Bento that serves it.

    Returns {"bento": bento tag, "model": model tag, "bento_path": where the Bento lies}. The stores are
    those of $BENTOML_HOME (default ~/bentoml).
    """
    import bentoml

    bundle_dir = Path(bundle_dir)
    if not (bundle_dir / "manifest.json").is_file():
        raise DataError(f"{bundle_dir}: not a ranker bundle (no manifest.json)")
    with bentoml.models.create(
        model_name, labels=model_labels(manifest), metadata=_metadata(manifest)
    ) as model:
        shutil.copytree(bundle_dir, Path(model.path) / BUNDLE_DIR)
    bento = build_bento(str(model.tag), serving_dir)
    return {"bento": str(bento.tag), "model": str(model.tag), "bento_path": str(bento.path)}


def build_bento(model_tag: str, serving_dir: Path | None = None) -> Any:
    """`bentoml build` of `serving/` with its bentofile, pinned to `model_tag`; returns the Bento.

    The build context is a staging copy of `serving/` plus the `fusionrank` package, so the Bento's
    `src/` can import the exact code it was built with.
    """
    import bentoml

    serving_dir = Path(serving_dir) if serving_dir is not None else default_serving_dir()
    for name in (BENTOFILE, SERVICE_FILE):
        if not (serving_dir / name).is_file():
            raise ConfigError(f"{serving_dir / name}: not found; the Bento is built from the serving/ folder")
    package = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="fusionrank-bento-") as staging:
        context = Path(staging)
        shutil.copytree(
            serving_dir, context, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
        )
        shutil.copytree(
            package, context / package.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
        # reload: an earlier build in this process imported another `service` module with other arguments
        return bentoml.bentos.build_bentofile(
            str(context / BENTOFILE), build_ctx=str(context), args={"model": model_tag}, reload=True
        )


def golden_requests(catalog: list[str], titles: dict[str, str]) -> list[dict[str, Any]]:
    """Requests every bundle must answer: a query, a new user, a query and a user, and given candidates
    with an unknown and a repeated id. `k` is the maximum, so single and batched answers list every
    candidate and their scores compare one to one."""
    from fusionrank.serving_logic import MAX_K

    first = catalog[0]
    query = " ".join(titles[first].split()[:3]) or first
    candidates = catalog[:20]
    return [
        {"query": query, "k": MAX_K},
        {"user_id": UNKNOWN_USER, "k": MAX_K},
        {"query": query, "user_id": UNKNOWN_USER, "k": MAX_K},
        {"query": query, "candidates": [*candidates, UNKNOWN_PRODUCT, first], "k": MAX_K},
    ]


def _answer_problems(request: dict[str, Any], answer: dict[str, Any], model_tag: str) -> list[str]:
    """What is wrong with one answer to a golden request (empty when nothing is)."""
    problems = []
    results = answer.get("results", [])
    if not results:
        problems.append("no ranked products")
    ranks = [r["rank"] for r in results]
    if ranks != list(range(1, len(results) + 1)):
        problems.append(f"ranks are not 1..{len(results)}: {ranks[:10]}")
    scores = [r["score"] for r in results]
    if any(a < b for a, b in itertools.pairwise(scores)):
        problems.append("scores are not in descending order")
    for result in results:
        total = sum(result["contributions"].values())
        if abs(total - result["score"]) > SCORE_TOLERANCE * max(1.0, abs(result["score"])):
            problems.append(
                f"{result['product_id']}: contributions sum to {total}, score is {result['score']}"
            )
            break
    if answer.get("model", {}).get("tag") != model_tag:
        problems.append(f"answered by model {answer.get('model', {}).get('tag')!r}, expected {model_tag!r}")
    if "candidates" in request:
        if answer.get("unknown_candidates") != [UNKNOWN_PRODUCT]:
            problems.append(f"unknown candidates reported as {answer.get('unknown_candidates')}")
        if answer.get("duplicate_candidates") != [request["candidates"][0]]:
            problems.append(f"duplicate candidates reported as {answer.get('duplicate_candidates')}")
        if len(results) != len(set(request["candidates"])) - 1:
            problems.append(f"{len(results)} ranked products for {len(set(request['candidates'])) - 1} known")
    if request.get("user_id") == UNKNOWN_USER and not answer.get("cold_start"):
        problems.append("a new user is not flagged as a cold start")
    return problems


def _score_differences(single: dict[str, Any], batched: dict[str, Any]) -> tuple[float, list[str]]:
    """The largest score difference between two answers to one request, and any product set mismatch."""
    one = {r["product_id"]: r["score"] for r in single["results"]}
    other = {r["product_id"]: r["score"] for r in batched["results"]}
    if one.keys() != other.keys():
        return float("inf"), sorted(one.keys() ^ other.keys())[:5]
    return max((abs(one[p] - other[p]) for p in one), default=0.0), []


def contract_check(bento_tag: str) -> dict[str, Any]:
    """Load the Bento in process and check its contract; returns {"passed", "failures", ...}.

    Checks: health and readiness; each golden request answers 200 with a well-formed ranking by the
    Bento's own model (ranks 1..n, scores descending, contributions summing to the score, unknown and
    repeated candidates reported, a new user flagged as cold start); a request with neither query nor
    user gets a 400 naming the problem; and one batched call gives the same products and scores (within
    `SCORE_TOLERANCE`) as the requests sent one by one.
    """
    import bentoml
    from starlette.testclient import TestClient

    bento = bentoml.get(bento_tag)
    models = [str(m.tag) for m in bento.info.all_models]
    if len(models) != 1:
        raise DataError(f"Bento {bento_tag} carries {len(models)} models ({models}); expected one ranker")
    model_tag = models[0]
    model_path = Path(bentoml.models.get(model_tag).path) / BUNDLE_DIR
    from fusionrank.ranker import Ranker

    bundle = Ranker.load(model_path, load_bert=False)
    requests = golden_requests(sorted(bundle.titles), bundle.titles)

    failures: list[str] = []
    service = bentoml.load(bento_tag, reload=True)
    largest_difference = 0.0
    with TestClient(service.to_asgi()) as client:
        for path in ("/healthz", "/readyz", "/livez"):
            status = client.get(path).status_code
            if status != 200:
                failures.append(f"GET {path}: {status}")
        singles = []
        for request in requests:
            response = client.post("/rank", json=request)
            if response.status_code != 200:
                failures.append(f"/rank {request}: HTTP {response.status_code} {response.text[:200]}")
                singles.append(None)
                continue
            singles.append(response.json())
            failures += [f"/rank {request}: {p}" for p in _answer_problems(request, singles[-1], model_tag)]
        invalid = client.post("/rank", json={"k": 5})
        if invalid.status_code != 400 or "query" not in invalid.text:
            failures.append(
                f"a request without query or user: HTTP {invalid.status_code} {invalid.text[:200]}"
            )
        batched = client.post("/rank_batch", json={"requests": requests})
        if batched.status_code != 200:
            failures.append(f"/rank_batch: HTTP {batched.status_code} {batched.text[:200]}")
        else:
            for request, single, answer in zip(requests, singles, batched.json(), strict=True):
                if single is None:
                    continue
                difference, mismatched = _score_differences(single, answer)
                if mismatched:
                    failures.append(
                        f"batched and single answers to {request} rank other products: {mismatched}"
                    )
                    continue
                largest_difference = max(largest_difference, difference)
            if largest_difference > SCORE_TOLERANCE:
                failures.append(f"batched and single scores differ by up to {largest_difference:.3g}")
    return {
        "passed": not failures,
        "failures": failures,
        "bento": str(bento.tag),
        "model": model_tag,
        "requests": len(requests),
        "max_batch_score_difference": largest_difference,
    }
