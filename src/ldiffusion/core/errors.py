"""Exception hierarchy: every error a user can cause derives from `LDiffusionError`.

The command line turns an `LDiffusionError` into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LDiffusionError(Exception):
    """Base class for errors caused by bad input (files, configs, arguments)."""


class ConfigError(LDiffusionError):
    """A configuration key or value is invalid."""


class DatasetFormatError(LDiffusionError):
    """A data set on disk does not follow the expected layout."""


class CheckpointError(LDiffusionError):
    """A run folder or checkpoint is missing, incomplete or incompatible."""


class InputError(LDiffusionError):
    """An input file or argument (image, prediction, slide) is invalid."""
