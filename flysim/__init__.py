"""flysim: a local emulator of the Fly Machines REST API, its app proxy and its faults.

    sim = FlySim(SimConfig(tokens={token: "personal"}))
    with sim.serve_in_thread():
        ...  # sim.base_url, sim.app_url_template

`flysim.spec.validate_exchange` checks a request/response pair against the official
OpenAPI document (it needs the `openapi-core` dev dependency, imported on first use).
"""

from flysim.cli import main
from flysim.config import Faults, SimConfig, SimTiming
from flysim.server import ConnectionDropped, FlySim
from flysim.stats import SimStats

__all__ = ["ConnectionDropped", "Faults", "FlySim", "SimConfig", "SimStats", "SimTiming", "main"]
