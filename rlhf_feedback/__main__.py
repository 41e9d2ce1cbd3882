"""``python -m rlhf_feedback ...`` is ``rlhf-feedback ...``."""

import sys

from rlhf_feedback.cli import main

sys.exit(main())
