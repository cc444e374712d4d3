"""Hand-made synchronisation of widgets that ``slicer.parameterNodeWrapper`` cannot bind safely.

The wrapper's ``QTextEditPlainTextToStrConnector.write`` calls ``setPlainText`` on every parameter-node change,
also on the change the widget itself caused; ``setPlainText`` moves the cursor to the start, so every key typed
into a bound ``QTextEdit`` lands at position 0 and the text comes out reversed (Slicer v5.10.0 to v5.12.3,
``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``). Its QLineEdit connector writes only when the text
differs (Slicer commit 5e290f9562, issue #8620, in v5.10.0 and later), so QLineEdits stay bound.
"""

from __future__ import annotations


def textToWrite(widgetText: str, parameterText: str) -> str | None:
    """The text to put into a text widget after the parameter changed, or None to leave the widget (and its
    cursor) alone because it already shows that text (the change came from typing in it)."""
    return None if widgetText == parameterText else parameterText


def parameterToWrite(widgetText: str, parameterText: str) -> str | None:
    """The value to store in the parameter after the widget's text changed, or None when it is already stored
    (no parameter-node Modified event, so no round trip back to the widget)."""
    return None if widgetText == parameterText else widgetText
