"""The Dockerfile, checked without a Docker daemon: what it copies exists and is in the build context, its
entrypoints resolve to installed modules and console scripts, both images run as a numeric non-root user, the
trainer's Ray is the RayJob's rayVersion, and the operator image's packages (and pyproject's ``operator`` extra)
hold no torch."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
GPU_STACK = {"torch", "triton", "torchvision", "transformers", "megatron-core"}  # none of these in the operator


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def _global_args() -> dict[str, str]:
    args = {}
    for instruction, rest in _instructions():
        if instruction == "FROM":
            break
        if instruction == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args[key.strip()] = value.strip()
    return args


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instruction, rest in _instructions():
        if instruction == "FROM":
            match = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.IGNORECASE)
            assert match, f"every stage is named: FROM {rest}"
            current = stages.setdefault(match.group(2), [])
        if current is not None:
            current.append((instruction, rest))
    return stages


def _dockerignored(path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path (or a parent of it) decides."""
    patterns = [p.strip() for p in (REPO / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        forms = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, form) for c in candidates for form in forms):
            ignored = not negate
    return ignored


def test_both_targets_exist():
    assert {"operator", "trainer"} <= _stages().keys()


def test_every_copied_path_exists_and_is_in_the_build_context():
    for stage, instructions in _stages().items():
        for instruction, rest in instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            assert "--from" not in rest, f"{stage}: copies from another stage: update this test"
            for source in words[:-1]:
                assert (REPO / source).exists(), f"{stage}: COPY {source}: no such path"
                assert not _dockerignored(source), f"{stage}: COPY {source}: excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for path in (".venv", ".git", "tests", "examples/tiny/artifacts", "operator/distill_operator/__pycache__"):
        assert _dockerignored(path), path
    for path in ("pyproject.toml", "trainer/distill_trainer/cli.py", "operator/distill_operator/__main__.py"):
        assert not _dockerignored(path), path


def test_images_run_as_a_numeric_non_root_user():
    uid = _global_args()["APP_UID"]
    assert uid.isdigit() and int(uid) > 0
    for stage in ("operator", "trainer"):
        users = [rest for instruction, rest in _stages()[stage] if instruction == "USER"]
        assert users and users[-1] == "${APP_UID}:${APP_UID}", stage


def test_operator_entrypoint_is_the_installed_operator_module():
    entrypoint = [json.loads(rest) for instruction, rest in _stages()["operator"] if instruction == "ENTRYPOINT"][-1]
    assert entrypoint[:2] == ["python", "-m"]
    module = entrypoint[2]
    # The package is found where pyproject says setuptools looks, and has a __main__.
    where = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
    assert any((REPO / folder / module / "__main__.py").is_file() for folder in where), module
    spec = importlib.util.find_spec(f"{module}.__main__")
    assert spec is not None and spec.origin.startswith(str(REPO / "operator"))
    # The container args of the chart's Deployment are flags of this parser.
    from distill_operator.__main__ import build_parser

    cmd = [json.loads(rest) for instruction, rest in _stages()["operator"] if instruction == "CMD"][-1]
    assert build_parser().parse_args(cmd).bind_address == "0.0.0.0"


def test_trainer_entrypoints_are_console_scripts_of_the_package():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    from distill_operator import render
    from distill_operator.resources import DistillJobSpec

    # What KubeRay runs on the head: the RayJob's entrypoint, and the image's default command.
    entry = render.entrypoint_args(render.CONFIG_PATH, resume=False)[0]
    cmd = [json.loads(rest) for instruction, rest in _stages()["trainer"] if instruction == "CMD"][-1]
    for script in {entry, cmd[0]}:
        assert script in scripts, f"{script} is not a console script in pyproject.toml"
        module, function = scripts[script].split(":")
        source = (REPO / "trainer" / Path(*module.split("."))).with_suffix(".py")
        assert re.search(rf"^def {function}\(", source.read_text(), re.MULTILINE), scripts[script]
    assert DistillJobSpec.model_fields["ray_version"].default


