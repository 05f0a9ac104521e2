"""Population monitoring: per site and UTC day, how many studies were refused or flagged as
outside the model's intended population or its training distribution, and how many the AI
called positive. Torch-free.

A site whose share jumps is sending patients the model was not made for; `serve.yaml`'s
`monitor.alert_share` sets the level at which that is raised on /metrics, on the agreement
page and in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from diagnostics.serve.config import MonitorSection
from diagnostics.serve.qc import OOD, OUTSIDE_POPULATION
from diagnostics.serve.store import Store

log = logging.getLogger(__name__)


def daily(store: Store, clinics: list[str] | None, cfg: MonitorSection) -> list[dict[str, Any]]:
    """Rows per (clinic, day), newest day first: counts, shares and the alert."""
    since = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(
        days=cfg.days - 1
    )
    rows = []
    for d in store.daily_outcomes(clinics, since):
        refused_pop = d["refused"].get(OUTSIDE_POPULATION, 0)
        flagged_pop = d["flagged"].get(OUTSIDE_POPULATION, 0)
        refused_ood = d["refused"].get(OOD, 0)
        outside = refused_pop + flagged_pop + refused_ood
        share = outside / d["studies"] if d["studies"] else 0.0
        called = d["scored"] - sum(d["flagged"].values())  # scored with a call
        rows.append(
            {
                "clinic": d["clinic"],
                "day": d["day"],
                "studies": d["studies"],
                "refused_population": refused_pop,
                "flagged_population": flagged_pop,
                "refused_ood": refused_ood,
                "outside_share": share,
                "positive": d["positive"],
                "positive_share": d["positive"] / called if called else None,
                "alert": d["studies"] >= cfg.min_studies and share >= cfg.alert_share,
            }
        )
    rows.sort(key=lambda r: (r["day"], r["clinic"]), reverse=True)
    return rows


class AlertLog:
    """Logs each (site, day) alert once. The worker calls `check` after each batch (at most
    every `every_s` seconds) and, forced, whenever its queue empties."""

    def __init__(self, store: Store, cfg: MonitorSection, every_s: float = 10.0) -> None:
        self.store, self.cfg, self.every_s = store, cfg, every_s
        self.seen: set[tuple[str, str]] = set()
        self.last = -float("inf")
        self.lock = threading.Lock()

    def check(self, force: bool = False) -> None:
        with self.lock:
            if not force and time.monotonic() - self.last < self.every_s:
                return
            self.last = time.monotonic()
        today = datetime.now(UTC).date().isoformat()
        for r in daily(self.store, None, self.cfg.model_copy(update={"days": 1})):
            key = (r["clinic"], r["day"])
            if r["day"] == today and r["alert"] and key not in self.seen:
                self.seen.add(key)
                log.warning(
                    "site %s: %.0f%% of today's %d studies are outside the model's population "
                    "or training distribution (alert level %.0f%%)",
                    r["clinic"],
                    100 * r["outside_share"],
                    r["studies"],
                    100 * self.cfg.alert_share,
                )
