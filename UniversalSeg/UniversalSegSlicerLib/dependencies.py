"""Python packages the UniversalSeg module needs inside 3D Slicer, and how to install them without harming Slicer.

Three facts drive this module (each read from the named source):

* **Supported Slicer releases** (:data:`SUPPORTED_RELEASES`): 5.10 and 5.12, both with Python 3.12.10
  (Slicer's ``CMakeLists.txt``: ``Slicer_REQUIRED_PYTHON_VERSION``). Slicer 5.6 and 5.8 ship Python 3.9, on which
  ``monai==1.6.1`` (Requires-Python >= 3.10) cannot be installed: :func:`unsupported_slicer_message` says so at
  module load instead of letting pip fail.
* **What each release bundles** (:data:`BUNDLED_DISTRIBUTIONS`): the ``name==version`` pins of Slicer's
  ``SuperBuild/External_python-*.cmake`` files (and ``External_SimpleITK.cmake`` for 5.10, which builds SimpleITK
  from Slicer's fork, tag ``slicer-v2.5.2``), identical in v5.12.0 to v5.12.3. These are **protected**: while
  installing, every one that is installed is pinned to its installed version (a pip constraints file), and a
  requirement that a bundled version does not meet is refused with a message, never "fixed" by pip.
* **PyTorch**: ``monai==1.6.1`` declares ``Requires-Dist: torch>=2.8.0`` (its wheel METADATA), so
  :data:`TORCH_MINIMUM` is 2.8.0 and torchvision 0.23.0 (the release paired with torch 2.8). torch is installed or
  upgraded only by the PyTorch extension's ``PyTorchUtilsLogic.installTorch``, which picks the build for the GPU
  and driver; it is never part of the pip set.

:func:`plan_installation` is pure Python (no Slicer, no network): from the installed versions it returns an
:class:`InstallPlan` that says what pip must install, whether torch must be installed or upgraded, and what
conflicts with Slicer's own packages. :func:`install` carries a plan out inside the application.
``.ci/check_slicer_requirements.py`` resolves :func:`slicer_requirements` plus the pins of each release with pip
for Linux, Windows and macOS wheels, so CI proves the set installs on every supported release.

This file must import on Python 3.9 (Slicer 5.6/5.8), so that an old Slicer gets the message and not a traceback.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

logger = logging.getLogger("UniversalSeg")

#: monai 1.6.1's wheel METADATA: ``Requires-Dist: torch>=2.8.0``; torchvision 0.23 is the release built for torch 2.8.
TORCH_MINIMUM = "2.8.0"
TORCHVISION_MINIMUM = "0.23.0"
TORCH_REQUIREMENT = ">=" + TORCH_MINIMUM
TORCHVISION_REQUIREMENT = ">=" + TORCHVISION_MINIMUM

#: What the module's code path needs inside Slicer, as pip requirements. The engine process (``PythonSlicer -m
#: UniversalSegLib segment``) imports monai, einops (Swin UNETR), nibabel (MONAI's Orientation), safetensors,
#: connected-components-3d and scipy (post-processing), open-clip-torch (free-text prompts), tqdm (download
#: progress), openvino (the faster CPU backend), slicerio (the ``.seg.nrrd`` it writes); the module itself
#: imports rapidfuzz (prompt preview) and SimpleITK. Not here, though the standalone engine has them:
#: highdicom (Slicer's DICOM module exports DICOM SEG) and pydicom/pillow (DICOM input and PNG overlays are
#: command-line features; Slicer bundles both anyway). numpy, scipy and SimpleITK are bundled: they are listed so
#: that a bundled version that is too old is reported, and are never installed or replaced.
SLICER_REQUIREMENTS: tuple[str, ...] = (
    "numpy>=1.24",
    "monai==1.6.1",
    "einops>=0.6",
    "nibabel>=5",
    "SimpleITK>=2.3",
    "safetensors>=0.4",
    "connected-components-3d>=3.12",
    "scipy>=1.10",
    "slicerio>=1.1",
    "rapidfuzz>=3.0",
    "open-clip-torch>=2.24",
    "tqdm>=4.60",
    "openvino>=2024.6",
)


@dataclass(frozen=True)
class SlicerRelease:
    """One supported Slicer release line. ``macos_target``: the macOS deployment target of its factory builds
    (``CMake/SlicerDashboardScript.TEMPLATE.cmake``), i.e. the oldest macOS whose wheels it can use."""

    name: str
    version: tuple[int, int]
    python: str
    macos_target: str
    bundled: Mapping[str, str]


def normalize_name(name: str) -> str:
    """PEP 503 normalized distribution name (``SimpleITK`` -> ``simpleitk``, ``typing_extensions`` ->
    ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(text: str) -> dict[str, str]:
    return {normalize_name(name): version for name, version in (pin.split("==") for pin in text.split())}


#: Distributions each supported release bundles, by normalized name -> version (see the module docstring).
SUPPORTED_RELEASES: tuple[SlicerRelease, ...] = (
    SlicerRelease(
        "5.10",
        (5, 10),
        "3.12.10",
        "13.0",
        _pins("""
        numpy==2.0.2 scipy==1.13.1 simpleitk==2.5.2 pydicom==2.4.4 pillow==11.2.1 six==1.17.0 retrying==1.3.4
        dicomweb-client==0.60.0 chardet==5.2.0 couchdb==1.2 gitdb==4.0.12 smmap==5.0.2 gitpython==3.1.44
        cryptography==45.0.3 pyjwt==2.10.1 wrapt==1.17.2 deprecated==1.2.18 pycparser==2.22 cffi==1.17.1
        pynacl==1.5.0 python-dateutil==2.9.0.post0 typing-extensions==4.14.0 pygithub==2.6.1 pip==25.1.1
        packaging==25.0 pyparsing==3.2.3 certifi==2025.4.26 idna==3.10 charset-normalizer==3.4.2 urllib3==2.4.0
        requests==2.32.3 setuptools==80.9.0 wheel==0.45.1"""),
    ),
    SlicerRelease(
        "5.12",
        (5, 12),
        "3.12.10",
        "14.0",
        _pins("""
        numpy==2.4.6 scipy==1.17.1 simpleitk==2.5.5 pydicom==3.0.2 pillow==12.2.0 six==1.17.0 retrying==1.4.2
        dicomweb-client==0.61.0 dcmqi==0.4.0 highdicom==0.27.0 pyjpegls==1.5.1 typing-extensions==4.15.0
        chardet==7.4.3 couchdb==1.2 gitdb==4.0.12 smmap==5.0.3 gitpython==3.1.50 cryptography==48.0.0
        pyjwt==2.13.0 wrapt==2.2.1 deprecated==1.3.1 pycparser==3.0 cffi==2.0.0 pynacl==1.6.2
        python-dateutil==2.9.0.post0 pygithub==2.9.1 pip==26.1.1 packaging==26.2 pyparsing==3.3.2
        certifi==2026.5.20 idna==3.16 charset-normalizer==3.4.7 urllib3==2.7.0 requests==2.34.2 setuptools==82.0.1
        wheel==0.47.0"""),
    ),
)
OLDEST_SUPPORTED: tuple[int, int] = SUPPORTED_RELEASES[0].version
#: Python the engine's dependencies need (monai 1.6.1: Requires-Python >= 3.10).
MINIMUM_PYTHON: tuple[int, int] = (3, 10)
#: Installed by the PyTorch extension, pinned while pip installs the rest (pip would swap in a CPU build).
TORCH_DISTRIBUTIONS: tuple[str, ...] = ("torch", "torchvision")


def release_for(version: tuple[int, int]) -> SlicerRelease | None:
    """The supported release line of Slicer ``version`` (major, minor); None when it is not one of them."""
    return next((r for r in SUPPORTED_RELEASES if r.version == tuple(version[:2])), None)


def protected_names(version: tuple[int, int] | None = None) -> tuple[str, ...]:
    """Normalized names of the distributions pip must not touch in Slicer ``version``: what that release bundles
    (a newer, not yet listed release: what the newest listed one bundles), plus torch and torchvision."""
    release = release_for(version) if version else None
    if release is None:
        release = SUPPORTED_RELEASES[-1]
    return tuple(sorted(release.bundled)) + TORCH_DISTRIBUTIONS


def unsupported_slicer_message(version: tuple[int, int], python: tuple[int, int] = sys.version_info[:2]) -> str | None:
    """One line for a Slicer that cannot run UniversalSeg, or None when it can. Releases newer than the newest
    supported one are accepted (their bundled packages are protected by name and installed version)."""
    supported = " and ".join(r.name for r in SUPPORTED_RELEASES)
    if tuple(version[:2]) < OLDEST_SUPPORTED or tuple(python[:2]) < MINIMUM_PYTHON:
        return (
            f"UniversalSeg needs 3D Slicer {supported} (Python {SUPPORTED_RELEASES[-1].python}); this is Slicer "
            f"{version[0]}.{version[1]} with Python {python[0]}.{python[1]}, which cannot install the engine's "
            f"packages (monai 1.6.1 needs Python >= 3.10). Install Slicer {SUPPORTED_RELEASES[-1].name} from "
            "download.slicer.org."
        )
    return None


@dataclass(frozen=True)
class Requirement:
    """A parsed ``name<specifier>`` pip requirement (no extras, no markers)."""

    name: str  # as written, e.g. "SimpleITK"
    specifier: str  # e.g. ">=2.3", "==1.6.1", or ""

    @property
    def key(self) -> str:
        return normalize_name(self.name)

    def __str__(self) -> str:
        return self.name + self.specifier

    @classmethod
    def parse(cls, text: str) -> "Requirement":
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)\s*((?:[<>=!~]=?[^,;\s]+\s*,?\s*)*)", text)
        if not match:
            raise ValueError(f"not a simple pip requirement: {text!r}")
        return cls(match.group(1), match.group(2).replace(" ", ""))

    def satisfied_by(self, version: str) -> bool:
        """Whether installed ``version`` meets the specifier (pre-releases count, as pip's check does)."""
        from packaging.specifiers import SpecifierSet  # part of Slicer's Python (PythonQt requirements)
        from packaging.version import InvalidVersion

        try:
            return SpecifierSet(self.specifier).contains(version, prereleases=True)
        except InvalidVersion:
            return False


