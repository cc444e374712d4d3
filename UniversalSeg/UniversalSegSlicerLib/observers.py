"""Following a segmentation node's edits cheaply, and only while the module is shown."""

from __future__ import annotations

from typing import Callable

import slicer


def segmentationEvents() -> list[int]:
    """Events of a segmentation node after which segment states may have changed."""
    cls = slicer.vtkSegmentation
    source = getattr(cls, "SourceRepresentationModified", None) or getattr(cls, "MasterRepresentationModified")
    return [cls.SegmentAdded, cls.SegmentRemoved, cls.SegmentModified, source]


class SegmentationObserver:
    """Calls ``callback()`` after segments of one segmentation node were added, removed or modified.

    The handler does nothing else (a Segment Editor stroke fires several events); the callback is expected to be
    cheap too (the Widget restarts a timer whose review refresh reads no voxels). :meth:`observe(None)` or
    :meth:`stop` removes every observer: the Widget does so in ``exit()``, so nothing runs while the user works in
    another module.
    """

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._node = None
        self._tags: list[int] = []

    @property
    def node(self):
        """The observed segmentation node, or None."""
        return self._node

    def observe(self, segmentationNode) -> bool:
        """Follow ``segmentationNode`` (None: nothing) instead of the current one; True if that changed."""
        if segmentationNode is self._node:
            return False
        self.stop()
        self._node = segmentationNode
        if segmentationNode is not None:
            self._tags = [segmentationNode.AddObserver(event, self._onEvent) for event in segmentationEvents()]
        return True

    def stop(self) -> None:
        """Remove the observers."""
        if self._node is not None:
            for tag in self._tags:
                self._node.RemoveObserver(tag)
        self._node, self._tags = None, []

    def _onEvent(self, caller=None, event=None) -> None:
        self._callback()
