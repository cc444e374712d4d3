"""An MRML scene set up as Slicer does at start-up, for scripts and tests without the application."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import slicer


@dataclass
class HeadlessScene:
    """An MRML scene with the module logics Slicer registers at start-up.

    The Python references to the logics are kept here: the application logic does not own them.
    """

    scene: Any
    applicationLogic: Any
    logics: dict[str, Any]


def createHeadlessScene() -> HeadlessScene:
    """A new ``vtkMRMLScene`` set up as Slicer does at start-up (needs only ``slicer-core``).

    Registers the Colors, Volumes, Segmentations, SubjectHierarchy and Data module logics on a
    ``vtkSlicerApplicationLogic``; segment representation conversions exist only once the Segmentations logic
    has a scene.
    """
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    logics: dict[str, Any] = {}
    for name, cls in (
        ("Colors", slicer.vtkSlicerColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("Data", slicer.vtkSlicerDataModuleLogic),
    ):
        moduleLogic = cls()
        moduleLogic.SetMRMLApplicationLogic(applicationLogic)
        moduleLogic.SetMRMLScene(scene)
        applicationLogic.SetModuleLogic(name, moduleLogic)
        logics[name] = moduleLogic
    return HeadlessScene(scene, applicationLogic, logics)
