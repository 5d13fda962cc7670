"""Training panel: pick sections, genes, backbone, members and epochs; watch the loss curves live;
cancel without losing the last checkpoint.

The panel drives :func:`stimage_nb.train.train` in a background thread (the notebook stays
responsive) with three callbacks: :class:`~stimage_nb.train.LossHistory` (live curves),
:class:`~stimage_nb.train.StopOnEvent` (the Cancel button) and a progress callback. Training writes a
checkpoint after every epoch, so a cancelled run keeps its last finished epoch and "Start" with the
same settings resumes from it.

Everything the panel shows is also a trait (``state``, ``status``, ``history``, ``epochs_done``,
``last_checkpoint``, ``run_dir``), so tests and notebooks can follow it without reading text.
"""

from __future__ import annotations

import html
import io
import json
import logging
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import StimageInputError

log = logging.getLogger(__name__)

import ipywidgets as widgets  # noqa: E402
import traitlets as t  # noqa: E402

#: backbones offered in the list (any timm name can be typed in)
BACKBONES = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny", "vit_small_patch16_224",
             "test_resnet", "test_efficientnet", "test_vit")
STATES = ("idle", "running", "cancelling", "cancelled", "finished", "failed")


def _loss_png(rows: list[dict], width: float = 5.0, height: float = 2.8) -> bytes:
    """PNG of the loss curves (one colour per member; solid = train, dashed = validation)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=80)
    ax = fig.add_subplot(111)
    members = sorted({r["member"] for r in rows})
    for m in members:
        rr = [r for r in rows if r["member"] == m]
        ep = [r["epoch"] + 1 for r in rr]
        line, = ax.plot(ep, [r["train_loss"] for r in rr], "-o", ms=3, label=f"m{m + 1} train")
        va = [r["val_loss"] for r in rr]
        if np.isfinite(va).any():
            ax.plot(ep, va, "--", color=line.get_color(), label=f"m{m + 1} val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if rows:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "loss curves appear here", ha="center", va="center", transform=ax.transAxes, color="0.5")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class TrainingPanel(widgets.VBox):
    """Train a deep ensemble from JupyterLab (see module docstring).

    Parameters
    ----------
    manifest
        The manifest CSV (default: the bundled her2st manifest).
    out
        Run directory (``RUN_DIR``; resumes a run found there).
    genes
        Genes offered and pre-selected (default: the manifest's ``genes_stimage_her2st.txt`` when
        present, else the genes of the first section).
    train, validate, default_genes, backbone, members, epochs, out_px, tile_um, device
        Initial values of the controls.
    config
        Extra :class:`~stimage_nb.train.TrainConfig` settings (e.g. ``batch_size``, ``seed``).
    """

    state = t.Unicode("idle")
    status = t.Unicode("")
    history = t.List()
    epochs_done = t.Int(0)
    epochs_total = t.Int(0)
    last_checkpoint = t.Unicode("")
    run_dir = t.Unicode("")
    error = t.Unicode("")

    def __init__(self, manifest=None, *, out="runs/panel", genes: Sequence[str] | None = None,
                 train: Sequence[str] | None = None, validate: Sequence[str] | None = None,
                 default_genes: int = 50, backbone: str = "resnet18", members: int = 3, epochs: int = 10,
                 out_px: int = 64, tile_um: float = 150.0, device: str = "auto", config: dict | None = None):
        import pandas as pd

        from .._settings import her2st_manifest
        from ..io.readers import read_gene_list

        self.manifest = Path(manifest) if manifest is not None else her2st_manifest()
        if not self.manifest.is_file():
            raise StimageInputError(f"{self.manifest}: manifest not found.")
        m = pd.read_csv(self.manifest, dtype=str)
        names = [s for s, c in zip(m["section"], m.get("counts", pd.Series([None] * len(m))))
                 if isinstance(c, str) and c.strip()]
        if not names:
            raise StimageInputError(f"{self.manifest}: no section has counts; nothing to train on.")
        if genes is None:
            gl = self.manifest.parent / "genes_stimage_her2st.txt"
            genes = read_gene_list(gl) if gl.is_file() else None
        if genes is None:
            from ..io.readers import read_manifest

            genes = read_manifest(self.manifest, names[:1])[0].genes
        self.all_genes = [str(g) for g in genes]
        self.extra_config = dict(config or {})
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self.ensemble = None

        lay = widgets.Layout(width="300px")
        self.sections = widgets.SelectMultiple(options=names, value=tuple(train or names[:-1] or names),
                                               description="train", rows=min(6, len(names)), layout=lay)
        self.validate = widgets.SelectMultiple(options=names, value=tuple(validate or ()), description="validate",
                                               rows=min(6, len(names)), layout=lay)
        self.genes = widgets.TagsInput(value=list(self.all_genes[:default_genes]), allowed_tags=list(self.all_genes),
                                       allow_duplicates=False)
        self.backbone = widgets.Combobox(value=backbone, options=BACKBONES, description="backbone",
                                         ensure_option=False, layout=lay)
        self.members = widgets.BoundedIntText(value=members, min=1, max=20, description="members", layout=lay)
        self.epochs = widgets.BoundedIntText(value=epochs, min=1, max=500, description="epochs", layout=lay)
        self.out_px = widgets.Dropdown(options=[32, 64, 112, 224], value=out_px, description="tile px", layout=lay)
        self.tile_um = widgets.BoundedFloatText(value=tile_um, min=10, max=2000, description="tile µm", layout=lay)
        self.device = widgets.Dropdown(options=["auto", "cpu", "cuda"], value=device, description="device", layout=lay)
        self.out = widgets.Text(value=str(out), description="run dir", layout=lay)
        self.start_button = widgets.Button(description="Start", icon="play", button_style="primary")
        self.cancel_button = widgets.Button(description="Cancel", icon="stop", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="epochs",
                                            layout=widgets.Layout(width="400px"))
        self.plot = widgets.Image(value=_loss_png([]), format="png", layout=widgets.Layout(width="420px"))
        self.status_label = widgets.HTML()
        for w, cls in ((self.start_button, "stimage-train-start"), (self.cancel_button, "stimage-train-cancel"),
                       (self.status_label, "stimage-status"), (self.genes, "stimage-train-genes")):
            w.add_class(cls)

        left = widgets.VBox([self.sections, self.validate, self.backbone, self.members, self.epochs, self.out_px,
                             self.tile_um, self.device, self.out],
                            layout=widgets.Layout(flex="0 0 320px", width="320px"))
        genes_box = widgets.Box([self.genes], layout=widgets.Layout(max_height="150px", overflow="auto",
                                                                    border="1px solid #ddd"))
        right = widgets.VBox([widgets.HTML("<b>genes</b> (type to add; × to remove)"), genes_box,
                              widgets.HBox([self.start_button, self.cancel_button]), self.progress, self.plot],
                             layout=widgets.Layout(flex="1 1 auto", min_width="420px", margin="0 0 0 12px"))
        super().__init__([widgets.HBox([left, right]), self.status_label])
        self.add_class("stimage-training-panel")
        self.start_button.on_click(lambda _b: self.start())
        self.cancel_button.on_click(lambda _b: self.cancel())
        self.status = "ready: choose sections, genes and settings, then Start"

    # ---------------------------------------------------------------------------------- traits
    @t.observe("status")
    def _on_status(self, change) -> None:
        self.status_label.value = f"<span>{html.escape(change['new'])}</span>"

    @t.observe("state")
    def _on_state(self, change) -> None:
        running = change["new"] in ("running", "cancelling")
        self.start_button.disabled = running
        self.cancel_button.disabled = change["new"] != "running"
        for w in (self.sections, self.validate, self.genes, self.backbone, self.members, self.epochs, self.out_px,
                  self.tile_um, self.device, self.out):
            w.disabled = running

    @t.observe("history")
    def _on_history(self, change) -> None:
        self.plot.value = _loss_png(change["new"])

    # ---------------------------------------------------------------------------------- API
    def config(self):
        """The :class:`~stimage_nb.train.TrainConfig` the controls describe."""
        from ..train import TrainConfig

        d = dict(backbone=self.backbone.value.strip(), members=int(self.members.value), epochs=int(self.epochs.value),
                 out_px=int(self.out_px.value), tile_um=float(self.tile_um.value), device=self.device.value)
        d.update(self.extra_config)
        return TrainConfig(**d)

    def _check(self) -> tuple[list[str], list[str], list[str]]:
        train = [s for s in self.sections.value if s not in self.validate.value]
        val = list(self.validate.value)
        genes = list(self.genes.value)
        if not train:
            raise StimageInputError("choose at least one training section that is not also a validation section.")
        if not genes:
            raise StimageInputError("choose at least one gene to predict.")
        if not self.backbone.value.strip():
            raise StimageInputError("choose a backbone (a timm model name, e.g. resnet18).")
        return train, val, genes

    def start(self, *, block: bool = False) -> None:
        """Start (or resume) training with the current settings; ``block`` waits for the end."""
        if self.state in ("running", "cancelling"):
            return
        try:
            train, val, genes = self._check()
            cfg = self.config()
        except (StimageInputError, ValueError, TypeError) as e:
            self.state, self.error = "failed", str(e)
            self.status = f"cannot start: {e}"
            return
        self._cancel.clear()
        self.error = ""
        self.run_dir = str(Path(self.out.value).expanduser())
        self.epochs_total = cfg.members * cfg.epochs
        self.progress.max = max(1, self.epochs_total)
        self.history = []
        self.epochs_done = 0
        self.progress.value = 0
        self.state = "running"
        self.status = (f"training {cfg.members} × {cfg.backbone} on {train} (validation {val or 'none'}), "
                       f"{len(genes)} genes, {cfg.epochs} epochs → {self.run_dir}")
        self._thread = threading.Thread(target=self._run, args=(train, val, genes, cfg), daemon=True,
                                        name="stimage-training-panel")
        self._thread.start()
        if block:
            self.join()

    def cancel(self) -> None:
        """Stop after the current batch; the last finished epoch stays checkpointed."""
        if self.state == "running":
            self._cancel.set()
            self.state = "cancelling"
            self.status = "cancelling after the current batch …"

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the training thread; True when it has finished."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # ---------------------------------------------------------------------------------- worker
    def _run(self, train_s, val_s, genes, cfg) -> None:
        from ..train import Callback, LossHistory, StopOnEvent, TrainingCancelled, train

        panel = self

        class _Progress(Callback):
            def on_train_start(self, state):
                panel.status = f"reading tiles and fitting stain normalisation for {train_s} …"

            def on_member_start(self, state):
                done = state.member * cfg.epochs + max(state.epoch + 1, 0)
                panel.epochs_done = done
                panel.progress.value = done
                resumed = f" (resumed after epoch {state.epoch + 1})" if state.epoch >= 0 else ""
                panel.status = f"member {state.member + 1}/{state.n_members}{resumed}"

            def on_epoch_end(self, state):
                done = state.member * cfg.epochs + state.epoch + 1
                panel.epochs_done = done
                panel.progress.value = min(done, panel.progress.max)
                panel.last_checkpoint = str(Path(state.run_dir) / "members" / f"m{state.member}" / "state.json")
                panel.status = (f"member {state.member + 1}/{state.n_members}, epoch {state.epoch + 1}/{state.epochs}: "
                                f"train {state.train_loss:.4f}, validation {state.val_loss:.4f}")

        def on_update(rows):
            panel.history = [dict(r) for r in rows]

        try:
            ens = train(self.manifest, genes=genes, out=self.run_dir, sections=train_s, val_sections=val_s or None,
                        config=cfg, drop_missing_genes=True, progress=False,
                        callbacks=[_Progress(), LossHistory(on_update=on_update), StopOnEvent(self._cancel)])
        except TrainingCancelled:
            self.state = "cancelled"
            self.status = (f"cancelled; the last finished epoch is checkpointed in {self.last_checkpoint or self.run_dir}. "
                           "Start again with the same settings to resume.")
            return
        except Exception as e:  # noqa: BLE001 - shown in the panel; the notebook keeps running
            log.exception("training failed")
            self.error = f"{type(e).__name__}: {e}"
            self.state = "failed"
            self.status = f"training failed: {self.error}"
            return
        self.ensemble = ens
        # members may stop early: count the epochs their checkpoints record
        self.epochs_done = sum(int(s.get("epoch", -1)) + 1 for s in self.checkpoints().values())
        self.progress.value = self.progress.max
        self.state = "finished"
        self.status = f"finished: {ens!r} saved in {self.run_dir}"

    def checkpoints(self) -> dict[int, dict]:
        """The per-member checkpoint states found in the run directory."""
        out = {}
        for sp in sorted(Path(self.run_dir or self.out.value).glob("members/m*/state.json")):
            try:
                out[int(sp.parent.name[1:])] = json.loads(sp.read_text())
            except (ValueError, OSError):
                continue
        return out
