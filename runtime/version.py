"""Versions that travel with artefacts; bump BUNDLE_FORMAT when the bundle layout changes."""

__version__ = "0.1.0"
BUNDLE_FORMAT = 1
