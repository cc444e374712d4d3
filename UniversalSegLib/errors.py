"""Errors the engine raises for bad input: one clear line each, saying what is wrong and what to do; and
:func:`printable`, which makes user-typed text safe to echo."""


class UniversalSegError(Exception):
    """Base class for errors meant for the user (the CLI prints them as one line, exit code 2)."""


class InputError(UniversalSegError):
    """The input image or a user-given option is unusable."""


class CheckpointError(UniversalSegError):
    """A checkpoint file is missing, malformed, untrusted or does not match the architecture."""


class DownloadError(UniversalSegError):
    """A download failed, was interrupted, or did not verify."""


class ClassNameError(UniversalSegError):
    """A class name or prompt item does not name a catalog class."""


class OutputError(InputError):
    """An output would overwrite an input or another output, or could not be written completely (the previous file,
    if any, is kept)."""


def printable(text: object) -> str:
    """``text`` safe to echo on a terminal or in a log: control characters (escape sequences that clear the screen or
    set the window title, newlines that would fake extra lines) are shown as Python escapes (``\\x1b``)."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
