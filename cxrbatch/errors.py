"""The exceptions the library raises; their messages tell the operator what to do."""


class CxrBatchError(Exception):
    """Base class for every error cxrbatch reports to the operator."""


class ModelError(CxrBatchError):
    """A model file is missing, unreadable or carries incomplete metadata."""


class ImageError(CxrBatchError):
    """One input file cannot be read as an image; the run goes on without it."""


class UsageError(CxrBatchError):
    """The command was given inputs or options that cannot work."""


class DeviceError(CxrBatchError):
    """The requested execution device is not available."""
