"""Temporal workflows: deterministic orchestration only."""

from workflows.deploy_project import DeployProjectWorkflow

__all__ = ["DeployProjectWorkflow"]
