"""What a run leaves behind: metrics records (out_dir/log.jsonl, TensorBoard when installed) and
a loss plot (out_dir/loss.png)."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Metrics records to out_dir/log.jsonl, TensorBoard (if installed) and memory."""

    def __init__(self, out_dir: Path | None, keep_until: int | None):
        self.records: list[dict] = []
        self.path = out_dir / "log.jsonl" if out_dir else None
        self.tb = None
        if self.path is None:
            return
        if keep_until is not None and self.path.is_file():  # resuming: drop what came after the checkpoint
            old = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            self.records = [r for r in old if r.get("step", 0) <= keep_until]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional
            pass

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def plot_losses(records: list[dict], path: Path) -> Path:
    """Train (and validation) loss against step, as a PNG (matplotlib's Agg canvas, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    train_pts = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid_pts = [(r["step"], r["valid_loss"]) for r in records if "valid_loss" in r]
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss", lw=1)
    if valid_pts:
        ax.plot(*zip(*valid_pts), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
