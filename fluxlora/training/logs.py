"""Loss bookkeeping and the end-of-run loss plot.

`loss/average` is the mean of the last `window` step losses (one epoch of batches by default) from the first step
on — sd-scripts' recorder appends during the first epoch and replaces slots later, so its window changes meaning
after epoch 1 (spec §12.19). Validation averages are computed per validation run, never across runs.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def tracker_dir(logging_dir: Path, log_prefix: str | None, now: float | None = None) -> Path:
    """`<logging_dir>/<log_prefix><YYYYmmddHHMMSS>`: each run's TensorBoard folder, named as sd-scripts names it
    (the tracker then writes into `<that>/<log_tracker_name>/`)."""
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
    return Path(logging_dir) / f"{log_prefix or ''}{stamp}"


@dataclass
class LossRecorder:
    """Moving average over a fixed window plus the epoch's mean."""

    window: int
    _recent: deque[float] = field(default_factory=deque, init=False)
    _epoch_sum: float = field(default=0.0, init=False)
    _epoch_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._recent = deque(maxlen=max(1, self.window))

    def add(self, loss: float) -> None:
        self._recent.append(loss)
        self._epoch_sum += loss
        self._epoch_count += 1

    @property
    def moving_average(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else float("nan")

    def end_epoch(self) -> float:
        """Return the epoch's mean loss and start a new epoch."""
        mean = self._epoch_sum / self._epoch_count if self._epoch_count else float("nan")
        self._epoch_sum, self._epoch_count = 0.0, 0
        return mean


def plot_losses(
    path: str | Path,
    losses: Sequence[float],
    *,
    validation: Sequence[tuple[int, float]] = (),
    title: str = "training loss",
) -> Path:
    """Write `loss.png`: per-step loss, its moving average, and validation points (step, loss) if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fluxlora.files import atomic_write

    path = Path(path)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss (per step)")
    window = max(1, min(50, len(losses) // 10 or 1))
    if len(losses) >= window > 1:
        avg = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
               for i in range(len(losses))]
        ax.plot(steps, avg, color="#036", linewidth=1.6, label=f"moving average ({window})")
    if validation:
        vs, vl = zip(*validation, strict=True)
        ax.plot(vs, vl, "o-", color="#c40", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(path) as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return path
