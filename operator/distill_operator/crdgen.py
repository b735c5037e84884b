"""Generate the DistillJob CustomResourceDefinition from the pydantic models in resources.py.

    python -m distill_operator.crdgen --write    # writes crds/distilljob.yaml, crds/distilljob-no-cel.yaml and
                                                 # charts/kubedistill/crds/distilljob.yaml (the Helm chart's copy)
    python -m distill_operator.crdgen --check    # exit 1 when a committed file is stale
    python -m distill_operator.crdgen [--no-cel] > crd.yaml

pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema: every node typed,
no $ref, no type inside anyOf, no null type. The conversion below is small and explicit:
- ``$ref`` is inlined, ``title`` dropped, pydantic ``default`` moved into the description (the API server does
  not default: the operator applies the model's defaults, so stored objects stay as the user wrote them);
- ``X | None`` becomes ``X`` with ``nullable: true``; ``int | str`` (quantities) becomes
  ``x-kubernetes-int-or-string``; ``const`` becomes a one-value ``enum``; ``exclusiveMinimum: 0`` becomes
  ``minimum: 0, exclusiveMinimum: true``;
- ``bool | str`` (only ``resume_from_checkpoint``) has no structural form in Kubernetes 1.20 (a node has one
  type; int-or-string is the only union). That leaf gets ``x-kubernetes-preserve-unknown-fields: true``, so
  YAML ``true``/``false``/``"/path"`` all pass the API server, and the operator validates it with the
  trainer's own model (a bad value sets ``Failed`` with reason ``InvalidSpec``). It is the one field the
  schema alone does not check.
Rules that need more than one field (teacher and student layouts, rayAddress for the RayAddress launcher) and the
immutability of ``resources.IMMUTABLE_SPEC_FIELDS`` (``self == oldSelf``) are added as CEL ``x-kubernetes-validations`` in ``crds/distilljob.yaml`` (Kubernetes >= 1.25). Before 1.25 kubectl
refuses that key, so ``crds/distilljob-no-cel.yaml`` is the same CRD without it; the operator checks the same rules
with pydantic either way.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from distill_operator import resources

CRD_PATH = Path(__file__).resolve().parents[2] / "crds" / "distilljob.yaml"
CRD_NO_CEL_PATH = CRD_PATH.with_name("distilljob-no-cel.yaml")
# The Helm chart installs the CEL variant from its crds/ folder (helm installs those before the templates, and never
# upgrades or deletes them). Clusters older than 1.25: install crds/distilljob-no-cel.yaml and use --skip-crds.
CHART_CRD_PATH = CRD_PATH.parents[1] / "charts" / "kubedistill" / "crds" / "distilljob.yaml"

# CEL rules (Kubernetes >= 1.25), keyed by the dotted schema path they sit on.
CEL_RULES: dict[str, list[dict[str, str]]] = {
    "spec.launcher": [
        {
            "rule": "!has(self.type) || self.type != 'RayAddress' || has(self.rayAddress)",
            "message": "rayAddress is required when type is RayAddress",
        }
    ],
    "spec.distill": [
        {
            "rule": "has(self.student) && has(self.student.data_args) && has(self.student.data_args.file_name)",
            "message": "student.data_args.file_name is required: the training data file",
        },
        {
            "rule": "(has(self.student) && has(self.student.device_mapping) ? self.student.device_mapping : [])"
            " == (has(self.teacher) && has(self.teacher.device_mapping) ? self.teacher.device_mapping : [])",
            "message": "teacher.device_mapping must equal student.device_mapping",
        },
    ],
}



def _immutable_rules() -> list[dict[str, str]]:
    """``spec.<field>`` unchanged after creation, for each of resources.IMMUTABLE_SPEC_FIELDS (transition rules:
    checked on updates only). Older servers: the operator ignores such an edit with a SpecChangeIgnored condition."""
    rules = []
    for field in resources.IMMUTABLE_SPEC_FIELDS:  # as written in a manifest (camelCase)
        rules.append({
            "rule": f"has(self.{field}) == has(oldSelf.{field}) && (!has(self.{field}) || self.{field} == oldSelf.{field})",
            "message": f"spec.{field} is immutable after creation; delete and re-create the DistillJob to run "
            "another configuration",
        })
    return rules


# spec.mode / spec.teacherCacheFrom (resources.DistillJobSpec._teacher_cache_fields checks the same, and more: that
# teacher_cache_dir lies on spec.storage).
_CACHE_TEACHER = "has(self.mode) && self.mode == 'cacheTeacher'"
TEACHER_CACHE_RULES = [
    {
        "rule": f"!({_CACHE_TEACHER}) || has(self.distill.teacher_cache_dir)",
        "message": "spec.distill.teacher_cache_dir is required with spec.mode cacheTeacher: the directory the "
        "teacher cache is written to",
    },
    {
        "rule": f"!has(self.teacherCacheFrom) || !({_CACHE_TEACHER})",
        "message": "spec.teacherCacheFrom is for train jobs that read a teacher cache, not for spec.mode cacheTeacher",
    },
    {
        "rule": "!has(self.teacherCacheFrom) || has(self.distill.teacher_cache_dir)",
        "message": "spec.distill.teacher_cache_dir is required with spec.teacherCacheFrom: the cache directory of "
        "that job (the same value)",
    },
    {
        "rule": f"!(has(self.teacherCacheFrom) || {_CACHE_TEACHER}) || has(self.storage) || "
        "(has(self.launcher) && has(self.launcher.type) && self.launcher.type == 'RayAddress')",
        "message": "spec.storage is required with spec.mode cacheTeacher or spec.teacherCacheFrom: the teacher cache "
        "lives on a PersistentVolumeClaim",
    },
]
CEL_RULES["spec"] = _immutable_rules() + TEACHER_CACHE_RULES

PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state", "description": "Summary state."},
    {"name": "Reason", "type": "string", "jsonPath": ".status.reason",
     "description": "Reason of the condition that set the state; status.message says what to do next."},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Last step."},
    {"name": "Max", "type": "integer", "jsonPath": ".spec.distill.max_steps", "description": "Steps to train."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Training loss."},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts", "priority": 1},
    {"name": "RayJob", "type": "string", "jsonPath": ".status.rayJobName", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _describe_default(node: dict[str, Any], default: Any) -> None:
    if default is None or default == [] or default == {}:
        return
    description = node.get("description", "")
    if "Default:" in description:
        return
    rendered = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()
    node["description"] = f"{description} Default: {rendered}.".strip()


def _structural(node: dict[str, Any], defs: dict[str, Any], path: str, cel: bool = True) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node (and its children) into a structural OpenAPI v3.0 node."""
    node = copy.deepcopy(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        merged = copy.deepcopy(target)
        # A field's own description wins over its model's docstring.
        merged.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = merged
    default = node.pop("default", None)
    node.pop("title", None)
    out: dict[str, Any]

    variants = node.pop("anyOf", None)
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        nullable = len(non_null) < len(variants)
        types = sorted(v.get("type", "") for v in non_null)
        if len(non_null) == 1:
            out = _structural({**non_null[0], **{k: v for k, v in node.items()}}, defs, path, cel)
            if nullable:
                out["nullable"] = True
        elif types == ["integer", "string"]:
            out = {k: v for k, v in node.items()}
            out["x-kubernetes-int-or-string"] = True
        elif types == ["boolean", "string"]:
            out = {k: v for k, v in node.items()}
            out["x-kubernetes-preserve-unknown-fields"] = True
            out["description"] = (
                out.get("description", "") + " true, false or a checkpoint path (checked by the operator)."
            ).strip()
        else:  # pragma: no cover - a new union type in the models needs a deliberate mapping here
            raise ValueError(f"{path}: no structural form for anyOf {types}")
        _describe_default(out, default)
        if cel:
            _attach_cel(out, path)
        return out

    out = {}
    for key, value in node.items():
        if key == "properties":
            out["properties"] = {
                name: _structural(child, defs, f"{path}.{name}" if path else name, cel) for name, child in value.items()
            }
        elif key == "items":
            out["items"] = _structural(value, defs, f"{path}[]", cel)
        elif key == "additionalProperties":
            if value is False:
                continue  # extra="forbid": the API server prunes unknown fields; kubectl rejects them
            out["additionalProperties"] = _structural(value, defs, f"{path}.*", cel)
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key in ("$defs", "examples"):
            continue
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = {str: "string", int: "integer", bool: "boolean", float: "number"}[type(out["enum"][0])]
    if "properties" in out:
        out.setdefault("type", "object")
    if "type" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise ValueError(f"{path}: schema node without a type: {node}")
    _describe_default(out, default)
    if cel:
        _attach_cel(out, path)
    return out


def _attach_cel(node: dict[str, Any], path: str) -> None:
    if path in CEL_RULES:
        node["x-kubernetes-validations"] = copy.deepcopy(CEL_RULES[path])


def _model_schema(model: type, path: str, cel: bool) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
    defs = schema.pop("$defs", {})
    return _structural(schema, defs, path, cel)


def openapi_schema(cel: bool = True) -> dict[str, Any]:
    """The structural schema of the whole DistillJob object."""
    return {
        "type": "object",
        "description": "A knowledge-distillation run of an LLM: a teacher's logits train a student on a Ray "
        "cluster launched through KubeRay (or an existing Ray cluster).",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},
            "spec": _model_schema(resources.DistillJobSpec, "spec", cel),
            "status": _model_schema(resources.DistillJobStatus, "status", cel),
        },
    }