@dataclass
class InstallPlan:
    """What :func:`plan_installation` found. ``install``: requirements pip must install (missing, or installed
    too old and not protected); ``torch``: ``"install"`` (torch or torchvision missing), ``"upgrade"`` (installed
    too old, ``torch_found`` says which version) or None; ``conflicts``: one line per bundled or protected package
    whose installed version the module cannot use (refused: Slicer's own packages are never replaced);
    ``constraints``: ``name==version`` pins for pip, one per installed protected distribution."""

    install: list[str] = field(default_factory=list)
    torch: str | None = None
    torch_found: str | None = None
    conflicts: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        """Nothing to install and nothing in conflict: the engine can run."""
        return not (self.install or self.torch or self.conflicts)

    def describe(self) -> list[str]:
        """Human-readable lines: what will be installed or upgraded (for a confirmation dialog)."""
        lines = []
        if self.torch == "install":
            lines.append(
                f"PyTorch (torch{TORCH_REQUIREMENT}, torchvision{TORCHVISION_REQUIREMENT}) through the "
                "PyTorch extension"
            )
        elif self.torch == "upgrade":
            lines.append(
                f"PyTorch upgrade from {self.torch_found} to torch{TORCH_REQUIREMENT} through the PyTorch extension"
            )
        lines.extend(self.install)
        return lines