def test_trainer_ray_is_the_rayjobs_ray_version():
    from distill_operator.resources import DistillJobSpec

    assert _global_args()["RAY_VERSION"] == DistillJobSpec.model_fields["ray_version"].default
    run = " ".join(rest for instruction, rest in _stages()["trainer"] if instruction == "RUN")
    assert '"ray[default]==${RAY_VERSION}"' in run
    pinned = _pins(REPO / "docker" / "requirements-trainer.txt")
    assert "ray" not in pinned, "ray comes from RAY_VERSION only, so the two cannot disagree"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{path.name}: {line} is not pinned"
            pins[_canonical(requirement.name)] = specifier.version
    return pins


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: [Requirement(r) for r in reqs] for name, reqs in project["optional-dependencies"].items()}
    extras[""] = [Requirement(r) for r in project["dependencies"]]
    return extras


@pytest.mark.parametrize("image, extras", [("operator", ["", "operator"]), ("trainer", ["", "trainer", "megatron"])])
def test_pins_satisfy_pyproject(image, extras):
    pins = _pins(REPO / "docker" / f"requirements-{image}.txt")
    if image == "trainer":
        pins["ray"] = _global_args()["RAY_VERSION"]
        pins["torch"] = re.search(r"pytorch:(\d+\.\d+\.\d+)", _global_args()["TORCH_IMAGE"]).group(1)
    for extra in extras:
        for requirement in _extras()[extra]:
            name = _canonical(requirement.name)
            assert name in pins, f"requirements-{image}.txt lacks {requirement} (pyproject extra {extra!r})"
            assert pins[name] in requirement.specifier, f"{name}=={pins[name]} does not satisfy {requirement}"


def test_operator_image_and_extra_hold_no_torch_statically():
    assert not GPU_STACK & _pins(REPO / "docker" / "requirements-operator.txt").keys()
    assert not GPU_STACK & {_canonical(r.name) for r in _extras()["operator"] + _extras()[""]}
    # The operator's imports of the trainer package are modules that import no torch.
    for path in (REPO / "operator" / "distill_operator").glob("*.py"):
        for package, names in re.findall(r"^\s*from (distill_trainer[\w.]*) import ([\w, ]+)", path.read_text(), re.M):
            base = REPO / "trainer" / Path(*package.split("."))
            sources = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else [
                base / f"{name.strip()}.py" for name in names.split(",")  # from distill_trainer import k8s_progress
            ]
            for source in sources:
                assert source.is_file(), f"{path.name}: from {package} import {names}: no {source}"
                assert not re.search(r"^\s*(import|from) (torch|numpy|ray|transformers)", source.read_text(), re.M), (
                    f"{path.name} imports {source.stem}, which imports the trainer stack"
                )


def test_operator_modules_import_without_torch(tmp_path):
    """Importing the operator (as the image's entrypoint does) loads no torch, numpy or hydra."""
    code = (
        "import sys; import distill_operator.handlers, distill_operator.__main__; "
        "print(sorted(m for m in ('torch', 'numpy', 'hydra', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_operator_extra_resolves_to_the_pinned_closure_without_torch(tmp_path):
    """pip resolves ``.[operator]`` (with the image's pins) from the package index: no torch, nothing unpinned."""
    report = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
         "-c", str(REPO / "docker" / "requirements-operator.txt"), f"{REPO}[operator]"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    installed = {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in json.loads(report.read_text())["install"]}
    installed.pop("kubedistill")
    assert not GPU_STACK & installed.keys()
    assert installed == _pins(REPO / "docker" / "requirements-operator.txt")


def test_image_build_script_passes_the_dockerfiles_base_arguments():
    """scripts/images/build.sh builds both targets FROM local stand-ins for the bases, through the Dockerfile's own
    build arguments (the Dockerfile runs unchanged): they must stay global ARGs that the stages' FROM use."""
    script = (REPO / "scripts" / "images" / "build.sh").read_text()
    passed = set(re.findall(r"--build-arg ([A-Z_]+)=", script))
    args = _global_args()
    froms = {rest.split()[0] for instruction, rest in _instructions() if instruction == "FROM"}
    assert {"PYTHON_IMAGE", "TORCH_IMAGE"} <= passed
    for name in ("PYTHON_IMAGE", "TORCH_IMAGE"):
        assert name in args, f"ARG {name} is no longer a global build argument of the Dockerfile"
        assert "${" + name + "}" in froms, f"no stage is FROM ${{{name}}}"
    defaults = script.split("[ ${#TARGETS[@]} -eq 0 ]")[1]
    default_targets = re.search(r"TARGETS=\(([^)]*)\)", defaults).group(1).split()
    assert set(default_targets) == {"operator", "trainer"} <= set(_stages())
