"""Parts of the UniversalSeg Slicer module that need no Qt (the layout follows SlicerMONAIAuto3DSeg's
``MONAIAuto3DSegLib``):

* :mod:`.process`: the engine process runner (start, JSON progress, cancel) and the task that imports its result
  in small GUI-thread steps;
* :mod:`.results`: reading the engine's ``.seg.nrrd`` in a worker thread;
* :mod:`.segments`: segment tags, provenance, fingerprints, cheap edit tracking, mask <-> labelmap conversion;
* :mod:`.parameters`: what to segment and how (the engine's command line options);
* :mod:`.scene`: an MRML scene set up as at Slicer's start-up, for tests and scripts;
* :mod:`.guisync`: widget <-> parameter synchronisation the parameter node wrapper cannot do safely.

Importing this package makes the engine package ``UniversalSegLib`` importable: installed, it lies beside this
package; in a source checkout one folder further up.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_MODULE_DIR = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("UniversalSegLib") is None:
    for _candidate in (_MODULE_DIR, _MODULE_DIR.parent):
        if (_candidate / "UniversalSegLib" / "__init__.py").is_file():
            sys.path.insert(0, str(_candidate))
            break
