"""The segments this module makes: tags, states, fingerprints, cheap edit tracking, and conversions between
numpy masks and Slicer's binary labelmaps (``vtkOrientedImageData``).

Array conventions: a volume of ``(I, J, K)`` voxels is a numpy array of shape ``(K, J, I)`` (slice, row, column);
voxel positions given as lists are ``(i, j, k)``; geometry is Slicer's IJK-to-RAS ``vtkMatrix4x4``.
No Qt here: everything works with the PyPI package ``slicer-core``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

import UniversalSegLib
from UniversalSegLib.catalog import ClassCatalog, ClassInfo
from UniversalSegLib.errors import InputError

ENGINE_VERSION: str = UniversalSegLib.__version__

#: Prefix of the segment tags this module writes (kept in .seg.nrrd files and scenes).
TAG_PREFIX = "UniversalSeg."
TAG_CLASS_INDEX = TAG_PREFIX + "ClassIndex"  # 1-based catalog index; marks a segment as made by this module
TAG_CLASS_NAME = TAG_PREFIX + "ClassName"  # catalog file stem, e.g. "right_kidney"
TAG_MODEL = TAG_PREFIX + "Model"  # model name (registry name or checkpoint file name)
TAG_MODEL_LICENCE = TAG_PREFIX + "ModelLicence"
TAG_ENGINE_VERSION = TAG_PREFIX + "EngineVersion"
TAG_CREATED = TAG_PREFIX + "Created"  # ISO 8601 UTC time the AI mask was imported
TAG_SETTINGS = TAG_PREFIX + "Settings"  # compact JSON: threshold, overlap, fast, post-processing, device
TAG_FINGERPRINT = TAG_PREFIX + "Fingerprint"  # maskFingerprint() of the mask as imported
TAG_REVIEWED = TAG_PREFIX + "Reviewed"  # ISO time the user marked the AI mask as correct (issue: correction loop)
PROVENANCE_TAGS = (
    TAG_CLASS_INDEX,
    TAG_CLASS_NAME,
    TAG_MODEL,
    TAG_MODEL_LICENCE,
    TAG_ENGINE_VERSION,
    TAG_CREATED,
    TAG_SETTINGS,
    TAG_FINGERPRINT,
    TAG_REVIEWED,
)

#: Segment states (``UniversalSegLogic.segmentState``).
STATE_AI = "ai"  # made by this module, unchanged since
STATE_EDITED = "edited"  # made by this module, mask changed since (by the Segment Editor, a script, ...)
STATE_REVIEWED = "reviewed"  # made by this module, unchanged, and marked correct by the user
STATE_MANUAL = "manual"  # not made by this module
SEGMENT_STATES = (STATE_AI, STATE_EDITED, STATE_REVIEWED, STATE_MANUAL)

BINARY_LABELMAP = "Binary labelmap"


# ------------------------------------------------------------------------------------------------- reports
@dataclass
class ImportReport:
    """What an import did to the output segmentation; lists hold display names, in catalog order.

    ``added``: new segments; ``updated``: unedited AI segments replaced by the new result; ``keptEdited`` /
    ``keptReviewed``: segments the user edited / marked reviewed, left as they are; ``keptManual``: segments the
    user made with a class's name, left as they are; ``replaced``: edited/reviewed/manual segments replaced because
    ``overwrite`` was set; ``empty``: classes the model found nothing for (their segments exist, empty).
    """

    segmentationNode: Any = None
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    keptEdited: list[str] = field(default_factory=list)
    keptReviewed: list[str] = field(default_factory=list)
    keptManual: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    segmentIds: dict[int, str] = field(default_factory=dict)  # catalog index -> segment ID (every class of the run)
    model: str = ""

    @property
    def kept(self) -> list[str]:
        return self.keptEdited + self.keptReviewed + self.keptManual

    def toText(self) -> str:
        """A few lines for the status area and the log."""
        lines = []
        for label, names in (
            ("Added", self.added),
            ("Updated", self.updated),
            ("Replaced (overwrite)", self.replaced),
            ("Kept, edited by you", self.keptEdited),
            ("Kept, marked reviewed", self.keptReviewed),
            ("Kept, your own segment of the same name", self.keptManual),
            ("Nothing found (empty segment)", self.empty),
        ):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        if self.kept:
            lines.append("Kept segments were not replaced; tick 'Overwrite edited segments' to replace them.")
        return "\n".join(lines) if lines else "No segments were changed."


@dataclass
class SegmentReview:
    """One segment as the review table and the training export see it.

    ``state``: ``UniversalSegLogic.segmentState``; ``reviewed``: marked reviewed (the module's tag or the Segment
    Editor's "Completed" status); ``flagged``: the Segment Editor's "Flagged" status; ``annotated``: exported as an
    annotated class by "Export for training" (``confirmation`` says how: reviewed / edited / manual), else
    ``reason`` says why not; ``duplicate``: another confirmed segment has the same class (the export refuses);
    ``stale``: its labelmap changed (or was loaded) since its voxels were last compared with the AI mask, and
    ``state`` is the state found then (a review without verification reads no voxels; "Refresh" does).
    """

    segmentId: str
    name: str
    classIndex: int | None
    className: str | None
    state: str
    reviewed: bool = False
    flagged: bool = False
    annotated: bool = False
    confirmation: str = ""
    reason: str = ""
    duplicate: bool = False
    stale: bool = False

    @property
    def stateText(self) -> str:
        """What the review table shows: AI / Reviewed / Edited / Manual (reviewed) [flagged] [changed]."""
        text = {STATE_AI: "AI", STATE_REVIEWED: "Reviewed", STATE_EDITED: "Edited", STATE_MANUAL: "Manual"}[self.state]
        if self.state in (STATE_MANUAL, STATE_EDITED) and self.reviewed:
            text += ", reviewed"
        text += ", flagged" if self.flagged else ""
        return text + (" (changed since the last check)" if self.stale else "")

    @property
    def trainingText(self) -> str:
        """What the review table shows in its training column."""
        return f"annotated ({self.confirmation})" if self.annotated else f"not annotated: {self.reason}"


# ------------------------------------------------------------------------------------------- segment helpers
def tagValue(text: Any) -> str:
    """A segment tag value that survives .seg.nrrd storage (tags are stored as ``key:value|key:value``)."""
    return str(text).replace("|", "/").replace("\r", " ").replace("\n", " ")


def segmentIds(segmentation) -> list[str]:
    """The segment IDs of a ``vtkSegmentation``, in order."""
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def getTag(segment, tag: str) -> str | None:
    """A segment tag's value, None when the segment has no such tag."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def describeSegment(segment, info: ClassInfo, catalog: ClassCatalog) -> None:
    """Name, colour and terminology of a class on a segment."""
    segment.SetName(info.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*(c / 255.0 for c in info.color))
    segment.SetColorAutoGenerated(False)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), catalog.slicer_terminology(info))


