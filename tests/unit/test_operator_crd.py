"""The generated CRD: committed file in sync with resources.py, structural, and carrying the validation rules."""

from __future__ import annotations

from typing import Any, Iterator

import yaml

from distill_operator import crdgen


def _schema() -> dict[str, Any]:
    return crdgen.build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, child in (node.get("properties") or {}).items():
        yield from _nodes(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}.*")


def _at(path: str) -> dict[str, Any]:
    node = _schema()
    for part in path.split("."):
        node = node["properties"][part]
    return node


def test_committed_crd_matches_generator():
    stale = "is stale: run `python -m distill_operator.crdgen --write`"
    assert crdgen.CRD_PATH.read_text() == crdgen.render_crd_yaml(cel=True), f"crds/distilljob.yaml {stale}"
    assert crdgen.CRD_NO_CEL_PATH.read_text() == crdgen.render_crd_yaml(cel=False), f"crds/distilljob-no-cel.yaml {stale}"
    chart = "charts/kubedistill/crds/distilljob.yaml"
    assert crdgen.CHART_CRD_PATH.read_text() == crdgen.render_crd_yaml(cel=True), f"{chart} {stale}"
    assert set(crdgen.generated_files()) == {crdgen.CRD_PATH, crdgen.CRD_NO_CEL_PATH, crdgen.CHART_CRD_PATH}
    assert crdgen.main(["--check"]) == 0


def test_no_cel_variant_differs_only_by_the_cel_rules():
    with_cel, without = crdgen.build_crd(cel=True), crdgen.build_crd(cel=False)
    assert "x-kubernetes-validations" not in yaml.safe_dump(without)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "x-kubernetes-validations"}
        return [strip(v) for v in node] if isinstance(node, list) else node

    assert strip(with_cel) == without


def test_schema_is_structural():
    forbidden = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "const", "default"}
    for path, node in _nodes(_schema()):
        assert not forbidden & node.keys(), f"{path}: {forbidden & node.keys()}"
        typed = "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"
        )
        assert typed, f"{path} has no type"
        assert node.get("type") != "null", path
        if path.startswith(("spec", "status")):
            assert node.get("description") or path.endswith("[]") or path.endswith(".*"), f"{path}: no description"


def test_names_scope_subresource_and_printer_columns():
    crd = crdgen.build_crd()
    assert crd["metadata"]["name"] == "distilljobs.kubedistill.io"
    spec = crd["spec"]
    assert spec["group"] == "kubedistill.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "DistillJob" and spec["names"]["shortNames"] == ["dj"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["State"] == ".status.state" and columns["Reason"] == ".status.reason"
    assert [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")] == [
        "State", "Reason", "Step", "Max", "Loss", "Age"]
    assert columns["Step"] == ".status.progress.step"
    assert columns["Max"] == ".spec.distill.max_steps"
    assert columns["Loss"] == ".status.progress.loss"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_enums_ranges_and_required_fields():
    assert set(_at("spec.distill.kd_objective")["enum"]) == {
        "forward_kl", "reverse_kl", "adaptive_kl", "skewed_forward_kl", "skewed_reverse_kl", "js_divergence"
    }
    weight = _at("spec.distill.distill_loss_weight")
    assert (weight["minimum"], weight["maximum"], weight["type"]) == (0, 1, "number")
    for name in ("kd_temperature", "teacher_temperature"):
        node = _at(f"spec.distill.{name}")
        assert node["minimum"] == 0 and node["exclusiveMinimum"] is True
    assert _at("spec.distill.logits_topk")["minimum"] == 0
    assert _at("spec.distill.max_steps")["minimum"] == 1
    assert _at("spec.runPolicy.backoffLimit")["minimum"] == 0
    for name in ("queueName", "priorityClassName"):  # Kueue label values
        node = _at(f"spec.runPolicy.{name}")
        assert (node["type"], node["maxLength"], node["pattern"]) == ("string", 63, r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    assert "Queued" in _at("status.state")["enum"]
    assert _at("spec.launcher.type")["enum"] == ["KubeRay", "RayAddress"]
    assert set(_schema()["required"]) == {"spec"}
    assert set(_at("spec")["required"]) == {"distill", "image"}
    # max_steps or student.training_args.num_train_epochs: the operator validates that with the trainer model.
    assert set(_at("spec.distill")["required"]) == {"student_pretrain", "teacher_pretrain"}
    assert _at("spec.storage")["required"] == ["claimName"]


def test_union_leaves_have_structural_forms():
    assert _at("spec.workers.cpu")["x-kubernetes-int-or-string"] is True
    resume = _at("spec.distill.resume_from_checkpoint")
    assert resume["x-kubernetes-preserve-unknown-fields"] is True and "type" not in resume
    assert _at("status.conditions")["x-kubernetes-list-map-keys"] == ["type"]


def test_cel_rules_for_cross_field_checks():
    assert any("rayAddress" in r["rule"] for r in _at("spec.launcher")["x-kubernetes-validations"])
    assert len(_at("spec.distill")["x-kubernetes-validations"]) == 2


def test_descriptions_flow_from_the_models():
    assert "KD term" in _at("spec.distill.distill_loss_weight")["description"]
    assert "Default: 3." in _at("spec.runPolicy.backoffLimit")["description"]
    assert yaml.safe_load(crdgen.render_crd_yaml())["kind"] == "CustomResourceDefinition"
