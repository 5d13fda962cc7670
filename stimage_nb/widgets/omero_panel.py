"""OMERO panel: log in, browse projects / datasets / images with thumbnails, pull an image (and its
ROIs and annotations as a training Section) into a local OME-Zarr.

The password is typed into a password field (never echoed), wrapped at once in
:class:`~stimage_nb.omero.connection.Secret`, and the field is cleared before the login even starts,
so it is neither kept in the widget's state (nor saved with the notebook) nor shown in any message.
Everything the panel does is reported through traits: ``connected``, ``status``, ``projects``,
``datasets``, ``images``, ``image_id``, ``thumbnail``, ``pull_state``, ``pulled_path``.

Pulling runs in a background thread (``pull(block=True)`` waits for it); the progress bar moves
through the phases of a pull (image info, pixels, ROIs and annotations).
"""

from __future__ import annotations

import html
import io
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

import ipywidgets as widgets  # noqa: E402
import traitlets as t  # noqa: E402

THUMB_PX = 192


def _default_connect(host: str, port: int | None, user: str, password):
    from ..omero import connect

    return connect(host, port, user, password=password, prompt=False)


def _redact(text: str, *secrets: str) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def thumbnail(conn, image_id: int, max_px: int = THUMB_PX) -> bytes:
    """PNG/JPEG bytes of a small rendering of an OMERO image.

    Asks the server's thumbnail service first; where it is unavailable, reads the smallest
    resolution level of the pixels through the ``RawPixelsStore`` (what a pull reads) and scales it.
    """
    from PIL import Image

    from ..omero import pull as P

    sess = P.as_session(conn)
    if hasattr(sess.gateway, "createThumbnailStore"):  # a real server renders thumbnails itself
        try:
            data = P.get_image(sess, image_id).getThumbnail(size=(max_px,))
            if data:
                return bytes(data)
        except Exception as e:  # noqa: BLE001 - no thumbnail service: render from the pixels
            log.debug("thumbnail service failed for image %s (%s); reading pixels", image_id, type(e).__name__)
    info = P.image_info(sess, image_id)
    # smallest level still at least max_px on its long side (levels[0] = full resolution)
    order = sorted(range(len(info.levels)), key=lambda i: max(info.levels[i]))
    lvl = next((i for i in order if max(info.levels[i]) >= max_px), order[-1])
    if max(info.levels[lvl]) > P.MAX_REQUEST_PX:
        lvl = order[0]
    w, h = info.levels[lvl]
    w, h = min(w, P.MAX_REQUEST_PX), min(h, P.MAX_REQUEST_PX)
    store = P._open_store(sess, info, server_level=lvl)
    try:
        block = P.read_block(store, P._channels(info), 0, 0, w, h, info.pixels_type)
    finally:
        P._close(store)
    rgb = P._to_uint8(block)
    if rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
    im = Image.fromarray(np.ascontiguousarray(rgb[..., :3]))
    im.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


