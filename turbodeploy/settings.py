"""The worker's and the CLI's settings, for code that imports them from here: they live in
`core.settings`, below the workflows and activities, and this name stays."""

from core.settings import *  # noqa: F403
