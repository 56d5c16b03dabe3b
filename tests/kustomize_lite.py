"""A small kustomize build in Python, for machines without a kubectl that embeds kustomize v5.

Why it exists: the manifest tests must run on any machine of this project's kind. Debian's
``kubernetes-client`` is 1.20 (kustomize v2, which knows neither ``labels`` nor inline
``patches``), and no kustomize on PyPI is maintained, so when ``kubectl kustomize`` is missing
the tests build daemonset/ with this. It implements only what daemonset/ uses, and refuses
anything else loudly instead of building something different:

* ``resources`` (YAML files and directories with a kustomization.yaml), ``namespace``;
* ``labels`` with ``includeSelectors: false`` (metadata.labels only);
* ``configMapGenerator`` (``envs``, ``files``, ``namespace``, ``options.labels``,
  ``options.disableNameSuffixHash``) with kustomize's content-hash name suffix, and the
  references to a generated ConfigMap by name in pod templates;
* ``images`` (newName/newTag);
* ``patches``: strategic-merge patches made of maps only (files or inline).

When kubectl is there, tests/test_manifests.py checks that this build equals ``kubectl
kustomize`` for every kustomization, so the two cannot drift apart unnoticed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

Obj = dict[str, Any]

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
KNOWN_KEYS = {
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "configMapGenerator",
    "images",
    "patches",
}


class Unsupported(ValueError):
    """The kustomization uses a feature this build does not implement."""


def _config_map_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix: sha256 of Go's JSON of {data, kind, name}, 10 chars re-lettered.

    kustomize v5 hashes the generated object with an empty name (checked against kubectl's
    output: the suffix depends on the content only). Go's encoder sorts map keys, writes no
    blanks and escapes <, > and & (HTML-safe); kustomize swaps some hex digits for letters so a
    suffix never looks like a number.
    """
    doc = {"data": data, "kind": "ConfigMap", "name": ""}
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def _read_env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise Unsupported(f"{path}: {line!r} is not KEY=VALUE")
        out[key] = value
    return out


def _generate(root: Path, gen: Obj, namespace: str | None) -> tuple[Obj, str]:
    """One configMapGenerator entry -> (ConfigMap, the name resources used for it)."""
    unknown = set(gen) - {"name", "envs", "files", "namespace", "options"}
    if unknown:
        raise Unsupported(f"configMapGenerator fields {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in gen.get("envs", []):
        data.update(_read_env_file(root / env))
    for f in gen.get("files", []):
        data[Path(f).name] = (root / f).read_text()
    options = gen.get("options", {})
    name = gen["name"]
    cm: Obj = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
    if options.get("labels"):
        cm["metadata"]["labels"] = dict(options["labels"])
    ns = gen.get("namespace") or namespace
    if ns:
        cm["metadata"]["namespace"] = ns
    if not options.get("disableNameSuffixHash"):
        cm["metadata"]["name"] = f"{name}-{_config_map_hash(data)}"
    return cm, name


def _merge(base: Any, patch: Any, where: str) -> Any:
    """Strategic merge limited to maps (lists in a patch would need merge keys: refused)."""
    if isinstance(patch, dict) and isinstance(base, dict):
        out = dict(base)
        for k, v in patch.items():
            if k.startswith("$patch") or v is None:
                raise Unsupported(f"{where}: directive or deletion {k!r}")
            out[k] = _merge(base.get(k), v, f"{where}.{k}") if k in base else copy.deepcopy(v)
        return out
    if isinstance(patch, list):
        raise Unsupported(f"{where}: lists in strategic-merge patches")
    return copy.deepcopy(patch)


def _ident(obj: Obj) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _apply_patch(objs: list[Obj], root: Path, entry: Obj) -> list[Obj]:
    text = (root / entry["path"]).read_text() if "path" in entry else entry["patch"]
    patch = yaml.safe_load(text)
    if isinstance(patch, list) or "target" in entry:
        raise Unsupported("JSON 6902 patches and patch targets")
    key = _ident(patch)
    hits = [o for o in objs if _ident(o) == key]
    if len(hits) != 1:
        raise ValueError(f"patch for {key} matched {len(hits)} objects")
    return [_merge(o, patch, f"{key}") if o is hits[0] else o for o in objs]


def _set_image(obj: Obj, images: list[Obj]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        name = c["image"].split("@")[0].rsplit(":", 1)[0] if ":" in c["image"] else c["image"]
        for img in images:
            if img["name"] == name:
                new = img.get("newName", name)
                c["image"] = f"{new}:{img['newTag']}" if "newTag" in img else new


def _rename_config_maps(obj: Obj, names: dict[str, str]) -> None:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for ef in c.get("envFrom", []):
            ref = ef.get("configMapRef")
            if ref and ref["name"] in names:
                ref["name"] = names[ref["name"]]
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("configMapKeyRef")
            if ref and ref["name"] in names:
                ref["name"] = names[ref["name"]]
    for v in spec.get("volumes", []):
        ref = v.get("configMap")
        if ref and ref["name"] in names:
            ref["name"] = names[ref["name"]]


def build(root: Path) -> list[Obj]:
    """The objects ``kubectl kustomize root`` prints (in no particular order)."""
    root = Path(root)
    k = yaml.safe_load((root / "kustomization.yaml").read_text())
    unknown = set(k) - KNOWN_KEYS
    if unknown:
        raise Unsupported(f"{root}/kustomization.yaml: {sorted(unknown)}")
    objs: list[Obj] = []
    for res in k.get("resources", []):
        path = (root / res).resolve()
        if path.is_dir():
            objs.extend(build(path))
        else:
            objs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    names: dict[str, str] = {}
    for gen in k.get("configMapGenerator", []):
        cm, name = _generate(root, gen, k.get("namespace"))
        objs.append(cm)
        names[name] = cm["metadata"]["name"]
    for entry in k.get("patches", []):
        objs = _apply_patch(objs, root, entry)
    for obj in objs:
        meta = obj["metadata"]
        if k.get("namespace") and obj["kind"] not in CLUSTER_SCOPED:
            meta["namespace"] = k["namespace"]
        for group in k.get("labels", []):
            if group.get("includeSelectors") or group.get("includeTemplates"):
                raise Unsupported("labels with includeSelectors/includeTemplates")
            meta["labels"] = {**meta.get("labels", {}), **group["pairs"]}
        _set_image(obj, k.get("images", []))
        _rename_config_maps(obj, names)
        if obj["kind"] == "ClusterRoleBinding" and k.get("namespace"):
            for s in obj.get("subjects", []):
                if s.get("kind") == "ServiceAccount":
                    s["namespace"] = k["namespace"]
    return objs
