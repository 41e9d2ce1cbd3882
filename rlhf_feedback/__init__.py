"""rlhf-feedback: the ``rlhf-feedback`` command line, wiring the services, jobs, training and benchmarks."""

from services import __version__

__all__ = ["__version__"]