def plan_installation(
    installed: Mapping[str, str | None],
    slicer_version: tuple[int, int] | None = None,
    requirements: Sequence[str] = SLICER_REQUIREMENTS,
) -> InstallPlan:
    """Decide what to install, given ``installed``: distribution name -> installed version (None or absent:
    not installed; names in any spelling). ``slicer_version`` (major, minor) selects the protected set."""
    versions = {normalize_name(k): v for k, v in installed.items() if v}
    protected = set(protected_names(slicer_version))
    plan = InstallPlan()
    for text in requirements:
        req = Requirement.parse(text)
        found = versions.get(req.key)
        if found is not None and req.satisfied_by(found):
            continue
        if req.key in protected and found is not None:
            plan.conflicts.append(
                f"{req.name} {found} is part of this Slicer, but UniversalSeg needs {req}; "
                "it is not replaced (Slicer relies on it): use a supported Slicer release"
            )
        elif req.key in protected:
            plan.conflicts.append(
                f"{req.name} is missing from this Slicer's Python, but Slicer bundles it; reinstall Slicer"
            )
        else:
            plan.install.append(str(req))
    torch, vision = versions.get("torch"), versions.get("torchvision")
    if torch is None or vision is None:
        plan.torch = "install"
    elif not (
        Requirement("torch", TORCH_REQUIREMENT).satisfied_by(torch)
        and Requirement("torchvision", TORCHVISION_REQUIREMENT).satisfied_by(vision)
    ):
        plan.torch, plan.torch_found = "upgrade", torch
    plan.constraints = [f"{name}=={versions[name]}" for name in sorted(protected) if name in versions]
    return plan


