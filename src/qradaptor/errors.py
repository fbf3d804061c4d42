"""Errors a user can cause and fix.

Every `QRAdaptorError` carries the cause and the fix; the CLI prints it as one message without a
traceback and exits with status 2. Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class QRAdaptorError(Exception):
    """A problem with the user's input, with a message that names the cause and the fix."""

    def __init__(self, cause: str, fix: str | None = None):
        self.cause = cause
        self.fix = fix
        super().__init__(cause if fix is None else f"{cause}\n  fix: {fix}")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), to quote a library's error in ours."""
    text = str(e).strip().splitlines()
    line = text[0] if text else type(e).__name__
    return line if len(line) <= 300 else line[:297] + "..."


class ModelLoadError(QRAdaptorError):
    """The model could not be found or is not a model."""


class DataError(QRAdaptorError):
    """The training or evaluation data is missing, malformed or empty."""


class PlanError(QRAdaptorError):
    """A plan is malformed or does not fit the model."""


class BackendError(QRAdaptorError):
    """The quantizer backend cannot do what the plan asks (e.g. a bit-width it lacks)."""


class BudgetError(QRAdaptorError):
    """A memory budget is malformed or cannot be met."""


class ArtifactError(QRAdaptorError):
    """A run directory or exported artifact is missing, unfinished, or does not match the request."""


class LMEvalError(QRAdaptorError):
    """An lm-eval harness task cannot run: lm-eval missing, unknown task, bad include path, or data it cannot reach."""


class DeviceError(QRAdaptorError):
    """The device asked for is unknown or not present (e.g. --device cuda without a usable GPU)."""


class TrainingError(QRAdaptorError):
    """The fine-tune diverged: its loss or its adapter weights stopped being finite numbers."""
