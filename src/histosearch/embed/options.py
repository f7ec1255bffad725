"""How one embedding run reads and batches (no torch: settings are built before the model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EmbedOptions:
    """How one run reads and batches: the resolution given for files that record none, the
    batch size and the reader processes."""

    mpp: float | None = None
    objective_power: float | None = None
    batch_size: int = 32
    num_workers: int = 1

    def __post_init__(self) -> None:
        for name, value in (("mpp", self.mpp), ("objective_power", self.objective_power)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, not {value}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be 0 or more, not {self.num_workers}")


# The options of a run that gives none (frozen, so one object serves every default).
DEFAULT_OPTIONS = EmbedOptions()
