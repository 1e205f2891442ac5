"""Progress for people: a live tqdm bar on a terminal; elsewhere (stderr sent to a file, CI) a few
plain lines instead of one line with hundreds of carriage-return updates.

    bar = Progress(total=1000, desc="training", unit="step", every=50)
    bar.update(1, loss="3.21")   # a terminal redraws the bar; a file gets a line every 50 steps
    bar.close()                  # the last state, once
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def is_terminal(stream=None) -> bool:
    """Whether `stream` (default stderr) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def say(message: str) -> None:
    """One line for the user on stderr, without breaking a live progress bar."""
    tqdm.write(message, file=sys.stderr)


class Progress:
    """tqdm on a terminal; off a terminal a plain line each time the count crosses a multiple of
    `every` (never, when `every` is None) and one final line at `close`."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: int | None = None, initial: int = 0,
                 disable: bool = False):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.n, self.printed, self.postfix, self.disable = initial, initial, {}, disable
        self.tty = is_terminal()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B",
                        dynamic_ncols=True, disable=disable or not self.tty, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        before, self.n = self.n, self.n + n
        if postfix:
            self.set_postfix(**postfix)
        self.bar.update(n)
        if not self.tty and not self.disable and self.every and self.n // self.every > before // self.every:
            self._line()

    def set_postfix(self, **postfix) -> None:
        self.postfix = {k: str(v) for k, v in postfix.items()}
        self.bar.set_postfix(self.postfix)

    def finish(self) -> None:
        """Mark the work as complete (100%), whatever the count said (e.g. bytes of text vs. file)."""
        if self.n < self.total:
            self.bar.update(self.total - self.n)
            self.n = self.total

    def _amount(self, n: int) -> str:
        if self.unit == "B":
            return tqdm.format_sizeof(n, "B", 1024)
        return f"{n}"

    def _line(self) -> None:
        self.printed = self.n
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        say(f"{self.desc} {self._amount(self.n)}/{self._amount(self.total)}{pct}{extra}")

    def close(self) -> None:
        if not self.tty and not self.disable and self.printed != self.n:
            self._line()
        self.bar.close()
