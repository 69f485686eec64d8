"""A randomised campaign of injected failures, scored against the ground truth."""

from __future__ import annotations

import dataclasses
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from otel_subflow import names
from otel_subflow.lab.harness import Injection, Lab
from otel_subflow.lab.scenarios import SCENARIOS


@dataclasses.dataclass
class CampaignReport:
    """Injections, their confusion matrix, and accuracy where we claimed certainty."""

    injections: list[Injection]

    @property
    def matrix(self) -> dict[str, Counter[str]]:
        out: dict[str, Counter[str]] = {}
        for inj in self.injections:
            out.setdefault(inj.truth, Counter())[inj.final_cause] += 1
        return out

    @property
    def definitive(self) -> list[Injection]:
        return [i for i in self.injections if i.final_confidence == names.CONFIDENCE_DEFINITIVE]

    @property
    def wrong_definitive(self) -> list[Injection]:
        return [i for i in self.definitive if not i.correct]

    @property
    def definitive_accuracy(self) -> float:
        total = len(self.definitive)
        return 1.0 if total == 0 else (total - len(self.wrong_definitive)) / total

    @property
    def accuracy(self) -> float:
        total = len(self.injections)
        return 1.0 if total == 0 else sum(i.correct for i in self.injections) / total

    def verdict_latency_ms(self) -> dict[str, float]:
        values = sorted(i.result.verdict_latency_ms for i in self.injections
                        if i.result.verdict_latency_ms is not None)
        if not values:
            return {}
        return {
            "p50": round(statistics.median(values), 3),
            "p99": round(values[min(len(values) - 1, int(len(values) * 0.99))], 3),
            "max": round(values[-1], 3),
        }

    def render_matrix(self) -> str:
        """The confusion matrix as text: rows are the truth, columns the final verdict."""
        matrix = self.matrix
        columns = sorted({c for row in matrix.values() for c in row})
        width = max([len("truth \\ verdict"), *(len(t) for t in matrix)]) + 2
        cell = max([6, *(len(c) for c in columns)]) + 2
        lines = ["truth \\ verdict".ljust(width) + "".join(c.rjust(cell) for c in columns)]
        for truth in sorted(matrix):
            row = matrix[truth]
            lines.append(truth.ljust(width) + "".join(str(row.get(c, 0) or ".").rjust(cell) for c in columns))
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "injections": len(self.injections),
            "accuracy": round(self.accuracy, 4),
            "definitive": len(self.definitive),
            "definitive_accuracy": round(self.definitive_accuracy, 4),
            "wrong_definitive": [i.as_dict() for i in self.wrong_definitive],
            "confusion_matrix": {t: dict(row) for t, row in self.matrix.items()},
            "verdict_latency_ms": self.verdict_latency_ms(),
        }


def run_campaign(
    lab: Lab,
    count: int,
    scenarios: Sequence[str] | None = None,
    progress: Callable[[Injection], None] | None = None,
) -> CampaignReport:
    """Inject ``count`` failures drawn at random (with ``lab.rng``) from ``scenarios``."""
    chosen = list(scenarios or SCENARIOS)
    unknown = [name for name in chosen if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    injections: list[Injection] = []
    # Every scenario at least once, then random draws.
    order = chosen[:count] + [lab.rng.choice(chosen) for _ in range(max(0, count - len(chosen)))]
    lab.rng.shuffle(order)
    for name in order:
        injection = SCENARIOS[name](lab)
        injections.append(injection)
        if progress is not None:
            progress(injection)
    return CampaignReport(injections)
