"""What every runtime entry's choice of one model has: its manifest entry, a session for it, why it was chosen, the
provider, and the latency it was picked by. ``klas_runtime.classify.Choice`` (images) and
``klas_runtime.generate.DecoderChoice`` (decoders) add what their kind of model does with it."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelChoice:
    """A picked model: ``entry`` (its manifest entry), ``session`` (None when picked without one), ``reason``,
    ``provider``, and the latency record it was picked by (``latency_ms``, ``latency_record``)."""

    entry: dict
    session: object
    reason: str
    provider: str
    latency_ms: float | None = None
    latency_record: dict | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.entry["name"]

    @property
    def kind(self) -> str:
        return "model"

    @property
    def input(self) -> dict:
        """The input spec of the manifest entry."""
        return self.entry["input"]

    @property
    def files(self) -> list[str]:
        return [self.entry["file"]]

    @property
    def members(self) -> list[str]:
        """The models that may answer: this one."""
        return [self.name]
