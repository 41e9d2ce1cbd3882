"""rlhf-feedback services: the reward service, the judge service, the model runtime under both and the
shared pieces under ``common``. Only what a running service imports lives here."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rlhf-feedback")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"
