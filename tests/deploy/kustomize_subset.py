"""An offline renderer for the subset of kustomize that ``deploy/k8s`` uses.

There is no kustomize binary on the test machines and no PyPI package renders kustomizations,
so the tests render the overlays with this. It implements only what the overlays use and
*refuses* anything else, so an overlay cannot silently drift outside what is tested:

- ``resources``: YAML files and directories holding a ``kustomization.yaml`` (rendered first);
- ``components``: directories holding a ``kind: Component`` kustomization whose ``resources``
  join the parent's and whose ``patches`` apply to everything accumulated so far (kustomize's
  order: the parent's resources, then each component, then the parent's generators and patches);
- ``namespace``: set on every namespaced object;
- ``labels``: ``pairs`` added to ``metadata.labels`` (``includeSelectors`` must stay false;
  ``includeTemplates`` adds them to pod templates too);
- ``images``: ``name`` → ``newName`` / ``newTag`` / ``digest`` on every container image;
- ``patches``: ``path`` only, each document a strategic-merge patch of the whole object
  found by kind and name (``$patch: delete`` removes the object). Built-in kinds merge lists
  of containers, env, volumes, … by their merge key and delete a key set to ``null``; custom
  resources (KEDA, Prometheus Operator) take JSON merge patch semantics, as in kustomize;
- ``configMapGenerator`` / ``secretGenerator``: ``literals`` and ``files`` (keyed by file name,
  read from the kustomization's own directory), with ``options.disableNameSuffixHash: true``
  (no hash suffix, so no name-reference rewriting) and optional ``options.labels``.

The order is kustomize's: resources, generators, patches, then namespace, labels and images.
Where kubectl is installed, test_manifests checks the output equals ``kubectl kustomize``.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]

_SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "components",
    "namespace",
    "labels",
    "images",
    "patches",
    "configMapGenerator",
    "secretGenerator",
}
# Strategic-merge keys of the list fields the manifests patch (from the Kubernetes API's
# patchMergeKey tags); any other list is replaced whole, as strategic merge does by default.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "ClusterTriggerAuthentication",
}
_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses a feature outside the tested subset."""


def _is_builtin(doc: Doc) -> bool:
    """Core and ``*.k8s.io`` groups are built in (strategic merge); anything else is a CRD."""
    api_version = doc.get("apiVersion", "")
    if "/" not in api_version:
        return True
    group = api_version.split("/", 1)[0]
    return "." not in group or group.endswith(".k8s.io")


