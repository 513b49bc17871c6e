"""Kubernetes manifests and the image, validated offline.

KubeRay objects are checked against the v1.7.0 CRD schemas that ship in kuberay/crds/
(verbatim copies, Apache-2.0; kuberay/crds/SOURCE), with unknown fields rejected;
core objects against the Kubernetes schemas that kubernetes-validate ships.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = ROOT / "kuberay" / "crds"
MANIFESTS = sorted((ROOT / "kuberay").glob("*.yaml"))
KUBERAY_KINDS = {"RayCluster": "rayclusters", "RayService": "rayservices", "RayJob": "rayjobs"}
K8S_VERSION = "1.33"


def all_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def pinned_ray() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for dep in deps["optional-dependencies"]["service"]:
        m = re.match(r"ray\[.*\]==(\S+)", dep)
        if m:
            return m.group(1)
    raise AssertionError("ray is not pinned in the service extra")


def _strict(schema: dict) -> dict:
    """Reject unknown fields wherever the schema lists properties (the API server would
    silently prune them, hiding typos), except where Kubernetes preserves them."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for v in schema.values():
            _strict(v)
    elif isinstance(schema, list):
        for v in schema:
            _strict(v)
    return schema


@functools.cache
def _crd(kind: str) -> dict:
    # libyaml's loader when PyYAML has it: the CRDs are 1-1.4 MB of YAML each, which
    # the pure-Python loader takes seconds to read
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((CRDS / f"ray.io_{KUBERAY_KINDS[kind]}.yaml").read_text(), Loader=loader)


def crd_schema(kind: str) -> dict:
    crd = _crd(kind)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta is not in the CRD
    return _strict(schema)


def test_every_manifest_parses_and_has_the_expected_objects():
    kinds = sorted(d["kind"] for _, d in all_docs())
    assert kinds == [
        "ConfigMap",
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayCluster",
        "RayJob",
        "RayService",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(KUBERAY_KINDS))
def test_kuberay_objects_validate_against_the_v1_7_crds(kind):
    import jsonschema

    schema = crd_schema(kind)
    docs = [d for _, d in all_docs() if d["kind"] == kind]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1"
        jsonschema.validate(doc, schema)


@pytest.mark.slow
def test_strict_schema_catches_a_typo():
    import jsonschema

    doc = copy.deepcopy(next(d for _, d in all_docs() if d["kind"] == "RayJob"))
    doc["spec"]["shutdownAfterJobFinish"] = True  # missing "es"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, crd_schema("RayJob"))


def test_operator_rules_for_rayjobs():
    for _, job in [x for x in all_docs() if x[1]["kind"] == "RayJob"]:
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec)
        if "ttlSecondsAfterFinished" in spec:
            assert spec.get("shutdownAfterJobFinishes") is True
        assert not ("deletionStrategy" in spec and spec.get("shutdownAfterJobFinishes"))


def test_head_runs_no_work_and_gpu_workers_scale_from_zero():
    cluster = next(d for _, d in all_docs() if d["kind"] == "RayCluster")["spec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    assert gpu["minReplicas"] == 0 and cluster["enableInTreeAutoscaling"] is True
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])


def _pod_specs(obj):
    if isinstance(obj, dict):
        if "containers" in obj:
            yield obj
        for v in obj.values():
            yield from _pod_specs(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _pod_specs(v)


def test_shared_storage_on_every_pod_and_non_root():
    for name, doc in all_docs():
        for pod in _pod_specs(doc.get("spec", {})):
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for c in pod["containers"]:
                mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
                assert "/mnt/llm2slm" in mounts, (name, c["name"])


def test_core_objects_validate_against_kubernetes_schemas():
    import kubernetes_validate

    core = [d for _, d in all_docs() if d["kind"] not in KUBERAY_KINDS]
    for doc in core:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # and the pod templates inside the Ray objects, as Pods
    for _, doc in all_docs():
        if doc["kind"] in KUBERAY_KINDS:
            for pod in _pod_specs(doc["spec"]):
                kubernetes_validate.validate(
                    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod},
                    K8S_VERSION,
                    strict=True,
                )


def test_serve_config_import_path_imports():
    svc = next(d for _, d in all_docs() if d["kind"] == "RayService")
    serve_cfg = yaml.safe_load(svc["spec"]["serveConfigV2"])
    for app in serve_cfg["applications"]:
        module, _, attr = app["import_path"].partition(":")
        obj = getattr(importlib.import_module(module), attr)
        from ray.serve import Application

        assert isinstance(obj, Application)
        names = {d["name"] for d in app["deployments"]}
        assert names == {"Llm2SlmAPI"}
    assert svc["spec"]["upgradeStrategy"]["type"] in (
        "NewCluster",
        "NewClusterWithIncrementalUpgrade",
        "None",
    )


def test_image_tags_and_ray_versions_agree_with_the_pin():
    ray = pinned_ray()
    import ray as ray_mod

    assert ray_mod.__version__ == ray
    for name, doc in all_docs():
        text = yaml.safe_dump(doc)
        for v in re.findall(r"rayVersion: '?\"?([\d.]+)", text):
            assert v == ray, name
        for image in re.findall(r"image: (\S+)", text):
            assert f"ray{ray}" in image, (name, image)
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"rayproject/ray:{ray}-py311" in dockerfile


def test_dockerfile_installs_the_pyproject_package_set():
    dockerfile = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pin = next(d for d in project["dependencies"] if d.startswith("torch=="))
    assert f'TORCH_SPEC="{torch_pin}"' in dockerfile
    # the project itself, from pyproject, with the runtime extras and without test tools
    m = re.search(r'pip install --no-cache-dir "\.\[([^\]]+)\]"', dockerfile)
    assert m and set(m.group(1).split(",")) == {"service", "export"}
    assert set(project["optional-dependencies"]) >= {"service", "export", "test"}
    assert "USER ray" in dockerfile and "USER root" not in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"tests", ".git", "runs"} <= set(ignored)


def test_shipped_crds_are_the_recorded_upstream_files():
    """kuberay/crds/ holds unmodified KubeRay v1.7.0 files: their sha256 match SOURCE."""
    import hashlib

    recorded = dict(
        (name, digest)
        for digest, name in re.findall(
            r"^\s+([0-9a-f]{64})\s+(\S+\.yaml)$", (CRDS / "SOURCE").read_text(), re.M
        )
    )
    assert sorted(recorded) == sorted(f"ray.io_{k}.yaml" for k in KUBERAY_KINDS.values())
    for name, digest in recorded.items():
        assert hashlib.sha256((CRDS / name).read_bytes()).hexdigest() == digest, name


def test_dockerfile_copies_every_package():
    """A package that pyproject installs but the image lacks fails only at run time."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = [p.rstrip("*") for p in include["packages"]["find"]["include"]]
    assert "jobs" in packages
    for pkg in packages:
        assert f"COPY --chown=ray:users {pkg} ./{pkg}" in dockerfile, pkg