def ijkToRas(volumeNode):
    """A volume node's IJK-to-RAS matrix (a new ``vtkMatrix4x4``)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def matrixArray(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def sameMatrix(a, b, tolerance: float = 1e-4) -> bool:
    return all(
        abs(a.GetElement(r, c) - b.GetElement(r, c)) <= tolerance * max(1.0, abs(a.GetElement(r, c)))
        for r in range(4)
        for c in range(4)
    )


def volumeArray(volumeNode) -> np.ndarray:
    """A volume's voxels as a ``(K, J, I)`` array (a copy, the volume's scalar type)."""
    image = volumeNode.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def boundingBox(mask: np.ndarray) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``(lo, hi)`` (k, j, i) of the True voxels of a ``(K, J, I)`` mask (hi exclusive); None when empty.

    Slices are found first and the rows/columns only within them: a small organ in a full CT costs one pass."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if len(slices) == 0:
        return None
    k0, k1 = int(slices[0]), int(slices[-1]) + 1
    sub = mask[k0:k1]
    rows = np.flatnonzero(sub.any(axis=(0, 2)))
    columns = np.flatnonzero(sub.any(axis=(0, 1)))
    return (k0, int(rows[0]), int(columns[0])), (k1, int(rows[-1]) + 1, int(columns[-1]) + 1)


def cropMask(mask: np.ndarray) -> tuple[np.ndarray | None, list[int]]:
    """A ``(K, J, I)`` bool mask cropped to its bounding box (contiguous copy) and the (i, j, k) of its first
    voxel; ``(None, [])`` when empty."""
    box = boundingBox(mask)
    if box is None:
        return None, []
    (k0, j0, i0), (k1, j1, i1) = box
    return np.ascontiguousarray(mask[k0:k1, j0:j1, i0:i1]), [i0, j0, k0]


def segmentMask(labelmap, labelValue: int) -> tuple[np.ndarray | None, list[int]]:
    """A segment's voxels in a (possibly shared) labelmap: bool ``(K, J, I)`` crop to the bounding box and the
    (i, j, k) index of its first voxel in the labelmap's grid; (None, []) when empty."""
    extent = labelmap.GetExtent()
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    scalars = labelmap.GetPointData().GetScalars() if min(dims) > 0 else None
    if scalars is None:
        return None, []
    crop, start = cropMask(numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]) == labelValue)
    if crop is None:
        return None, []
    return crop, [extent[0] + start[0], extent[2] + start[1], extent[4] + start[2]]


