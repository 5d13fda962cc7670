"""Callbacks of a training run (Lightning-style empty hooks): progress bars, loss history, cancellation.

:func:`stimage_nb.train.train` calls each hook with the :class:`TrainState`; a callback may set
``state.should_stop`` to cancel after the current batch (the last finished epoch is checkpointed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class TrainState:
    """What callbacks see (and may change: set ``should_stop`` to cancel)."""

    run_dir: Path
    n_members: int
    epochs: int
    member: int = 0
    epoch: int = -1
    batch: int = 0
    n_batches: int = 0
    batch_loss: float = float("nan")
    train_loss: float = float("nan")
    val_loss: float = float("nan")
    val_pearson: float = float("nan")
    best_val: float = float("inf")
    best_epoch: int = -1
    history: list = field(default_factory=list)
    should_stop: bool = False
    resumed_from: int | None = None


class Callback:
    """Base class with empty hooks, called by :func:`train` (cf. Lightning)."""

    def on_train_start(self, state: TrainState) -> None: ...
    def on_member_start(self, state: TrainState) -> None: ...
    def on_batch_end(self, state: TrainState) -> None: ...
    def on_epoch_end(self, state: TrainState) -> None: ...
    def on_member_end(self, state: TrainState) -> None: ...
    def on_train_end(self, state: TrainState) -> None: ...


class TrainingCancelled(RuntimeError):
    """A callback asked training to stop; the last finished epoch is checkpointed."""


class ProgressCallback(Callback):
    """``tqdm.auto`` bars: one per member over epochs, with the current losses."""

    def __init__(self):
        self.bar = None

    def on_member_start(self, state):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.epochs, initial=max(state.epoch + 1, 0),
                        desc=f"member {state.member + 1}/{state.n_members}", unit="epoch", leave=True)

    def on_epoch_end(self, state):
        if self.bar is not None:
            self.bar.update(1)
            post = {"train": f"{state.train_loss:.4f}"}
            if state.val_loss == state.val_loss:  # no validation sections: nan, not shown
                post["val"] = f"{state.val_loss:.4f}"
            self.bar.set_postfix(**post)

    def on_member_end(self, state):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    on_train_end = on_member_end


class LossHistory(Callback):
    """Collects one row per epoch (member, epoch, train_loss, val_loss); ``on_update(rows)`` is called
    after each epoch (e.g. to redraw a live plot in Jupyter)."""

    def __init__(self, on_update=None):
        self.rows: list[dict] = []
        self.on_update = on_update

    def on_epoch_end(self, state):
        self.rows.append({"member": state.member, "epoch": state.epoch, "train_loss": state.train_loss,
                          "val_loss": state.val_loss})
        if self.on_update is not None:
            self.on_update(self.rows)


class StopOnEvent(Callback):
    """Cancel training (after the current batch) when ``event`` (a ``threading.Event``) is set."""

    def __init__(self, event):
        self.event = event

    def on_batch_end(self, state):
        if self.event.is_set():
            state.should_stop = True

    on_epoch_end = on_batch_end