class OmeroPanel(widgets.VBox):
    """Log in to OMERO, browse, and pull images as OME-Zarr (see module docstring).

    Parameters
    ----------
    conn
        An existing connection (``stimage_nb.omero.connect(...)`` session or a BlitzGateway); the
        login row is then skipped.
    host, port, user
        Pre-filled login fields (default: ``OMERO_HOST``, ``OMERO_PORT``, ``OMERO_USER``).
    connect
        ``connect(host, port, user, password: Secret) -> session`` (default:
        :func:`stimage_nb.omero.connect`); tests pass one that returns a test double.
    dest
        Folder for pulled stores (default: the cache, ``$STIMAGE_NB_CACHE/omero/<host>/``).
    """

    connected = t.Bool(False)
    status = t.Unicode("")
    projects = t.List()
    datasets = t.List()
    images = t.List()
    image_id = t.Int(-1)
    thumbnail = t.Bytes(b"")
    pull_state = t.Unicode("idle")
    pulled_path = t.Unicode("")
    error = t.Unicode("")

    def __init__(self, conn=None, *, host: str | None = None, port: int | None = None, user: str | None = None,
                 connect: Callable | None = None, dest=None, as_section: bool = True):
        self.conn = None
        self.slide = None
        self.section = None
        self._connect = connect or _default_connect
        self._dest = Path(dest) if dest is not None else None
        self._thread: threading.Thread | None = None

        lay = widgets.Layout(width="260px")
        self.host = widgets.Text(value=host or os.environ.get("OMERO_HOST", ""), description="host",
                                 placeholder="omero.example.org", layout=lay)
        self.port = widgets.IntText(value=int(port or os.environ.get("OMERO_PORT") or 4064), description="port",
                                    layout=widgets.Layout(width="160px"))
        self.user = widgets.Text(value=user or os.environ.get("OMERO_USER", ""), description="user", layout=lay)
        self.password = widgets.Password(description="password", placeholder="never stored", layout=lay)
        self.login_button = widgets.Button(description="Log in", icon="sign-in", button_style="primary")
        self.logout_button = widgets.Button(description="Log out", icon="sign-out", disabled=True)
        self.project_select = widgets.Select(options=[], description="project", rows=6, layout=lay)
        self.dataset_select = widgets.Select(options=[], description="dataset", rows=6, layout=lay)
        self.image_select = widgets.Select(options=[], description="image", rows=6, layout=lay)
        self.thumb = widgets.Image(format="png", layout=widgets.Layout(max_width=f"{THUMB_PX}px",
                                                                       max_height=f"{THUMB_PX}px", display="none"))
        self.image_info = widgets.HTML()
        self.target_um = widgets.BoundedFloatText(value=0.0, min=0.0, max=50.0, step=0.25,
                                                  description="µm/px", tooltip="0: full resolution",
                                                  layout=widgets.Layout(width="160px"))
        self.as_section = widgets.Checkbox(value=as_section, description="with ROIs + annotations (Section)",
                                           indent=False)
        self.pull_button = widgets.Button(description="Pull", icon="download", disabled=True)
        self.progress = widgets.IntProgress(value=0, min=0, max=4, description="pull",
                                            layout=widgets.Layout(width="360px"))
        self.status_label = widgets.HTML()
        for w, cls in ((self.password, "stimage-omero-password"), (self.login_button, "stimage-omero-login"),
                       (self.pull_button, "stimage-omero-pull"), (self.status_label, "stimage-status")):
            w.add_class(cls)

        self.login_box = widgets.HBox([widgets.VBox([self.host, self.port]), widgets.VBox([self.user, self.password]),
                                       widgets.VBox([self.login_button, self.logout_button])])
        browser = widgets.HBox([self.project_select, self.dataset_select, self.image_select,
                                widgets.VBox([self.thumb, self.image_info])])
        pull_row = widgets.HBox([self.target_um, self.as_section, self.pull_button, self.progress])
        super().__init__([self.login_box, browser, pull_row, self.status_label])
        self.add_class("stimage-omero-panel")

        self.login_button.on_click(lambda _b: self.login())
        self.logout_button.on_click(lambda _b: self.logout())
        self.project_select.observe(self._on_project, "value")
        self.dataset_select.observe(self._on_dataset, "value")
        self.image_select.observe(self._on_image, "value")
        self.pull_button.on_click(lambda _b: self.pull())

        if conn is not None:
            self._connected(conn)
        else:
            self.status = ("no OMERO server configured: enter host, user and password, then Log in"
                           if not self.host.value else f"log in to {self.host.value}")

    # ---------------------------------------------------------------------------------- traits
    @t.observe("status")
    def _on_status(self, change) -> None:
        self.status_label.value = f"<span>{html.escape(change['new'])}</span>"

    @t.observe("thumbnail")
    def _on_thumb(self, change) -> None:
        data = change["new"]
        self.thumb.format = "jpeg" if data[:2] == b"\xff\xd8" else "png"
        self.thumb.value = data
        self.thumb.layout.display = "block" if data else "none"

    # ---------------------------------------------------------------------------------- login
    def login(self) -> bool:
        """Log in with the fields' values; the password field is cleared first, whatever happens."""
        from ..omero.connection import OmeroError, Secret

        typed = self.password.value
        self.password.value = ""
        secret = Secret(typed) if typed else None
        del typed
        host, user = self.host.value.strip(), self.user.value.strip()
        if not host or not user:
            self.status = "enter the OMERO host and user name"
            return False
        if secret is None:
            self.status = "enter the password (it is never stored)"
            return False
        self.status = f"logging in to {host} as {user} …"
        try:
            conn = self._connect(host, int(self.port.value), user, secret)
        except (OmeroError, ValueError, OSError, ImportError) as e:
            self.error = _redact(str(e), secret.reveal())
            self.status = f"login failed: {self.error}"
            self.connected = False
            return False
        finally:
            del secret
        self._connected(conn)
        return True

    def _connected(self, conn) -> None:
        from ..omero.connection import OmeroError, as_session

        self.conn = as_session(conn)
        self.connected = True
        self.error = ""
        self.login_button.disabled = True
        self.logout_button.disabled = False
        for w in (self.host, self.port, self.user, self.password):
            w.disabled = True
        self.status = f"connected to {self.conn.target}"
        try:
            self.refresh()
        except OmeroError as e:
            self.status = f"connected, but listing projects failed: {e}"

    def logout(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            finally:
                self.conn = None
        self.connected = False
        self.login_button.disabled = False
        self.logout_button.disabled = True
        self.pull_button.disabled = True
        for w in (self.host, self.port, self.user, self.password):
            w.disabled = False
        self.projects, self.datasets, self.images = [], [], []
        self.project_select.options = self.dataset_select.options = self.image_select.options = []
        self.image_id = -1
        self.status = "logged out"

    # ---------------------------------------------------------------------------------- browsing
    def refresh(self) -> None:
        """Reload the project list."""
        from ..omero import list_projects

        df = list_projects(self.conn)
        self.projects = df.to_dict("records")
        self.project_select.options = [(f"{r['name']} ({r['datasets']} datasets)", int(r["id"])) for r in self.projects]
        self.status = f"connected to {self.conn.target}: {len(self.projects)} projects"

    def _on_project(self, change) -> None:
        from ..omero import list_datasets

        if change["new"] is None:
            return
        df = list_datasets(self.conn, project=int(change["new"]))
        self.datasets = df.to_dict("records")
        self.images = []
        self.image_select.options = []
        self.dataset_select.options = [(f"{r['name']} ({r['images']} images)", int(r["id"])) for r in self.datasets]

    def _on_dataset(self, change) -> None:
        from ..omero import list_images

        if change["new"] is None:
            return
        df = list_images(self.conn, dataset=int(change["new"]))
        self.images = df.to_dict("records")
        self.image_select.options = [(f"{r['name']} [{r['id']}]", int(r["id"])) for r in self.images]
        self.status = f"dataset {change['new']}: {len(self.images)} images"

    def _on_image(self, change) -> None:
        if change["new"] is None:
            self.image_id = -1
            self.pull_button.disabled = True
            return
        self.select_image(int(change["new"]))

    def select_image(self, image_id: int) -> None:
        """Show an image's thumbnail and details and enable Pull."""
        from ..omero.connection import OmeroError

        self.image_id = int(image_id)
        row = next((r for r in self.images if int(r["id"]) == self.image_id), None)
        if row is not None:
            um = row.get("um_per_px")
            self.image_info.value = (f"<b>{html.escape(str(row['name']))}</b><br>{row['size_x']}×{row['size_y']} px, "
                                     f"{row['size_c']} channels, {row['pixels_type']}<br>"
                                     + (f"{um:.3g} µm/px" if um else "<i>no pixel size recorded</i>"))
        try:
            self.thumbnail = thumbnail(self.conn, self.image_id)
        except (OmeroError, ValueError) as e:
            self.status = f"no thumbnail for image {image_id}: {e}"
        self.pull_button.disabled = False

    # ---------------------------------------------------------------------------------- pull
    def pull(self, *, block: bool = False) -> None:
        """Pull the selected image (and, with ``as_section``, its ROIs and annotations)."""
        if self.image_id < 0 or self.pull_state == "pulling":
            return
        self.pull_state = "pulling"
        self.pull_button.disabled = True
        self.progress.value = 0
        self.progress.bar_style = "info"
        self._thread = threading.Thread(target=self._pull, args=(self.image_id, self.as_section.value,
                                                                  float(self.target_um.value) or None),
                                        daemon=True, name="stimage-omero-pull")
        self._thread.start()
        if block:
            self.join()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _pull(self, image_id: int, as_section: bool, target_um: float | None) -> None:
        from ..omero import image_info, pull_image, pull_section

        try:
            self.status = f"image {image_id}: reading its description …"
            info = image_info(self.conn, image_id)
            self.progress.value = 1
            dest = None
            if self._dest is not None:
                dest = self._dest / f"image-{image_id}-{target_um or 'full'}.ome.zarr"
            self.status = f"image {image_id}: pulling {info.size_x}×{info.size_y} px …"
            self.slide = pull_image(self.conn, image_id, dest=dest, target_um_per_px=target_um, progress=False,
                                    info=info)
            self.progress.value = 2
            self.section = None
            if as_section:
                self.status = f"image {image_id}: reading ROIs and annotations …"
                self.section = pull_section(self.conn, image_id, dest=dest, target_um_per_px=target_um, progress=False)
                self.progress.value = 3
            self.progress.value = 4
            self.progress.bar_style = "success"
            self.pulled_path = str(self.slide.path)
            self.pull_state = "done"
            what = (f"Section {self.section.name!r} with {self.section.adata.n_obs} observations"
                    f"{' and counts' if self.section.has_counts else ''}" if self.section is not None else "image")
            self.status = f"pulled image {image_id} → {self.slide.path} ({what})"
        except Exception as e:  # noqa: BLE001 - shown in the panel
            log.exception("pull failed")
            self.progress.bar_style = "danger"
            self.error = f"{type(e).__name__}: {e}"
            self.pull_state = "failed"
            self.status = f"pull of image {image_id} failed: {self.error}"
        finally:
            self.pull_button.disabled = self.image_id < 0