def build_crd(cel: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resources.PLURAL}.{resources.GROUP}"},
        "spec": {
            "group": resources.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resources.KIND,
                "listKind": f"{resources.KIND}List",
                "plural": resources.PLURAL,
                "singular": resources.SINGULAR,
                "shortNames": list(resources.SHORT_NAMES),
                "categories": ["all", "kubedistill"],
            },
            "versions": [
                {
                    "name": resources.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": openapi_schema(cel)},
                }
            ],
        },
    }


def render_crd_yaml(cel: bool = True) -> str:
    variant = "" if cel else " --no-cel"
    note = (
        "# With CEL rules (x-kubernetes-validations): Kubernetes >= 1.25. Older clusters: distilljob-no-cel.yaml.\n"
        if cel
        else "# Without CEL rules, for Kubernetes < 1.25 (kubectl apply rejects x-kubernetes-validations there).\n"
    )
    header = (
        f"# Generated by `python -m distill_operator.crdgen{variant}` from operator/distill_operator/resources.py.\n"
        "# Do not edit by hand.\n" + note
    )
    return header + yaml.safe_dump(build_crd(cel), sort_keys=False, width=120)


def generated_files() -> dict[Path, str]:
    """Every committed copy of the CRD and the text it must have."""
    return {
        CRD_PATH: render_crd_yaml(cel=True),
        CRD_NO_CEL_PATH: render_crd_yaml(cel=False),
        CHART_CRD_PATH: render_crd_yaml(cel=True),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill_operator.crdgen", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--write", action="store_true", help=f"write crds/{CRD_PATH.name}, crds/{CRD_NO_CEL_PATH.name} and the chart's copy"
    )
    group.add_argument("--check", action="store_true", help="exit 1 if a committed CRD differs from the generator")
    parser.add_argument("--no-cel", action="store_true", help="print the CRD without CEL rules (Kubernetes < 1.25)")
    args = parser.parse_args(argv)
    files = generated_files()
    if args.write:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    elif args.check:
        stale = [path for path, text in files.items() if not path.is_file() or path.read_text() != text]
        for path in stale:
            print(f"{path} is stale: run `python -m distill_operator.crdgen --write`", file=sys.stderr)
        return 1 if stale else 0
    else:
        sys.stdout.write(render_crd_yaml(cel=not args.no_cel))
    return 0


if __name__ == "__main__":
    sys.exit(main())