def orientedImageFromCrop(crop: np.ndarray | None, start: Sequence[int], matrix) -> Any:
    """A binary labelmap (``vtkOrientedImageData``, uint8 0/1) of a cropped ``(K, J, I)`` mask whose first voxel
    is at (i, j, k) = ``start`` of the grid with IJK-to-RAS ``matrix``; an empty mask gives a 1-voxel zero image."""
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(matrix)
    if crop is None or crop.size == 0:
        image.SetExtent(0, 0, 0, 0, 0, 0)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
        return image
    i0, j0, k0 = (int(s) for s in start)
    k, j, i = crop.shape
    image.SetExtent(i0, i0 + i - 1, j0, j0 + j - 1, k0, k0 + k - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(crop.shape)[:] = crop
    image.Modified()
    return image


def orientedImageFromMask(mask: np.ndarray, matrix) -> Any:
    """A binary labelmap of a full ``(K, J, I)`` mask, cropped to its bounding box, on the grid of ``matrix``."""
    crop, start = cropMask(np.asarray(mask, dtype=bool))
    return orientedImageFromCrop(crop, start, matrix)


# ------------------------------------------------------------------------------------------- fingerprints
def maskFingerprint(crop: np.ndarray | None, start: Sequence[int], matrix) -> str:
    """SHA-256 of a mask given as its bounding-box crop ``(K, J, I)``, the (i, j, k) of its first voxel and its
    grid's IJK-to-RAS matrix (``vtkMatrix4x4`` or 4x4 array). Independent of how Slicer stores the segment (shared layers, label values, padding
    of the extent); any voxel change, added or erased, changes it."""
    digest = hashlib.sha256()
    if crop is None or crop.size == 0:
        digest.update(b"empty")
        return digest.hexdigest()
    values = matrix if isinstance(matrix, np.ndarray) else matrixArray(matrix)  # numpy: usable off the GUI thread
    geometry = [round(float(values[r, c]), 4) + 0.0 for r in range(3) for c in range(4)]
    digest.update(
        json.dumps({"start": [int(s) for s in start], "shape": list(crop.shape), "ijkToWorld": geometry}).encode()
    )
    digest.update(np.packbits(crop, axis=None).tobytes())
    return digest.hexdigest()


def segmentFingerprint(segment) -> str:
    """:func:`maskFingerprint` of a segment's binary labelmap (reads the whole layer: cost grows with the CT)."""
    labelmap = segment.GetRepresentation(BINARY_LABELMAP)
    if labelmap is None:
        return hashlib.sha256(b"no binary labelmap").hexdigest()
    crop, start = segmentMask(labelmap, segment.GetLabelValue())
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    return maskFingerprint(crop, start, matrix)


class EditTracker:
    """Which segments' voxels are known to have a given fingerprint, without reading voxels.

    VTK stamps every ``Modified()`` with a new value of one global counter, and an image's ``GetMTime()`` covers
    its scalars; a segment's binary labelmap with the same modification time and label value as when its
    fingerprint was taken therefore still has that fingerprint. A Segment Editor stroke modifies the labelmap (the
    shared layer), so it makes the segments of that layer "stale": their fingerprint must be computed again.
    Nothing here is saved: after loading a scene every segment is stale once.
    """

    def __init__(self) -> None:
        self._known: dict[tuple[str, str], tuple[int, int, str]] = {}

    @staticmethod
    def _key(segmentationNode, segmentId: str) -> tuple[str, str]:
        return (segmentationNode.GetID() or str(id(segmentationNode)), segmentId)

    @staticmethod
    def _stamp(segment) -> tuple[int, int] | None:
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        return None if labelmap is None else (int(labelmap.GetMTime()), int(segment.GetLabelValue()))

    def record(self, segmentationNode, segmentId: str, fingerprint: str) -> None:
        """Remember that the segment's voxels, as they are now, have ``fingerprint``."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        stamp = self._stamp(segment) if segment is not None else None
        if stamp is not None:
            self._known[self._key(segmentationNode, segmentId)] = (*stamp, fingerprint)

    def known(self, segmentationNode, segmentId: str) -> str | None:
        """The segment's fingerprint if its labelmap is unchanged since it was recorded, else None (O(1))."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        entry = self._known.get(self._key(segmentationNode, segmentId))
        if segment is None or entry is None:
            return None
        return entry[2] if self._stamp(segment) == entry[:2] else None

    def last(self, segmentationNode, segmentId: str) -> str | None:
        """The fingerprint recorded last for the segment, whether or not its labelmap changed since (O(1))."""
        entry = self._known.get(self._key(segmentationNode, segmentId))
        return None if entry is None else entry[2]

    def forget(self, segmentationNode=None) -> None:
        """Drop what is known (about one segmentation node, or all)."""
        if segmentationNode is None:
            self._known.clear()
            return
        key = self._key(segmentationNode, "")[0]
        for k in [k for k in self._known if k[0] == key]:
            del self._known[k]


# ------------------------------------------------------------------------------- the module's segments in MRML
class SegmentRecords:
    """Provenance, state, review and tracking of the segments this module makes, on ``vtkMRMLSegmentationNode``s
    (no Qt; the Logic inherits it). Needs ``catalog`` (the class catalog); ``editTracker`` remembers fingerprints
    while labelmaps are unmodified, so that states are found without reading voxels where possible.
    """

    def __init__(self, catalog: ClassCatalog) -> None:
        self.catalog = catalog
        #: Fingerprints known to hold while a segment's labelmap is unmodified (edit detection without voxels).
        self.editTracker = EditTracker()

    # -- provenance and edit tracking ------------------------------------------------------------------------
    def moduleSegments(self, segmentationNode) -> dict[int, str]:
        """Catalog index -> ID of the segment this module made for it (first one, in segment order)."""
        segmentation = segmentationNode.GetSegmentation()
        found: dict[int, str] = {}
        for segmentId in segmentIds(segmentation):
            value = getTag(segmentation.GetSegment(segmentId), TAG_CLASS_INDEX)
            if value and value.isdigit():
                found.setdefault(int(value), segmentId)
        return found

    def segmentFingerprint(self, segmentationNode, segmentId: str) -> str:
        """SHA-256 of a segment's mask (:func:`UniversalSegSlicerLib.segments.maskFingerprint`): its voxels
        cropped to the bounding box, their position in the labelmap's grid and the grid's geometry. Reads the
        whole labelmap layer; the result is remembered until the labelmap is modified."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        fingerprint = segmentFingerprint(segment)
        self.editTracker.record(segmentationNode, segmentId, fingerprint)
        return fingerprint

    def segmentChanged(self, segmentationNode, segmentId: str) -> bool:
        """Whether a module segment's voxels may differ from its AI mask, without reading voxels: True unless
        its labelmap is unmodified since its fingerprint was last taken and that fingerprint is the AI mask's."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None or not segment.HasTag(TAG_CLASS_INDEX):
            return False
        known = self.editTracker.known(segmentationNode, segmentId)
        return known is None or known != getTag(segment, TAG_FINGERPRINT)

    def segmentProvenance(self, segmentationNode, segmentId: str) -> dict[str, str]:
        """The provenance tags of a segment (empty for segments this module did not make)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None or not segment.HasTag(TAG_CLASS_INDEX):
            return {}
        return {
            tag.removeprefix(TAG_PREFIX): value
            for tag in PROVENANCE_TAGS
            if (value := getTag(segment, tag)) is not None
        }

    def segmentState(self, segmentationNode, segmentId: str, verify: bool = True) -> str:
        """``"manual"`` (not made by this module), ``"edited"`` (mask changed since it was imported),
        ``"reviewed"`` (unchanged and marked correct, by :meth:`markSegmentReviewed` or the Segment Editor's
        "Completed" status) or ``"ai"`` (unchanged).

        The voxels are compared (a fingerprint) only if the segment's labelmap was modified since its last
        fingerprint; with ``verify=False`` never: the state is then the one found at the last comparison (for a
        segment never compared since loading, the one its tags say; :meth:`segmentChanged` tells which may be
        outdated)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        stored = getTag(segment, TAG_FINGERPRINT)
        if not segment.HasTag(TAG_CLASS_INDEX):
            return STATE_MANUAL
        current = self.editTracker.known(segmentationNode, segmentId)
        if current is None:
            if verify:
                current = self.segmentFingerprint(segmentationNode, segmentId)
            else:
                last = self.editTracker.last(segmentationNode, segmentId)
                current = stored if last is None else last
        if stored != current:
            return STATE_EDITED
        completed = (
            slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment)
            == slicer.vtkSlicerSegmentationsModuleLogic.Completed
        )
        if segment.HasTag(TAG_REVIEWED) or completed:
            return STATE_REVIEWED
        return STATE_AI

    def segmentStates(self, segmentationNode, verify: bool = True) -> dict[str, str]:
        """Segment ID -> state, for every segment (see :meth:`segmentState` for ``verify``)."""
        segmentation = segmentationNode.GetSegmentation()
        return {
            segmentId: self.segmentState(segmentationNode, segmentId, verify) for segmentId in segmentIds(segmentation)
        }

    def markSegmentReviewed(self, segmentationNode, segmentId: str, reviewed: bool = True) -> None:
        """Mark an AI segment as checked and correct (or undo that); also sets Slicer's segment status
        ("Completed"), shown in the Segment Editor. Edited segments count as reviewed already."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        if reviewed:
            segment.SetTag(TAG_REVIEWED, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            seglogic.SetSegmentStatus(segment, seglogic.Completed)
        else:
            segment.RemoveTag(TAG_REVIEWED)
            if seglogic.GetSegmentStatus(segment) == seglogic.Completed:
                segment.RemoveTag(seglogic.GetStatusTagName())

    # -- review and export for training ---------------------------------------------------------------------
    def segmentClass(self, segmentationNode, segmentId: str) -> ClassInfo | None:
        """The catalog class a segment stands for: its class tag (segments this module made or tracks), else its
        name ("Liver", "IVC", ...), else None."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        value = getTag(segment, TAG_CLASS_INDEX)
        if value and value.isdigit() and 1 <= int(value) <= len(self.catalog):
            return self.catalog[int(value)]
        return self.catalog.find(segment.GetName())

    def segmentReview(self, segmentationNode, verify: bool = True) -> list[SegmentReview]:
        """Every segment with its state and whether "Export for training" exports it as an annotated class.

        With ``verify=False`` no voxels are read (the GUI's refresh after each edit): a segment modified since its
        last fingerprint keeps the state found then and is marked ``stale``; :meth:`exportForTraining` verifies.

        Exported (annotated): segments a person edited, AI segments marked reviewed, and the person's own segments
        that are named after a catalog class and marked reviewed. Not exported: AI output nobody reviewed, segments
        flagged in the Segment Editor, own segments with other names, and two confirmed segments of one class
        (the export refuses those until one is deleted or unmarked).
        """
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        segmentation = segmentationNode.GetSegmentation()
        rows = []
        for segmentId in segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            info = self.segmentClass(segmentationNode, segmentId)
            status = seglogic.GetSegmentStatus(segment)
            stale = (
                not verify
                and segment.HasTag(TAG_CLASS_INDEX)
                and self.editTracker.known(segmentationNode, segmentId) is None
            )
            row = SegmentReview(
                segmentId=segmentId,
                name=segment.GetName(),
                classIndex=info.index if info else None,
                className=info.name if info else None,
                state=self.segmentState(segmentationNode, segmentId, verify),
                reviewed=segment.HasTag(TAG_REVIEWED) or status == seglogic.Completed,
                flagged=status == seglogic.Flagged,
                stale=stale,
            )
            if row.flagged:
                row.reason = "flagged in the Segment Editor"
            elif row.state == STATE_EDITED:
                row.annotated, row.confirmation = True, "edited"
            elif row.state == STATE_REVIEWED:
                row.annotated, row.confirmation = True, "reviewed"
            elif row.state == STATE_AI:
                row.reason = "AI output, not reviewed"
            elif info is None:
                row.reason = "its name is not a class of the catalog"
            elif row.reviewed:
                row.annotated, row.confirmation = True, "manual"
            else:
                row.reason = "your own segment: mark it reviewed to export it"
            rows.append(row)
        byClass: dict[int, list[SegmentReview]] = {}
        for row in rows:
            if row.annotated:
                byClass.setdefault(row.classIndex, []).append(row)
        for index, same in byClass.items():
            if len(same) > 1:
                names = ", ".join(f"'{r.name}'" for r in same)
                for row in same:
                    row.annotated, row.confirmation, row.duplicate = False, "", True
                    row.reason = f"{len(same)} confirmed segments are {self.catalog[index].name} ({names})"
        return rows

    def trackSegments(self, segmentationNode, model: str = "", licence: str = "") -> list[str]:
        """Treat segments loaded from a file as AI output of ``model`` from now on, so that edits are detected.

        For segmentations written by the engine's command line (``universalseg segment scans/ -o out/ --format
        seg.nrrd``) and loaded into Slicer: each segment without this module's tags whose name is a catalog class
        (and whose class has no tracked segment yet) gets the class and provenance tags and the fingerprint of its
        current mask. Its state becomes "ai" (or "reviewed" if its status is already "Completed"). Returns the
        segment IDs that are now tracked.
        """
        segmentation = segmentationNode.GetSegmentation()
        tracked = self.moduleSegments(segmentationNode)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        adopted = []
        for segmentId in segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            if segment.HasTag(TAG_CLASS_INDEX):
                continue
            info = self.catalog.find(segment.GetName())
            if info is None or info.index in tracked:
                continue
            segment.SetTag(TAG_CLASS_INDEX, str(info.index))
            segment.SetTag(TAG_CLASS_NAME, info.file_stem)
            segment.SetTag(TAG_MODEL, tagValue(Path(model).name if model else "unknown (loaded from a file)"))
            segment.SetTag(TAG_MODEL_LICENCE, tagValue(licence or "unspecified"))
            segment.SetTag(TAG_ENGINE_VERSION, ENGINE_VERSION)
            segment.SetTag(TAG_CREATED, now)
            segment.SetTag(TAG_SETTINGS, json.dumps({"source": "loaded from a file"}, separators=(",", ":")))
            segment.SetTag(TAG_FINGERPRINT, self.segmentFingerprint(segmentationNode, segmentId))
            tracked[info.index] = segmentId
            adopted.append(segmentId)
        return adopted

    def _exportProvenance(self, segmentationNode, row: SegmentReview) -> dict[str, Any]:
        """What the dataset entry records about one exported segment (JSON values)."""
        tags = self.segmentProvenance(segmentationNode, row.segmentId)
        out: dict[str, Any] = {"segment": row.name, "state": row.state}
        for key, name in (
            ("Model", "model"),
            ("ModelLicence", "model_licence"),
            ("EngineVersion", "engine_version"),
            ("Created", "created"),
            ("Reviewed", "reviewed"),
        ):
            if key in tags:
                out[name] = tags[key]
        if "Settings" in tags:
            try:
                out["settings"] = json.loads(tags["Settings"])
            except ValueError:
                out["settings"] = tags["Settings"]
        return out

    # -- arrays ----------------------------------------------------------------------------------------------
    def segmentArray(self, segmentationNode, segmentId: str, referenceVolume) -> np.ndarray:
        """A segment's mask as a bool ``(K, J, I)`` array on ``referenceVolume``'s grid (a copy)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        dims = referenceVolume.GetImageData().GetDimensions()
        out = np.zeros(dims[::-1], dtype=bool)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        if labelmap is None:
            return out
        volumeMatrix, labelmapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(volumeMatrix)
        labelmap.GetImageToWorldMatrix(labelmapMatrix)
        if not sameMatrix(volumeMatrix, labelmapMatrix):
            raise InputError("the segmentation's voxel grid differs from the volume's; resample it first")
        mask, start = segmentMask(labelmap, segment.GetLabelValue())
        if mask is None:
            return out
        k0, j0, i0 = start[2], start[1], start[0]
        # clip to the volume (a segment may extend beyond it)
        zs = slice(max(k0, 0), min(k0 + mask.shape[0], out.shape[0]))
        ys = slice(max(j0, 0), min(j0 + mask.shape[1], out.shape[1]))
        xs = slice(max(i0, 0), min(i0 + mask.shape[2], out.shape[2]))
        out[zs, ys, xs] = mask[zs.start - k0 : zs.stop - k0, ys.start - j0 : ys.stop - j0, xs.start - i0 : xs.stop - i0]
        return out
