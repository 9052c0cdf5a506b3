"""Every error graphadapt raises derives from :class:`GraphAdaptError`.

Each message names what was wrong and how to fix it; none leaks a raw
torch.export traceback (the original exception is kept as ``__cause__``).
"""


class GraphAdaptError(Exception):
    """Base class of all graphadapt errors."""


class SpecError(GraphAdaptError, ValueError):
    """An adapter spec is invalid. ``field`` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CaptureError(GraphAdaptError):
    """torch.export could not capture the model."""


class StructureError(GraphAdaptError):
    """The captured graph does not contain the structure a pass needs."""


class PassError(GraphAdaptError):
    """A graph pass failed; the message names the pass."""


class MergeError(GraphAdaptError):
    """An adapter could not be folded into the base weights."""


class CheckpointError(GraphAdaptError):
    """A checkpoint could not be read, written or mapped."""


class ExportError(GraphAdaptError):
    """ONNX / Triton export failed."""


class VerificationError(ExportError):
    """An exported model disagrees with PyTorch beyond tolerance."""
