"""The Kubernetes permissions the operator's code needs, derived from the code itself (no cluster).

How: every ``.method(...)`` call in ``operator/distill_operator/*.py`` whose name is a method of a
``kubernetes.client`` API class is looked up in that client: its generated ``_<method>_serialize`` carries the HTTP
method and the resource path (``/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status``), which give
the RBAC verb, API group, resource and subresource. Path parameters the client leaves open (``group``, ``plural``
of ``CustomObjectsApi``) are read from the call's arguments, which must be constants or module-level names (e.g.
``RAY_GROUP``); a name shared by several API classes (``create_namespaced_event``) is resolved by the receiver's
declared type (``core: client.CoreV1Api``, ``self.custom = client.CustomObjectsApi(...)``). Watches come from the
``@kopf.on.event(group, version, plural)`` decorators (list + watch). Anything that cannot be resolved is an
error, so a new kind of call cannot slip by unnoticed. Added to that:
- what the operator grants trainers in their per-job Role (``access.render_trainer_role``): RBAC lets a subject
  create a Role only with permissions it holds itself;
- what kopf itself calls (``FRAMEWORK``), which no code of ours spells out.

Why static: the set is exact for every path of the code, including the ones the tests never reach (deadlines,
TTL deletion, RayAddress). tests/integration/test_helm_chart.py checks the chart grants exactly this set, and runs
a real reconcile under the chart's ServiceAccount, so a wrong derivation would show up as a 403 there.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import kubernetes.client

OPERATOR_DIR = Path(__file__).resolve().parents[1] / "operator" / "distill_operator"

# kopf's own calls, beside our handlers' (kopf/_core/reactor/observation.py, kopf/_cogs/clients/events.py).
FRAMEWORK = {
    # It discovers the resources it serves from the CRDs (initial list, then a watch for new ones).
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf resource observer",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf resource observer",
    # It posts Events for handler warnings and errors (settings.posting.level = WARNING).
    ("", "events", "create"): "kopf event posting",
}
# Only when the operator watches listed namespaces (-n), not all: kopf resolves the patterns from the namespaces.
FRAMEWORK_NAMESPACED = {
    ("", "namespaces", "list"): "kopf namespace observer",
    ("", "namespaces", "watch"): "kopf namespace observer",
}
# kopf decorators that need no permission of their own. Others (on.create/update/resume/delete, timers, daemons)
# make kopf patch the objects (annotations, finalizers): extend this module before using them.
KOPF_DECORATORS_WITHOUT_API_CALLS = {"startup", "cleanup", "login", "probe"}

VERBS = {("GET", True): "get", ("GET", False): "list", ("POST", False): "create", ("PUT", True): "update",
         ("PATCH", True): "patch", ("DELETE", True): "delete", ("DELETE", False): "deletecollection"}


@dataclass(frozen=True, order=True)
class Permission:
    group: str
    resource: str  # with "/subresource"
    verb: str
    where: str = ""  # file:line of a call that needs it (not compared)

    @property
    def key(self) -> tuple[str, str, str]:
        return self.group, self.resource, self.verb


@lru_cache(maxsize=None)
def _api_classes() -> dict[str, type]:
    classes = {name: getattr(kubernetes.client, name, None) for name in dir(kubernetes.client) if name.endswith("Api")}
    return {name: cls for name, cls in classes.items() if isinstance(cls, type)}


@lru_cache(maxsize=None)
def _endpoint(cls_name: str, method: str) -> tuple[str, str] | None:
    """(HTTP method, resource path) of a kubernetes client method."""
    serialize = getattr(_api_classes()[cls_name], f"_{method}_serialize", None)
    if serialize is None:
        return None
    source = inspect.getsource(serialize)
    return re.search(r"method='(\w+)'", source).group(1), re.search(r"resource_path='([^']*)'", source).group(1)


def _classes_with(method: str) -> list[str]:
    return [name for name in _api_classes() if _endpoint(name, method) is not None]


def _receiver_types(tree: ast.Module) -> dict[str, str]:
    """Receiver expression (``core``, ``self.custom``) -> API class name, from annotations and assignments."""
    types: dict[str, str] = {}

    def api_class(node: ast.AST | None) -> str | None:
        if isinstance(node, ast.Call):
            node = node.func
        if isinstance(node, ast.Attribute) and node.attr in _api_classes():
            return node.attr
        if isinstance(node, ast.Name) and node.id in _api_classes():
            return node.id
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and api_class(node.annotation):
            types[node.arg] = api_class(node.annotation)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if api_class(value):
                    types[ast.unparse(target)] = api_class(value)
    return types


def _resolve(node: ast.AST, module) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, (ast.Name, ast.Attribute)):
        try:
            value = eval(compile(ast.Expression(node), "<rbac>", "eval"), vars(module))  # noqa: S307 - our code
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"cannot resolve {ast.unparse(node)}: {error}") from error
        if isinstance(value, str):
            return value
    raise ValueError(f"cannot resolve {ast.unparse(node)} to a constant string")


def _permission(path: str, http: str, params: dict[str, str], where: str) -> Permission | None:
    path = re.sub(r"\{(group|version|plural)\}", lambda m: params[m.group(1)], path)
    match = re.fullmatch(r"/api/v1(?P<rest>/.*)|/apis/(?P<group>[^/]+)/[^/]+(?P<rest2>/.*)", path)
    if not match:
        return None  # /version, discovery: allowed to every authenticated user
    group = match.group("group") or ""
    rest = (match.group("rest") or match.group("rest2")).removeprefix("/namespaces/{namespace}")
    parts = rest.strip("/").split("/")
    resource, named = parts[0], len(parts) > 1 and parts[1] == "{name}"
    if len(parts) > 2:
        resource = f"{resource}/{parts[2]}"
    if resource == "namespaces" and rest != path.split("/namespaces/{namespace}")[-1]:
        raise ValueError(f"{where}: unexpected path {path}")
    return Permission(group, resource, VERBS[(http, named)], where)


def code_permissions() -> set[Permission]:
    """Permissions of every kubernetes client call and kopf watch in operator/distill_operator/*.py."""
    found: set[Permission] = set()
    for path in sorted(OPERATOR_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        module = importlib.import_module(f"distill_operator.{path.stem}")
        receivers = _receiver_types(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            where = f"{path.name}:{node.lineno}"
            func = node.func
            if isinstance(func.value, ast.Attribute) and ast.unparse(func.value) in ("kopf.on", "on"):
                if func.attr == "event":
                    group, _version, plural = (_resolve(arg, module) for arg in node.args[:3])
                    found |= {Permission(group, plural, "list", where), Permission(group, plural, "watch", where)}
                elif func.attr not in KOPF_DECORATORS_WITHOUT_API_CALLS:
                    raise ValueError(f"{where}: kopf.on.{func.attr} needs permissions this scan does not know")
                continue
            classes = _classes_with(func.attr)
            if not classes:
                continue
            receiver = func.value
            declared = receivers.get(ast.unparse(receiver)) or (
                receiver.func.attr if isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Attribute)
                and receiver.func.attr in _api_classes() else None
            )
            if declared:
                classes = [declared]
            elif len({_endpoint(c, func.attr) for c in classes}) > 1:
                raise ValueError(f"{where}: {func.attr} of which API class? (declare the receiver's type)")
            http, resource_path = _endpoint(classes[0], func.attr)
            signature = list(inspect.signature(getattr(_api_classes()[classes[0]], func.attr)).parameters)[1:]
            args = dict(zip(signature, node.args)) | {k.arg: k.value for k in node.keywords if k.arg}
            params = {p: _resolve(args[p], module) for p in re.findall(r"\{(group|version|plural)\}", resource_path)}
            permission = _permission(resource_path, http, params, where)
            if permission is not None:
                found.add(permission)
    return found


def granted_to_trainers() -> set[Permission]:
    """The rules of the per-job trainer Role: the operator must hold them to create it."""
    from distill_operator import access
    from distill_operator.render import JobRef

    role = access.render_trainer_role(JobRef("job", "ns", "uid"))
    return {Permission(group, resource, verb, "access.render_trainer_role")
            for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]
            for verb in rule["verbs"]}


def required(namespaced: bool) -> dict[tuple[str, str, str], str]:
    """(group, resource, verb) -> why, everything the operator needs; ``namespaced``: it watches listed
    namespaces (-n), not all."""
    needed: dict[tuple[str, str, str], str] = {}
    for permission in sorted(code_permissions() | granted_to_trainers()):
        needed.setdefault(permission.key, permission.where)
    for key, why in {**FRAMEWORK, **(FRAMEWORK_NAMESPACED if namespaced else {})}.items():
        needed.setdefault(key, why)
    return needed


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(group, resource, verb) of RBAC rules (no wildcards, no resourceNames expected)."""
    out = set()
    for rule in rules:
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                for verb in rule.get("verbs", []):
                    out.add((group, resource, verb))
    return out


if __name__ == "__main__":  # python tests/operator_rbac.py: print the derived set
    for (group, resource, verb), where in sorted(required(namespaced=True).items()):
        print(f"{group or 'core':28} {resource:28} {verb:8} {where}")
