"""The request and result models, for code that imports them from here: they live in
`core.models`, below the workflows and activities, and this name stays."""

from core.models import *  # noqa: F403
