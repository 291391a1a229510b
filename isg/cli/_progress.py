"""Live progress for the CLI's long steps (tqdm bars on stderr, silent with ``--quiet``)."""

from __future__ import annotations

import dataclasses
import sys
import time


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class TrainProgress:
    """Callback for :func:`isg.train.expression.cross_validate`: one bar per fold over its epochs.

    Called with a :class:`isg.train.expression.TrainProgress` (or a dict of its fields: ``fold``,
    ``n_folds``, ``epoch``, ``epochs``, losses, ``seconds_left``) after every epoch; shows fold,
    epoch, losses and ``run_left``, the time left for the whole run (an upper bound: folds stop early).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None
        self.fold = None
        self.start = time.perf_counter()
        self.epochs_done = 0

    def __call__(self, event: dict | None = None, **kwargs) -> None:
        if not self.enabled:
            return
        if dataclasses.is_dataclass(event):
            event = dataclasses.asdict(event)
        event = {**(event or {}), **kwargs}
        from tqdm.auto import tqdm

        fold, n_folds = event.get("fold"), event.get("n_folds") or event.get("folds")
        epochs = event.get("epochs") or event.get("n_epochs")
        if fold != self.fold:
            self.close()
            self.fold = fold
            label = f"fold {fold + 1}/{n_folds}" if fold is not None and n_folds else f"fold {fold}"
            self.bar = tqdm(total=epochs, desc=label, unit="epoch", file=sys.stderr, leave=True, dynamic_ncols=True)
        if "epoch" not in event or self.bar is None:
            return
        self.epochs_done += 1
        done = event["epoch"] + 1 - self.bar.n
        shown = {}
        for key in ("train_loss", "val_loss", "best_val_loss"):
            if event.get(key) is not None:
                shown[key.replace("_loss", "")] = f"{event[key]:.3f}"
        if event.get("seconds_left") is not None:
            shown["run_left"] = _fmt_seconds(event["seconds_left"])
        elif n_folds and epochs and fold is not None:
            per_epoch = (time.perf_counter() - self.start) / self.epochs_done
            left = (n_folds - fold - 1) * epochs + (epochs - event["epoch"] - 1)
            shown["run_left"] = _fmt_seconds(per_epoch * left)
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(done)  # one redraw per epoch

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
