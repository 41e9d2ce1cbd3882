"""Versioned judge prompt templates: one folder per template set (``default``); see ``engine/prompts.py``."""
