"""``rlhf-feedback bench``: reproducible performance measurements (reward service, judge, backends)."""
