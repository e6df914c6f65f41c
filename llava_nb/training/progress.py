"""Training progress: one display in the cell, updated in place, with a live loss curve.

In a notebook kernel the callback shows a line of numbers (step, epoch, loss, learning rate,
speed, time left) and a matplotlib loss curve (eval loss too) in ONE display, redrawn at most
every `interval` seconds. Elsewhere (a script, `accelerate launch`) it prints a short line at
most every `print_interval` seconds. No other log output.
"""

from __future__ import annotations

import base64
import html
import io
import sys
import time
from typing import Any

from transformers import TrainerCallback


def in_kernel() -> bool:
    """True inside a Jupyter kernel (where rich displays render), False in a plain script."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and hasattr(shell, "kernel")


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Recorder(TrainerCallback):
    """Keeps the run's history: one entry per logged step (loss, lr, eval_loss, epoch)."""

    def __init__(self, history: list[dict[str, Any]] | None = None) -> None:
        self.history: list[dict[str, Any]] = list(history or [])

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        entry: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0, 4)}
        for key in ("loss", "learning_rate", "eval_loss", "grad_norm"):
            if key in logs:
                entry[key] = float(logs[key])
        if len(entry) > 2:
            self.history.append(entry)


class Progress(TrainerCallback):
    """Shows the recorder's numbers while training runs (main process only)."""

    def __init__(
        self, recorder: Recorder, interval: float = 1.0, print_interval: float = 10.0
    ) -> None:
        self.recorder = recorder
        self.rich = in_kernel()
        self.interval = interval if self.rich else print_interval
        self.handle = None
        self.start = self.shown = 0.0
        self.first_step = 0
        self.samples_per_step = 1
        self._plot_at = 0.0
        self._plot = ""
        self._printed: tuple[int, int] | None = None  # (step, history length) last printed

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.monotonic()
        self.first_step = state.global_step
        self.samples_per_step = (
            args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        )
        if state.is_world_process_zero and self.rich:
            from IPython.display import HTML, display

            self.handle = display(HTML(self._html(state, "starting…")), display_id=True)

    def on_step_end(self, args, state, control, **kwargs):
        # Trainer logs a step after its on_step_end: a step that logs is shown by on_log, with
        # its own loss (shown here, it had the loss of the log before)
        if not control.should_log:
            self._show(state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:  # a step's log (evaluation is shown by on_evaluate)
            self._show(state)

    def on_evaluate(self, args, state, control, **kwargs):
        self._show(state, force=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._show(state, force=True, final=True)

    # ---------------------------------------------------------------- rendering

    def status(self, state) -> str:
        """The line of numbers: step, epoch, loss, learning rate, speed, time left."""
        history = self.recorder.history
        loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
        lr = next((h["learning_rate"] for h in reversed(history) if "learning_rate" in h), None)
        evals = [h["eval_loss"] for h in history if "eval_loss" in h]
        elapsed = time.monotonic() - self.start
        done = state.global_step - self.first_step
        rate = done / elapsed if elapsed > 0 and done else 0.0
        left = (state.max_steps - state.global_step) / rate if rate else None
        parts = [
            f"step {state.global_step}/{state.max_steps}",
            f"epoch {state.epoch or 0:.2f}",
            f"loss {loss:.4f}" if loss is not None else "loss –",
        ]
        if evals:
            parts.append(f"eval loss {evals[-1]:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        parts.append(f"{rate * self.samples_per_step:.1f} samples/s")
        parts.append(f"{_duration(elapsed)} elapsed")
        if left is not None:
            parts.append(f"{_duration(left)} left")
        return " · ".join(parts)

    def _show(self, state, force: bool = False, final: bool = False) -> None:
        if not state.is_world_process_zero or not self.start:  # the eval before training
            return
        now = time.monotonic()
        if not force and now - self.shown < self.interval:
            return
        self.shown = now
        line = self.status(state)
        if not self.rich:
            printed = (state.global_step, len(self.recorder.history))
            if printed != self._printed:  # the end of a run just shown: not a second line
                self._printed = printed
                print(f"llava_nb: {line}", flush=True)
            return
        from IPython.display import HTML

        if final or now - self._plot_at > max(2.0, 2 * self.interval):
            self._plot, self._plot_at = self._curve(), now
        if self.handle is not None:
            self.handle.update(HTML(self._html(state, line)))

    def _html(self, state, line: str) -> str:
        image = f'<br><img src="data:image/png;base64,{self._plot}">' if self._plot else ""
        return f"<div><code>{html.escape(line)}</code>{image}</div>"

    def _curve(self) -> str:
        """The loss curve (and eval loss) as a base64 PNG; '' until there are two points."""
        history = self.recorder.history
        train = [(h["step"], h["loss"]) for h in history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
        if len(train) + len(evals) < 2:
            return ""
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5.5, 2.6), dpi=90)
        axes = figure.add_subplot()
        if train:
            axes.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
        if evals:
            axes.plot(*zip(*evals, strict=True), "o-", label="eval loss", lw=1.2, ms=3)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return base64.b64encode(buffer.getvalue()).decode()
