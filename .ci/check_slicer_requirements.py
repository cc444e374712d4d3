#!/usr/bin/env python3
"""CI: prove that the UniversalSeg module's requirement set installs into every supported 3D Slicer.

For each supported release (UniversalSeg/UniversalSegSlicerLib/dependencies.py: its Python and the versions of
numpy, SimpleITK, scipy, pydicom, Pillow, ... it bundles) and each platform Slicer is built for (Linux
manylinux_2_28 and older, Windows win_amd64, macOS arm64 from the release's deployment target), pip resolves
``SLICER_REQUIREMENTS`` with the bundled versions as constraints and torch held to what PyTorchUtils installs
(``torch>=2.8``), wheels only. Resolution only: ``pip install --dry-run --target TMP --report`` into a temporary
folder, deleted after. torch and torchvision enter as metadata-only stand-ins at their minimum versions (see
:func:`torch_stubs`), so no torch wheel is downloaded. A current pip is put in a throw-away virtual environment
first (the CI venv's may be too old for ``--dry-run`` with ``--platform``). Limitation: pip evaluates environment
markers (``sys_platform``...) for the machine it runs on, not for ``--platform``. Prints one line per set and exits 1
with a line naming the release, platform and pip's reason when one does not resolve.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEPENDENCIES = REPO / "UniversalSeg" / "UniversalSegSlicerLib" / "dependencies.py"


def load_dependencies():
    """dependencies.py by path: it needs no Slicer, and the module folder is not a package on sys.path."""
    spec = importlib.util.spec_from_file_location("universalseg_slicer_dependencies", DEPENDENCIES)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


def platforms(release) -> dict[str, list[str]]:
    """pip ``--platform`` tags per platform name (pip does not expand manylinux_2_28 to older glibc, so all go)."""
    mac_major = int(release.macos_target.split(".")[0])
    return {
        "linux": [f"manylinux_2_{minor}_x86_64" for minor in range(28, 16, -1)] + ["manylinux2014_x86_64"],
        "windows": ["win_amd64"],
        "macos": [f"macosx_{mac_major}_0_arm64"],  # pip adds every older macOS version itself
    }


STUB_LABEL = "universalsegci"


def torch_stubs(deps, folder: Path) -> list[str]:
    """Metadata-only wheels of torch and torchvision at their minimum versions, and pins to them.

    In Slicer, PyTorchUtils has installed torch before pip runs and the constraints pin it, so pip never resolves
    torch's own dependencies. Resolving the real torch here would download every candidate wheel (GBs; the index
    serves no separate metadata) and evaluate its Linux-only CUDA markers for Windows and macOS too. A local
    version label keeps the stubs apart from the real releases.
    """
    import zipfile

    folder.mkdir()
    pins = []
    for name, version in (("torch", deps.TORCH_MINIMUM), ("torchvision", deps.TORCHVISION_MINIMUM)):
        full = f"{version}+{STUB_LABEL}"
        info = f"{name}-{full}.dist-info"
        with zipfile.ZipFile(folder / f"{name}-{full}-py3-none-any.whl", "w") as whl:
            whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n")
            whl.writestr(
                f"{info}/WHEEL",
                "Wheel-Version: 1.0\nGenerator: universalseg-ci\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
            )
            whl.writestr(f"{info}/RECORD", "")
        pins.append(f"{name}=={full}")
    return pins


def resolve(
    pip: list[str], deps, release, platform: str, tags: list[str], work: Path, stubs: list[str]
) -> tuple[bool, str]:
    """Resolve one set; returns (ok, one-line summary)."""
    folder = work / f"{release.name}-{platform}"
    folder.mkdir()
    constraints = folder / "constraints.txt"
    pins = [f"{name}=={version}" for name, version in sorted(release.bundled.items())]
    pins += stubs
    constraints.write_text("\n".join(pins) + "\n", encoding="utf-8")
    py = release.python.split(".")
    command = [
        *pip,
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--target",
        str(folder / "target"),
        "--report",
        str(folder / "report.json"),
        "--only-binary=:all:",
        "--python-version",
        "".join(py[:2]),
        "--find-links",
        str(work / "stubs"),
        "--implementation",
        "cp",
        "--abi",
        f"cp{''.join(py[:2])}",
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in tags:
        command += ["--platform", tag]
    command += ["-c", str(constraints), *deps.SLICER_REQUIREMENTS]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        reason = [line for line in run.stderr.splitlines() if line.startswith("ERROR") or "conflict" in line]
        return False, (
            f"Slicer {release.name} / {platform}: the requirement set does not resolve: "
            + (" | ".join(reason[:3]) or run.stderr.strip()[-300:])
        )
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    chosen = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in report["install"]}
    return True, (
        f"Slicer {release.name} / {platform}: resolves, {len(chosen)} distributions "
        f"(monai {chosen.get('monai')}, torch {chosen.get('torch')}, numpy {chosen.get('numpy')}, "
        f"openvino {chosen.get('openvino')})"
    )


def main() -> int:
    start = time.monotonic()
    deps = load_dependencies()
    with tempfile.TemporaryDirectory(prefix="universalseg-slicer-req-") as tmp:
        work = Path(tmp)
        venv.create(work / "venv", with_pip=True)
        python = str(work / "venv" / ("Scripts" if os.name == "nt" else "bin") / "python")
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        upgrade = subprocess.run([*pip, "install", "--quiet", "pip>=24.1"], capture_output=True, text=True)
        if upgrade.returncode != 0:
            print(
                f"check_slicer_requirements: could not install pip>=24.1 for the check: "
                f"{upgrade.stderr.strip()[-300:]}",
                file=sys.stderr,
            )
            return 1
        stubs = torch_stubs(deps, work / "stubs")
        jobs = [
            (release, name, tags) for release in deps.SUPPORTED_RELEASES for name, tags in platforms(release).items()
        ]
        with ThreadPoolExecutor(max_workers=3) as pool:  # network-bound; keeps the 2 CPU cores usable
            results = list(pool.map(lambda job: resolve(pip, deps, job[0], job[1], job[2], work, stubs), jobs))
    for ok, line in results:
        print(line, file=sys.stdout if ok else sys.stderr)
    failed = [line for ok, line in results if not ok]
    print(
        f"check_slicer_requirements: {len(results) - len(failed)}/{len(results)} sets resolve "
        f"({time.monotonic() - start:.0f} s)"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
