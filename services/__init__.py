"""rlhf-feedback services: the reward service (and the shared pieces under ``common``)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-feedback")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
