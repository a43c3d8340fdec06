"""The errors a user sees: each message is one line that names the problem and the fix.

The CLI prints ``error: <message>`` without a trace and exits 2 for :class:`ConfigError` and
:class:`CheckpointError` (and its :class:`WriteError`: the user can fix the input or the disk), 1 for
:class:`TrainingError` (the run itself failed).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A user's configuration mistake; its message is one line that names the key and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or no usable one was found; the message names the fix."""


class WriteError(CheckpointError):
    """A run's file could not be written (full disk, read-only folder); the message says what is intact."""


class TrainingError(RuntimeError):
    """A run that had to stop (divergence, too many bad samples); the message names the step and the fix."""
