"""Errors the engine raises for bad input: one clear line each, saying what is wrong and what to do."""


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
