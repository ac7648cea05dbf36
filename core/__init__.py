"""The core of the service: request and result models, settings, fly.toml, git, the
deployment store, logging and metrics.

Plain building blocks that the workflows, the activities and the operator tools use; the
core imports none of them, nor the emulator, the worker or the benchmark.
"""
