"""``rlhf-feedback train rm``."""
