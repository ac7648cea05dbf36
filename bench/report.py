"""The table of one run: every ratio with its target and whether it was met."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    measure: str
    value: str
    target: str
    met: bool | None  # None: informational, or not measurable in this run
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    # Extra material for BENCHMARKS.md: activity times, requests by route, scaling points.
    steps: dict[str, float] = field(default_factory=dict)
    single_ms: dict[str, float] = field(default_factory=dict)
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    scaling: list[dict[str, Any]] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)

    def info(self, measure: str, value: str, detail: str = "") -> None:
        self.rows.append(Row(measure, value, "", None, detail))

    def ratio(
        self,
        measure: str,
        value: float | None,
        target: str,
        limit: float | None,
        detail: str = "",
        *,
        higher_is_better: bool = False,
        unit: str = "\N{MULTIPLICATION SIGN}",
    ) -> None:
        """A measured number against its target; `value` None means it could not be
        measured (a failed deploy), which counts as not met when there is a target."""
        if value is None:
            met = None if limit is None else False
            self.rows.append(Row(measure, "—", target, met, detail))
            return
        met = None if limit is None else (value >= limit if higher_is_better else value <= limit)
        shown = f"{value:.0f}{unit}" if value >= 100 else f"{value:.2f}{unit}"
        self.rows.append(Row(measure, shown, target, met, detail))

    @property
    def all_met(self) -> bool:
        return all(r.met is not False for r in self.rows)

    def markdown(self) -> str:
        lines = [
            "| measure | value | target | met | detail |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            met = "" if r.met is None else ("yes" if r.met else "NO")
            lines.append(
                f"| {r.measure} | {r.value} | {r.target} | {met} | {r.detail.replace('|', '/')} |"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(
            {
                "rows": [asdict(r) for r in self.rows],
                "steps": self.steps,
                "single_ms": self.single_ms,
                "requests": self.requests,
                "scaling": self.scaling,
                "machine": self.machine,
            },
            indent=2,
        )
