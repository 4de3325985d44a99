"""Torch-free edge runtime: front-end, bundle format, engines, scorer, sources, monitor."""
