"""Offline evaluation: ``judge-eval`` (a judge service's agreement with human preference labels)."""
