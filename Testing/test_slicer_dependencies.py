"""What the Slicer module installs, and how (issue 13, defects 1-3): supported releases, PyTorch minimum and upgrade,
Slicer's bundled packages protected. Pure Python: UniversalSeg/UniversalSegSlicerLib/dependencies.py needs no Slicer."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UniversalSeg"))

from UniversalSegSlicerLib import dependencies as deps  # noqa: E402

#: What a Slicer 5.12 with everything installed looks like (its bundled versions, plus the module's packages).
SLICER_512 = {
    **next(r for r in deps.SUPPORTED_RELEASES if r.name == "5.12").bundled,
    "monai": "1.6.1",
    "einops": "0.8.1",
    "nibabel": "5.3.2",
    "safetensors": "0.5.3",
    "connected-components-3d": "3.24.0",
    "slicerio": "1.1.2",
    "RapidFuzz": "3.13.0",
    "open_clip_torch": "3.1.0",
    "tqdm": "4.67.1",
    "openvino": "2025.2.0",
    "torch": "2.9.1",
    "torchvision": "0.24.1",
}


def test_supported_releases_and_their_python():
    assert [r.name for r in deps.SUPPORTED_RELEASES] == ["5.10", "5.12"]
    assert {r.python for r in deps.SUPPORTED_RELEASES} == {"3.12.10"}
    r510, r512 = deps.SUPPORTED_RELEASES
    # read from Slicer's SuperBuild/External_python-*.cmake (v5.10.0, v5.12.0-v5.12.3)
    assert (r510.bundled["numpy"], r510.bundled["pydicom"], r510.bundled["pillow"], r510.bundled["simpleitk"]) == (
        "2.0.2",
        "2.4.4",
        "11.2.1",
        "2.5.2",
    )
    assert (r512.bundled["numpy"], r512.bundled["pydicom"], r512.bundled["highdicom"], r512.bundled["simpleitk"]) == (
        "2.4.6",
        "3.0.2",
        "0.27.0",
        "2.5.5",
    )


def test_old_slicer_gets_one_clear_message():
    message = deps.unsupported_slicer_message((5, 8), (3, 9))
    assert message and "\n" not in message and "5.10 and 5.12" in message and "Python 3.9" in message
    assert deps.unsupported_slicer_message((5, 6), (3, 9))
    assert deps.unsupported_slicer_message((5, 10), (3, 12)) is None
    assert deps.unsupported_slicer_message((5, 12), (3, 12)) is None
    assert deps.unsupported_slicer_message((5, 14), (3, 12)) is None  # newer: accepted, packages protected by name


def test_module_file_parses_on_the_python_of_old_slicer():
    """Slicer 5.6/5.8 (Python 3.9) must be able to read the files that produce the message."""
    import ast

    for path in (
        REPO / "UniversalSeg" / "UniversalSeg.py",
        REPO / "UniversalSeg" / "UniversalSegSlicerLib" / "dependencies.py",
    ):
        ast.parse(path.read_text(encoding="utf-8"), feature_version=(3, 9))


def test_torch_minimum_is_what_monai_requires():
    """monai 1.6.1 declares torch>=2.8.0; an older torch must not pass (it was '>=2.1')."""
    (monai,) = [r for r in deps.SLICER_REQUIREMENTS if r.startswith("monai")]
    assert monai == f"monai=={importlib.metadata.version('monai')}"
    torch_req = [r for r in importlib.metadata.requires("monai") if re.match(r"torch\b", r) and "extra" not in r]
    assert torch_req, "monai declares no torch requirement"
    minimum = re.search(r">=\s*([0-9.]+)", torch_req[0]).group(1)
    assert deps.TORCH_REQUIREMENT == f">={minimum}" == ">=2.8.0"


def test_too_old_torch_is_detected_and_an_upgrade_planned():
    plan = deps.plan_installation({**SLICER_512, "torch": "2.1.2", "torchvision": "0.16.2"}, (5, 12))
    assert plan.torch == "upgrade" and plan.torch_found == "2.1.2" and not plan.install and not plan.conflicts
    assert any("upgrade from 2.1.2" in line for line in plan.describe())
    assert deps.plan_installation({**SLICER_512, "torchvision": "0.16.2"}, (5, 12)).torch == "upgrade"
    assert deps.plan_installation({k: v for k, v in SLICER_512.items() if k != "torch"}, (5, 12)).torch == "install"
    assert deps.plan_installation(SLICER_512, (5, 12)).ready


def test_missing_packages_are_planned_and_slicer_packages_pinned():
    installed = {k: v for k, v in SLICER_512.items() if k not in ("monai", "open_clip_torch")}
    plan = deps.plan_installation(installed, (5, 12))
    assert plan.install == ["monai==1.6.1", "open-clip-torch>=2.24"]
    pins = dict(c.split("==") for c in plan.constraints)
    expected = {deps.normalize_name(k): v for k, v in SLICER_512.items()}
    for name in (
        "numpy",
        "scipy",
        "simpleitk",
        "pydicom",
        "pillow",
        "requests",
        "packaging",
        "highdicom",
        "torch",
        "torchvision",
    ):
        assert pins[name] == expected[name], name
    assert pins["pydicom"] == "3.0.2" and pins["torch"] == "2.9.1"


def test_slicer_packages_are_refused_not_replaced():
    plan = deps.plan_installation({**SLICER_512, "numpy": "1.21.0", "SimpleITK": "2.2.1"}, (5, 12))
    assert not plan.install  # never "numpy>=1.24": pip would replace Slicer's numpy
    assert len(plan.conflicts) == 2 and all("\n" not in c and "not replaced" in c for c in plan.conflicts)
    assert any(c.startswith("numpy 1.21.0") for c in plan.conflicts)
    with pytest.raises(deps.DependencyError, match="numpy 1.21.0"):
        deps.install(plan, pip_install=lambda args: pytest.fail("pip must not run"))


def test_only_what_the_module_needs_inside_slicer():
    names = {deps.Requirement.parse(r).key for r in deps.SLICER_REQUIREMENTS}
    assert "highdicom" not in names  # Slicer's DICOM module exports DICOM SEG
    assert not {"torch", "torchvision"} & names  # PyTorchUtils installs them
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    engine = {
        deps.Requirement.parse(r.split(";")[0]).key: deps.Requirement.parse(r.split(";")[0]).specifier for r in project
    }
    for text in deps.SLICER_REQUIREMENTS:  # same pins as the engine's own package
        req = deps.Requirement.parse(text)
        assert engine.get(req.key) == req.specifier, text


def test_engine_imports_are_declared():
    """Every third-party module the Slicer code path imports (module, module package, engine) is a requirement or
    bundled with Slicer; the command-line-only ones (DICOM SEG, PNG overlays, DICOM input) are the exceptions."""
    import ast

    distribution_of = {
        "SimpleITK": "simpleitk",
        "cc3d": "connected-components-3d",
        "open_clip": "open-clip-torch",
        "PIL": "pillow",
        "nrrd": "pynrrd",
        "yaml": "pyyaml",
    }
    allowed = {deps.Requirement.parse(r).key for r in deps.SLICER_REQUIREMENTS} | set(deps.protected_names())
    allowed |= {"pynrrd"}  # slicerio's own dependency
    command_line_only = {"highdicom", "pydicom", "pillow"}
    stdlib = set(sys.stdlib_module_names)
    local = {
        "UniversalSegLib",
        "UniversalSegSlicerLib",
        "slicer",
        "vtk",
        "qt",
        "ctk",
        "PyTorchUtils",
        "SampleData",
        "training",
        "UniversalSeg",
        "fcntl",
        "msvcrt",
    }
    files = [
        REPO / "UniversalSeg" / "UniversalSeg.py",
        *(REPO / "UniversalSeg" / "UniversalSegSlicerLib").glob("*.py"),
        *(REPO / "UniversalSegLib").rglob("*.py"),
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module.split(".")[0]]
            else:
                continue
            for module in modules:
                if module in stdlib or module in local:
                    continue
                dist = deps.normalize_name(distribution_of.get(module, module))
                assert dist in allowed or dist in command_line_only, f"{path.name} imports {module}: not declared"


class FakeTorchLogic:
    def __init__(self, result="torch-module"):
        self.calls, self.result = [], result

    def installTorch(self, **kwargs):  # noqa: N802 - PyTorchUtilsLogic's name
        self.calls.append(kwargs)
        self.environment = os.environ.get("PIP_CONSTRAINT")
        self.constraints = Path(self.environment).read_text(encoding="utf-8").splitlines() if self.environment else []
        return self.result


def test_install_uses_pytorchutils_then_pip_with_slicer_constraints(tmp_path):
    installed = {k: v for k, v in SLICER_512.items() if k not in ("monai",)}
    installed.update(torch="2.1.2", torchvision="0.16.2")
    plan = deps.plan_installation(installed, (5, 12))
    torch_logic, pip_calls = FakeTorchLogic(), []
    restart = deps.install(plan, pip_calls.append, torch_logic, constraints_dir=tmp_path, log=lambda line: None)
    assert torch_logic.calls == [
        {"askConfirmation": True, "torchVersionRequirement": ">=2.8.0", "torchvisionVersionRequirement": ">=0.23.0"}
    ]
    assert restart is True  # an upgraded torch needs a restart
    # torch's own dependencies cannot replace Slicer's packages either; torch itself is not pinned there
    assert "numpy==2.4.6" in torch_logic.constraints and "typing-extensions==4.15.0" in torch_logic.constraints
    assert not any(c.startswith(("torch==", "torchvision==")) for c in torch_logic.constraints)
    assert "PIP_CONSTRAINT" not in os.environ  # restored
    (args,) = pip_calls
    assert args[0] == "-c" and args[2:] == ["monai==1.6.1"]
    constraints = Path(args[1]).read_text(encoding="utf-8").splitlines()
    assert "numpy==2.4.6" in constraints and "pydicom==3.0.2" in constraints and "pillow==12.2.0" in constraints


def test_install_says_what_to_do_without_the_pytorch_extension_or_when_declined():
    plan = deps.plan_installation({k: v for k, v in SLICER_512.items() if k != "torch"}, (5, 12))
    with pytest.raises(deps.DependencyError, match="PyTorch extension"):
        deps.install(plan, pip_install=lambda args: None, torch_logic=None)
    with pytest.raises(deps.DependencyError, match="PyTorch was not installed"):
        deps.install(plan, pip_install=lambda args: None, torch_logic=FakeTorchLogic(result=None))


def test_ci_check_covers_every_release_and_platform():
    spec = importlib.util.spec_from_file_location(
        "check_slicer_requirements", REPO / ".ci" / "check_slicer_requirements.py"
    )
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    r510, r512 = deps.SUPPORTED_RELEASES
    assert check.platforms(r512)["macos"] == ["macosx_14_0_arm64"] and check.platforms(r510)["macos"] == [
        "macosx_13_0_arm64"
    ]
    assert {"manylinux_2_28_x86_64", "manylinux2014_x86_64"} <= set(check.platforms(r512)["linux"])
    assert check.platforms(r512)["windows"] == ["win_amd64"]
    run = (REPO / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()
    commands = [line for line in run if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] == "python -m pytest -q Testing"
    assert commands[-2].startswith("python .ci/check_slicer_requirements.py")


# ------------------------------------------------------------------------------ the module file (defects 8, 9c)
def _module():
    from conftest import require_slicer_core

    require_slicer_core()  # skips without slicer-core; fails in CI
    import UniversalSeg as US  # the module script, importable with slicer-core

    return US


def test_self_test_is_not_a_ctest():
    cmake = (REPO / "UniversalSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    code = [line.split("#")[0] for line in cmake.splitlines()]
    assert not any("slicer_add_python_unittest" in line for line in code)


def test_self_test_reports_a_skip_as_a_skip(monkeypatch):
    """Slicer's "Reload and Test" calls runTest() directly (no unittest runner): a skip must not escape as an error."""
    US = _module()
    case = US.UniversalSegTest()
    shown = []
    monkeypatch.setattr(case, "setUp", lambda: None)
    monkeypatch.setattr(case, "test_SegmentSampleCT", lambda: case.skipTest("restart Slicer and run it again"))
    case.delayDisplay = shown.append
    case.runTest()
    assert shown == ["Self-test skipped: restart Slicer and run it again"]


def test_module_texts_are_wrapped_for_translation():
    import ast

    tree = ast.parse((REPO / "UniversalSeg" / "UniversalSeg.py").read_text(encoding="utf-8"))
    init = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "UniversalSeg")
    wrapped = {}
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
            value = node.value.elts[0] if isinstance(node.value, ast.List) and node.value.elts else node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
                wrapped.setdefault(node.targets[0].attr, value.func.id)
    assert wrapped.get("title") == "_" and wrapped.get("helpText") == "_" and wrapped.get("acknowledgementText") == "_"
    assert wrapped.get("categories") == "translate"  # Slicer's category names live in qSlicerAbstractCoreModule


def test_logic_reports_nothing_missing_here():
    """This environment has the engine installed: the module's own check agrees."""
    US = _module()
    assert US.UniversalSegLogic.missingDependencies() == []
    with pytest.raises(US.EngineError, match="needs the Slicer application"):
        US.UniversalSegLogic(US.createHeadlessScene().scene).installDependencies()
