"""``rlhf-feedback train ppo``."""
