"""Temporal activities: every side effect of a deploy, one module per kind."""