def _merge(target: Any, patch: Any, strategic: bool, field: str = "") -> Any:
    if isinstance(patch, dict) and isinstance(target, dict):
        out = dict(target)
        for key, value in patch.items():
            if key.startswith("$"):
                raise UnsupportedKustomization(f"patch directive {key!r} is outside the tested subset")
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, strategic, key)
            else:
                out[key] = _merge({}, value, strategic, key) if isinstance(value, dict) else copy.deepcopy(value)
        return out
    if strategic and isinstance(patch, list) and isinstance(target, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        out = [copy.deepcopy(item) for item in target]
        for item in patch:
            index = next((i for i, have in enumerate(out) if have.get(key) == item.get(key)), None)
            if index is None:
                out.append(_merge({}, item, strategic))
            else:
                out[index] = _merge(out[index], item, strategic)
        return out
    if isinstance(patch, dict):
        return _merge({}, patch, strategic, field)
    return copy.deepcopy(patch)


def _load_yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _generate(kind: str, spec: Doc, directory: Path) -> Doc:
    unknown = set(spec) - {"name", "literals", "files", "options"}
    if unknown:
        raise UnsupportedKustomization(f"{kind} generator fields {sorted(unknown)} are outside the tested subset")
    options = spec.get("options") or {}
    if set(options) - {"labels"} != {"disableNameSuffixHash"} or options["disableNameSuffixHash"] is not True:
        raise UnsupportedKustomization(f"{kind} generator {spec['name']!r} needs options.disableNameSuffixHash: true")
    data: dict[str, str] = {}
    for literal in spec.get("literals", []):
        key, sep, value = literal.partition("=")
        if not sep:
            raise UnsupportedKustomization(f"generator literal {literal!r} is not KEY=VALUE")
        data[key] = value
    for entry in spec.get("files", []):
        if "=" in entry:
            raise UnsupportedKustomization(f"generator file {entry!r}: KEY=PATH is outside the tested subset")
        path = (directory / entry).resolve()
        if not path.is_relative_to(directory.resolve()):
            # kustomize's load restrictor: a kustomization reads files only under its own directory.
            raise UnsupportedKustomization(f"generator file {entry!r} lies outside {directory}")
        data[path.name] = path.read_text()
    doc: Doc = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
    if options.get("labels"):
        doc["metadata"]["labels"] = dict(options["labels"])
    if kind == "Secret":
        doc["type"] = "Opaque"
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data
    return doc


def _find(docs: list[Doc], kind: str, name: str) -> int:
    hits = [i for i, d in enumerate(docs) if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(hits) != 1:
        raise UnsupportedKustomization(f"patch target {kind}/{name} matches {len(hits)} objects, expected 1")
    return hits[0]


def _apply_patch_file(docs: list[Doc], path: Path) -> list[Doc]:
    for patch in _load_yaml_docs(path):
        index = _find(docs, patch["kind"], patch["metadata"]["name"])
        if patch.get("$patch") == "delete":
            docs = docs[:index] + docs[index + 1 :]
            continue
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")}
        merged = _merge(docs[index], body, strategic=_is_builtin(docs[index]))
        docs = [*docs[:index], merged, *docs[index + 1 :]]
    return docs


def _pod_specs(doc: Doc) -> list[Doc]:
    if doc["kind"] in _POD_TEMPLATE_KINDS:
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "CronJob":
        return [doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if doc["kind"] == "Pod":
        return [doc["spec"]]
    return []


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """``registry:5000/repo/name:tag@sha256:…`` → (name, tag, digest); a registry port is not a tag."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    last = image.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = image.rsplit(":", 1)
        return name, tag, digest
    return image, None, digest


def _set_images(docs: list[Doc], images: list[Doc]) -> None:
    for entry in images:
        unknown = set(entry) - {"name", "newName", "newTag", "digest"}
        if unknown:
            raise UnsupportedKustomization(f"images fields {sorted(unknown)} are outside the tested subset")
        for doc in docs:
            for pod in _pod_specs(doc):
                for container in pod.get("containers", []) + pod.get("initContainers", []):
                    name, tag, digest = split_image(container["image"])
                    if name != entry["name"]:
                        continue
                    name = entry.get("newName", name)
                    tag = entry.get("newTag", tag)
                    digest = entry.get("digest", digest)
                    container["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _set_labels(docs: list[Doc], labels: list[Doc]) -> None:
    for entry in labels:
        unknown = set(entry) - {"pairs", "includeSelectors", "includeTemplates"}
        if unknown or entry.get("includeSelectors"):
            # Selector labels are immutable on Deployments: changing them breaks upgrades.
            raise UnsupportedKustomization(f"labels entry {entry} is outside the tested subset")
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
            if entry.get("includeTemplates") and doc["kind"] in _POD_TEMPLATE_KINDS:
                doc["spec"]["template"].setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])


_COMPONENT_KEYS = {"apiVersion", "kind", "resources", "patches"}


def _apply_component(docs: list[Doc], directory: Path) -> list[Doc]:
    """``docs`` with a ``kind: Component`` kustomization's resources added and its patches applied."""
    component = yaml.safe_load((directory / "kustomization.yaml").read_text())
    if component.get("kind") != "Component":
        raise UnsupportedKustomization(f"{directory}: a component must be kind: Component")
    unknown = set(component) - _COMPONENT_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: component fields {sorted(unknown)} are outside the subset")
    docs = list(docs)
    for resource in component.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(render(path) if path.is_dir() else _load_yaml_docs(path))
    for patch in component.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"patch {patch} is outside the subset (path only)")
        docs = _apply_patch_file(docs, directory / patch["path"])
    return docs


def render(directory: Path) -> list[Doc]:
    """Render the kustomization in ``directory`` into a list of Kubernetes objects."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED_KEYS
    if unknown:
        raise UnsupportedKustomization(f"{directory}: kustomization fields {sorted(unknown)} are outside the subset")
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        docs.extend(render(path) if path.is_dir() else _load_yaml_docs(path))
    for component in kustomization.get("components", []):
        docs = _apply_component(docs, (directory / component).resolve())
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        docs.extend(_generate(kind, spec, directory) for spec in kustomization.get(field, []))
    for patch in kustomization.get("patches", []):
        if set(patch) != {"path"}:
            raise UnsupportedKustomization(f"patch {patch} is outside the subset (path only)")
        docs = _apply_patch_file(docs, directory / patch["path"])
    docs = copy.deepcopy(docs)
    namespace = kustomization.get("namespace")
    if namespace:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = namespace
    _set_labels(docs, kustomization.get("labels", []))
    _set_images(docs, kustomization.get("images", []))
    return docs
