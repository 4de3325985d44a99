"""Typed user-facing errors: the CLI turns each into one line and a non-zero exit."""


class MsnEdgeError(Exception):
    """A user mistake or an environment problem, reported as one clear line."""


class AudioError(MsnEdgeError):
    """Audio that cannot be used: unreadable, wrong rate or channels, empty."""


class DatasetError(MsnEdgeError):
    """A data folder that cannot be read: empty, unparseable names, no classes."""


class BundleError(MsnEdgeError):
    """A bundle that cannot be trusted: wrong version, tampered, truncated, unsafe."""


class DeviceError(MsnEdgeError):
    """An audio device that is missing, busy or cannot give the format we need."""


class BackendError(MsnEdgeError):
    """An inference backend that is not installed or cannot run this model."""