def installed_versions(names: Sequence[str] | None = None) -> dict[str, str | None]:
    """Installed version of each distribution in ``names`` (default: the requirements, the protected set of the
    newest release, torch and torchvision), None when not installed."""
    if names is None:
        names = [Requirement.parse(r).key for r in SLICER_REQUIREMENTS] + list(protected_names())
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[normalize_name(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[normalize_name(name)] = None
    return out


def write_constraints(plan: InstallPlan, path: str | Path) -> Path:
    """Write ``plan.constraints`` as a pip constraints file (``pip install -c path``)."""
    path = Path(path)
    path.write_text(
        "# Slicer's own packages, pinned by UniversalSeg while installing\n"
        + "".join(line + "\n" for line in plan.constraints),
        encoding="utf-8",
    )
    return path


class DependencyError(RuntimeError):
    """Installing failed or was refused; the message says what happened and what to do."""


def install(
    plan: InstallPlan,
    pip_install: Callable[[list[str]], None],
    torch_logic=None,
    constraints_dir: str | Path | None = None,
    log: Callable[[str], None] = logger.info,
) -> bool:
    """Carry out ``plan`` in the Slicer application; True when Slicer must restart to use what changed.

    ``pip_install``: ``slicer.util.pip_install`` (called with a list ``["-c", constraints, *requirements]``, the
    form both 5.10's and 5.12's ``pip_install`` pass to pip unchanged). ``torch_logic``: a
    ``PyTorchUtils.PyTorchUtilsLogic()``, needed when ``plan.torch`` is set; its ``installTorch(askConfirmation=True,
    torchVersionRequirement=..., torchvisionVersionRequirement=...)`` shows the user the exact command first. It
    runs pip (through light-the-torch) in a child process that inherits this environment
    (``slicer.util._executePythonModule``, 5.10 and 5.12), so ``PIP_CONSTRAINT`` protects Slicer's packages from
    torch's own dependencies too.

    Raises:
        DependencyError: conflicts with Slicer's packages, PyTorch not installed, or pip failing.
    """
    if plan.conflicts:
        raise DependencyError(plan.conflicts[0])
    folder = Path(constraints_dir) if constraints_dir else Path(tempfile.mkdtemp(prefix="UniversalSeg-pip-"))
    restart = False
    if plan.torch:
        if torch_logic is None:
            raise DependencyError(
                "UniversalSeg needs the PyTorch extension: install 'PyTorch' from the Extensions "
                "Manager, restart Slicer, and click Segment again"
            )
        restart = plan.torch == "upgrade" or "torch" in sys.modules  # a loaded torch cannot be swapped in-process
        log(("Upgrading" if plan.torch == "upgrade" else "Installing") + " PyTorch (this can take several minutes)...")
        others = InstallPlan(constraints=[c for c in plan.constraints if c.split("==")[0] not in TORCH_DISTRIBUTIONS])
        try:
            with pip_constraint_environment(write_constraints(others, folder / "slicer-constraints-torch.txt"), log):
                torch = torch_logic.installTorch(
                    askConfirmation=True,
                    torchVersionRequirement=TORCH_REQUIREMENT,
                    torchvisionVersionRequirement=TORCHVISION_REQUIREMENT,
                )
        except Exception as exc:  # noqa: BLE001 - light-the-torch / pip fail in many ways
            raise DependencyError(
                f"installing PyTorch failed ({exc}); install torch{TORCH_REQUIREMENT} in the "
                "'PyTorch Utils' module, restart Slicer and try again"
            ) from None
        if torch is None:
            raise DependencyError(
                f"PyTorch was not installed; install torch{TORCH_REQUIREMENT} in the "
                "'PyTorch Utils' module and click Segment again"
            )
        plan = replace_constraints(plan)  # pin the torch that is there now
    if plan.install:
        constraints = write_constraints(plan, folder / "slicer-constraints.txt")
        log(f"Installing {', '.join(plan.install)} ...")
        try:
            pip_install(["-c", str(constraints), *plan.install])
        except Exception as exc:  # noqa: BLE001 - CalledProcessError and friends
            raise DependencyError(
                f"pip could not install {', '.join(plan.install)} next to this Slicer's own "
                f"packages ({exc}); see the Python console for pip's message"
            ) from None
        importlib.invalidate_caches()
        restart = restart or any(Requirement.parse(r).key.replace("-", "_") in sys.modules for r in plan.install)
    return restart


@contextlib.contextmanager
def pip_constraint_environment(path: Path, log: Callable[[str], None] = logger.info) -> Iterator[None]:
    """Set ``PIP_CONSTRAINT`` to ``path`` (added to any already set) while the block runs, then restore it. pip
    splits that variable at whitespace, so a path containing any is not set (logged instead)."""
    if any(ch.isspace() for ch in str(path)):
        log(f"PyTorch is installed without constraints: pip cannot take the path {path} from PIP_CONSTRAINT")
        yield
        return
    before = os.environ.get("PIP_CONSTRAINT")
    os.environ["PIP_CONSTRAINT"] = f"{before} {path}" if before else str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PIP_CONSTRAINT", None)
        else:
            os.environ["PIP_CONSTRAINT"] = before


def replace_constraints(plan: InstallPlan) -> InstallPlan:
    """``plan`` with the torch and torchvision pins re-read from what is installed now (after PyTorchUtils ran)."""
    now = installed_versions(list(TORCH_DISTRIBUTIONS))
    pins = dict(c.split("==") for c in plan.constraints)
    pins.update({k: v for k, v in now.items() if v})
    return InstallPlan(
        install=list(plan.install),
        conflicts=list(plan.conflicts),
        constraints=[f"{k}=={v}" for k, v in sorted(pins.items())],
    )
