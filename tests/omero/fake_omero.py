"""A test double of the OMERO surface stimage_nb uses: real Ice services on a loopback port.

No OMERO server can run on the CI machines, so this module stands in for one, as faithfully as the
code under test can tell:

- ``FakeOmeroServer`` runs **real Ice servants** for ``omero.api.IUpdate``, ``IQuery``, ``IRoi``,
  ``RawPixelsStore``, ``RawFileStore``, ``omero.grid.SharedResources`` and ``omero.grid.Table`` on an Ice
  object adapter bound to 127.0.0.1. Every object the code sends (ROIs, shapes, colours, map and file
  annotations, links, table columns) crosses a real TCP connection and is marshalled and unmarshalled
  by Ice with omero-py's object factories, exactly as it would be on its way to an OMERO server; a
  wrong type (a numpy scalar where Ice wants an ``int``) fails here as it would there.
- ``FakeBlitzGateway`` is the BlitzGateway surface: ``getUpdateService()``, ``getQueryService()``,
  ``getRoiService()``, ``createRawPixelsStore()``, ``createRawFileStore()``, ``c.sf.sharedResources()``
  return real Ice proxies to those servants; ``getObject``/``getObjects`` return omero-py's real
  wrapper classes (``ImageWrapper``...) around server objects; ``createFileAnnfromLocalFile`` *is*
  omero-py's own method (borrowed from ``BlitzGateway``), so uploads run omero-py's code. Deletes
  (``c.sf.submit(Delete2)`` + ``c.waitOnCmd``) are done in Python and are strict: deleting an id that
  does not exist fails, as a careless second delete might on a server.
- Queries: the IQuery servant answers exactly the HQL strings stimage_nb defines (``Q_*`` constants in
  ``stimage_nb.omero.pull``/``push``) and fails loudly on any other, so a new query cannot slip past
  the double unnoticed (the live suite checks the HQL against a real server).
- Semantics that matter: ``saveAndReturnIds`` returns ids in shuffled order; a ROI or link may only
  be written in the group of its image (the call context's ``omero.group``), as OMERO refuses
  cross-group links; updates must carry the current version (optimistic locking);
  ``setResolutionLevel`` counts from the smallest level while ``getResolutionDescriptions`` lists
  full resolution first; ``getTile`` returns big-endian bytes and refuses requests larger than
  3192 px per side; OMERO.tables refuse more than 1,000 columns.
- Faults: ``server.fail(method, after=n, commit=True|False)`` drops the connection on the (n+1)-th
  call of ``method`` - after committing the work (the client never hears back) or before - by
  closing the TCP connection from the server side and killing the session, so the gateway is dead
  and the client must reconnect (``server.gateway()`` opens a new session).
- ``server.calls`` records every call: ``(service, method, detail)``.
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from dataclasses import dataclass, field

import Ice
import numpy as np
import omero
import omero.api
import omero.clients  # noqa: F401  (registers factories, loads all of omero.model)
import omero.cmd
import omero.grid
import omero.model
import omero.ObjectFactoryRegistrar as _ofr
from omero.gateway import (
    BlitzGateway,
    DatasetWrapper,
    ImageWrapper,
    MapAnnotationWrapper,
    ProjectWrapper,
    ServiceOptsDict,
)
from omero.model.enums import UnitsLength
from omero.rtypes import rint, rlong, rstring, unwrap

from stimage_nb.omero import pull as P
from stimage_nb.omero import push as U

MAX_PLANE = 3192
MAX_TABLE_COLUMNS = 1000
KNOWN_QUERIES = {P.Q_IMAGE_ANN_LINKS: "image_ann_links", P.Q_ROI_ANN_LINKS: "roi_ann_links",
                 U.Q_RUN_ROIS: "run_rois", U.Q_RUN_ANNS: "run_anns", U.Q_RUN_FILES: "run_files",
                 U.Q_RUN_TABLE_FILES: "run_table_files"}


def _communicator(client: bool):
    init = Ice.InitializationData()
    init.properties = Ice.createProperties()
    init.properties.setProperty("Ice.ImplicitContext", "Shared")
    init.properties.setProperty("Ice.MessageSizeMax", "65536")      # OMERO's client default (KB)
    init.properties.setProperty("Ice.Default.CollocationOptimized", "0")
    if client:
        init.properties.setProperty("Ice.RetryIntervals", "-1")     # a dropped call is reported, not retried
        init.properties.setProperty("Ice.Override.Timeout", "60000")  # a servant that never answers fails the test
    else:
        init.properties.setProperty("Ice.ThreadPool.Server.Size", "2")
        init.properties.setProperty("Ice.Warn.Dispatch", "0")          # injected drops are not news
    ic = Ice.initialize(init)
    _ofr.registerObjectFactory(ic, None)
    for of in omero.rtypes.ObjectFactories.values():
        of.register(ic)
    return ic


def _like(pattern: str) -> re.Pattern:
    out = ""
    for ch in pattern:
        out += ".*" if ch == "%" else "." if ch == "_" else re.escape(ch)
    return re.compile("^" + out + "$", re.S)


class _Dropped(Exception):
    """Raised inside a servant to drop the client's connection instead of answering."""


@dataclass
class FakeImage:
    image_id: int
    pixels_id: int
    name: str
    levels: list                      # arrays (H, W, C), level 0 = full resolution
    um_per_px: float | None
    group_id: int
    tile: tuple[int, int] = (256, 256)
    pixels_type: str = "uint8"
    dataset_id: int | None = None


@dataclass
class _TableData:
    file_id: int
    headers: list = field(default_factory=list)     # [(name, type name, description, size)]
    values: dict = field(default_factory=dict)      # name -> list
    n_rows: int = 0


class FakeOmeroServer:
    """In-process stand-in for an OMERO server (see the module docstring)."""

    def __init__(self, *, user: str = "analyst", user_id: int = 2, groups: dict | None = None,
                 default_group: int = 3, seed: int = 0):
        self.user, self.user_id = user, user_id
        self.groups = dict(groups or {3: "lab", 5: "shared"})
        self.default_group = default_group
        self.lock = threading.RLock()
        self.rng = random.Random(seed)
        self._next = 100
        self.images: dict[int, FakeImage] = {}
        self.rois: dict[int, omero.model.RoiI] = {}
        self.roi_group: dict[int, int] = {}
        self.annotations: dict[int, omero.model.Annotation] = {}
        self.ann_group: dict[int, int] = {}
        self.image_links: dict[int, tuple[int, int]] = {}     # link id -> (image id, annotation id)
        self.roi_links: dict[int, tuple[int, int]] = {}       # link id -> (roi id, annotation id)
        self.files: dict[int, omero.model.OriginalFileI] = {}
        self.file_data: dict[int, bytearray] = {}
        self.tables: dict[int, _TableData] = {}
        self.projects: dict[int, tuple[str, list]] = {}
        self.datasets: dict[int, tuple[str, list]] = {}
        self.calls: list[tuple[str, str, object]] = []
        self.faults: list[dict] = []
        self.counts: dict[str, int] = {}
        self.dead_sessions: set[str] = set()
        self.sessions: set[str] = set()
        self.tile_bytes = 0
        self.ic = _communicator(client=False)
        self.adapter = self.ic.createObjectAdapterWithEndpoints("FakeOmero", "tcp -h 127.0.0.1")
        self.adapter.activate()
        self._servants = {"update": _Update(self), "query": _Query(self), "roi": _Roi(self),
                          "resources": _Resources(self)}
        self._identities: dict[str, list] = {}   # session id -> identities registered for it
        self._clients: list = []

    # ------------------------------------------------------------------ sessions
    # Each session gets its own Ice identities (category = session id), the way each Glacier2 session
    # has its own service proxies: when a session dies its identities are removed, and any call on an
    # old proxy fails with Ice's own ObjectNotExistException.
    def open_session(self) -> tuple[str, dict[str, str]]:
        sid = str(uuid.uuid4())
        with self.lock:
            self.sessions.add(sid)
            self._identities[sid] = []
            prx = {name: self.ic.proxyToString(self.add_servant(servant, sid, name))
                   for name, servant in self._servants.items()}
        return sid, prx

    def add_servant(self, servant, sid: str, name: str | None = None):
        ident = Ice.Identity(name or str(uuid.uuid4()), sid)
        with self.lock:
            if sid in self.dead_sessions:
                raise Ice.ObjectNotExistException()
            self._identities[sid].append(ident)
        return self.adapter.add(servant, ident)

    def kill_session(self, sid: str) -> None:
        with self.lock:
            self.dead_sessions.add(sid)
            for ident in self._identities.pop(sid, []):
                try:
                    self.adapter.remove(ident)
                except Ice.NotRegisteredException:
                    pass

    # ------------------------------------------------------------------ set-up helpers
    def new_id(self) -> int:
        with self.lock:
            self._next += 1
            return self._next

    def add_image(self, rgb: np.ndarray, *, name: str = "slide.svs", um_per_px: float | None = 0.5,
                  group_id: int | None = None, n_levels: int = 3, tile=(256, 256), dataset_id: int | None = None,
                  levels: list | None = None) -> int:
        """An image whose pixels are ``rgb`` (H, W, C), with a factor-2 server pyramid of ``n_levels``."""
        from stimage_nb.io.ngff import downsample2

        if levels is None:
            levels = [np.asarray(rgb)]
            for _ in range(n_levels - 1):
                levels.append(downsample2(levels[-1]))
        iid, pid = self.new_id(), self.new_id()
        self.images[iid] = FakeImage(iid, pid, name, levels, um_per_px, group_id or self.default_group, tuple(tile),
                                     str(np.asarray(levels[0][:1, :1]).dtype), dataset_id)
        if dataset_id is not None:
            self.datasets[dataset_id][1].append(iid)
        return iid

    def add_project(self, name: str) -> int:
        pid = self.new_id()
        self.projects[pid] = (name, [])
        return pid

    def add_dataset(self, name: str, project_id: int | None = None) -> int:
        did = self.new_id()
        self.datasets[did] = (name, [])
        if project_id is not None:
            self.projects[project_id][1].append(did)
        return did

    def fail(self, method: str, *, after: int = 0, commit: bool = True) -> None:
        """Drop the connection on the (after+1)-th call of ``method`` from now on (once)."""
        self.faults.append({"method": method, "at": self.counts.get(method, 0) + after + 1, "commit": commit})

    def gateway(self) -> "FakeBlitzGateway":
        """A new connection (session) to this server."""
        gw = FakeBlitzGateway(self)
        self._clients.append(gw)
        return gw

    def close(self) -> None:
        for gw in self._clients:
            gw._destroy()
        self.ic.destroy()

    # ------------------------------------------------------------------ call bookkeeping
    def enter(self, service: str, method: str, current, detail=None, *, commit_fn=None):
        """Record a call, check the session, inject faults. Returns True when the call must drop."""
        sid = current.id.category if current is not None else None
        with self.lock:
            self.calls.append((service, method, detail))
            if sid in self.dead_sessions:
                raise Ice.ObjectNotExistException()
            self.counts[method] = self.counts.get(method, 0) + 1
            for f in self.faults:
                if f["method"] == method and f["at"] == self.counts[method]:
                    self.faults.remove(f)
                    f["fired"] = True
                    self.kill_session(sid)
                    return f
        return None

    def drop(self, current, cb=None) -> None:
        """Close the client's TCP connection from the server side (the pending call sees it drop).

        An AMD dispatch is still completed (with an exception nobody receives), or the server could
        never shut down: Ice waits for every outstanding dispatch.
        """
        current.con.close(True)
        if cb is not None:
            cb.ice_exception(Ice.ConnectionLostException())

    def group_of(self, current) -> int:
        g = current.ctx.get("omero.group")
        if g in (None, ""):
            return self.default_group
        g = int(g)
        if g == -1:
            raise omero.SecurityViolation(message="cannot write with omero.group=-1 (all groups)")
        if g not in self.groups:
            raise omero.SecurityViolation(message=f"user {self.user} is not a member of group {g}")
        return g

    # ------------------------------------------------------------------ model objects
    def image_obj(self, iid: int) -> omero.model.ImageI:
        im = self.images[iid]
        img = omero.model.ImageI(iid, True)
        img.setName(rstring(im.name))
        px = omero.model.PixelsI(im.pixels_id, True)
        H, W = im.levels[0].shape[:2]
        C = im.levels[0].shape[2] if im.levels[0].ndim == 3 else 1
        px.setSizeX(rint(W))
        px.setSizeY(rint(H))
        px.setSizeC(rint(C))
        px.setSizeZ(rint(1))
        px.setSizeT(rint(1))
        pt = omero.model.PixelsTypeI()
        pt.setValue(rstring(im.pixels_type))
        px.setPixelsType(pt)
        if im.um_per_px is not None:
            px.setPhysicalSizeX(omero.model.LengthI(im.um_per_px, UnitsLength.MICROMETER))
            px.setPhysicalSizeY(omero.model.LengthI(im.um_per_px, UnitsLength.MICROMETER))
        img.addPixels(px)
        self._details(img, im.group_id)
        return img

    def _details(self, obj, gid: int) -> None:
        owner = omero.model.ExperimenterI(self.user_id, True)
        owner.setOmeName(rstring(self.user))
        obj.getDetails().setOwner(owner)
        obj.getDetails().setGroup(omero.model.ExperimenterGroupI(gid, False))

    def readable(self, gid: int) -> bool:
        return gid in self.groups

    def roi_shapes_count(self) -> int:
        return sum(len(r.copyShapes()) for r in self.rois.values())


# ====================================================================== servants
def _strict(cls):
    """Make every AMD operation the servant does not implement fail loudly instead of never answering."""
    for base in cls.__mro__[1:]:
        for name in list(vars(base)):
            if name.endswith("_async") and name not in vars(cls):
                op = name[:-len("_async")]

                def missing(self, cb, *args, _op=op, **kw):
                    cb.ice_exception(omero.ApiUsageException(
                        message=f"the fake OMERO server does not implement {cls.__name__}.{_op}"))
                setattr(cls, name, missing)
    return cls


@_strict
class _Update(omero.api.IUpdate):
    def __init__(self, server: FakeOmeroServer):
        self.s = server

    def _store(self, obj, gid: int):
        """Assign ids to a new graph and store it (ROIs, annotations, links, original files)."""
        s = self.s
        if isinstance(obj, omero.model.RoiI):
            if obj.getId() is not None:
                raise omero.ApiUsageException(message="saveAndReturnIds: ROI already has an id")
            iid = unwrap(obj.getImage().getId()) if obj.getImage() is not None else None
            if iid not in s.images:
                raise omero.ValidationException(message=f"ROI on unknown image {iid}")
            if s.images[iid].group_id != gid:
                raise omero.SecurityViolation(
                    message=f"cannot link a ROI in group {gid} to image {iid} of group {s.images[iid].group_id}")
            rid = s.new_id()
            obj.setId(rlong(rid))
            obj.setVersion(rint(0))
            obj.setImage(omero.model.ImageI(iid, False))
            for sh in obj.copyShapes():
                sh.setId(rlong(s.new_id()))
                sh.setRoi(omero.model.RoiI(rid, False))
            s.rois[rid] = obj
            s.roi_group[rid] = gid
            return obj
        if isinstance(obj, omero.model.ImageAnnotationLinkI) or isinstance(obj, omero.model.RoiAnnotationLinkI):
            pid = unwrap(obj.getParent().getId())
            is_img = isinstance(obj, omero.model.ImageAnnotationLinkI)
            pgid = s.images[pid].group_id if is_img and pid in s.images else s.roi_group.get(pid)
            if pgid is None:
                raise omero.ValidationException(message=f"link parent {pid} does not exist")
            if pgid != gid:
                raise omero.SecurityViolation(message=f"cross-group link: parent in group {pgid}, context {gid}")
            child = obj.getChild()
            if child.getId() is None:
                child = self._store(child, gid)
            else:
                aid = unwrap(child.getId())
                if aid not in s.annotations:
                    raise omero.ValidationException(message=f"link child annotation {aid} does not exist")
                child = s.annotations[aid]
            lid = s.new_id()
            (s.image_links if is_img else s.roi_links)[lid] = (pid, unwrap(child.getId()))
            obj.setId(rlong(lid))
            obj.setChild(child)
            return obj
        if isinstance(obj, omero.model.Annotation):
            aid = unwrap(obj.getId())
            if aid is None:
                aid = s.new_id()
                obj.setId(rlong(aid))
                obj.setVersion(rint(0))
                if isinstance(obj, omero.model.FileAnnotationI) and obj.getFile() is not None:
                    if obj.getFile().getId() is None:      # a new file saved in the same graph
                        obj.setFile(self._store(obj.getFile(), gid))
                    fid = unwrap(obj.getFile().getId())
                    if fid not in s.files:
                        raise omero.ValidationException(message=f"file annotation of unknown file {fid}")
                s._details(obj, gid)
                s.annotations[aid] = obj
                s.ann_group[aid] = gid
                return obj
            old = s.annotations.get(aid)
            if old is None:
                raise omero.ValidationException(message=f"annotation {aid} does not exist")
            if unwrap(obj.getVersion()) != unwrap(old.getVersion()):
                raise omero.OptimisticLockException(message=f"annotation {aid}: stale version")
            obj.setVersion(rint(unwrap(old.getVersion()) + 1))
            s.annotations[aid] = obj
            return obj
        if isinstance(obj, omero.model.OriginalFileI):
            if obj.getId() is not None:
                raise omero.ApiUsageException(message="original file already saved")
            fid = s.new_id()
            obj.setId(rlong(fid))
            s.files[fid] = obj
            s.file_data[fid] = bytearray()
            return obj
        raise omero.ApiUsageException(message=f"the fake server cannot save {type(obj).__name__}")

    def _call(self, cb, method, current, detail, fn):
        try:
            fault = self.s.enter("IUpdate", method, current, detail)
            with self.s.lock:
                if fault is not None:
                    if fault["commit"]:
                        fn()
                    self.s.drop(current, cb)
                    return
                cb.ice_response(fn())
        except Ice.Exception as e:
            cb.ice_exception(e)

    def saveAndReturnIds_async(self, cb, graph, current=None):
        def fn():
            gid = self.s.group_of(current)
            ids = [unwrap(self._store(o, gid).getId()) for o in graph]
            self.s.rng.shuffle(ids)  # OMERO returns the ids unordered
            return ids
        self._call(cb, "saveAndReturnIds", current, len(graph), fn)

    def saveAndReturnObject_async(self, cb, obj, current=None):
        self._call(cb, "saveAndReturnObject", current, type(obj).__name__,
                   lambda: self._store(obj, self.s.group_of(current)))

    def saveObject_async(self, cb, obj, current=None):
        def fn():
            self._store(obj, self.s.group_of(current))
        self._call(cb, "saveObject", current, type(obj).__name__, fn)


@_strict
class _Query(omero.api.IQuery):
    def __init__(self, server):
        self.s = server

    def _answer(self, cb, method, query, params, current):
        try:
            self.s.enter("IQuery", method, current, KNOWN_QUERIES.get(query, query))
            if query not in KNOWN_QUERIES:
                raise omero.QueryException(message=f"the fake server does not know this query: {query}")
            with self.s.lock:
                rows = getattr(self, "_q_" + KNOWN_QUERIES[query])(params, current)
            f = params.theFilter if params is not None else None
            if f is not None and f.offset is not None:
                off, lim = unwrap(f.offset) or 0, unwrap(f.limit)
                rows = rows[off:off + lim if lim is not None else None]
            cb.ice_response(rows)
        except Ice.Exception as e:
            cb.ice_exception(e)

    def findAllByQuery_async(self, cb, query, params, current=None):
        self._answer(cb, "findAllByQuery", query, params, current)

    def projection_async(self, cb, query, params, current=None):
        self._answer(cb, "projection", query, params, current)

    def _visible(self, current) -> set[int]:
        g = current.ctx.get("omero.group")
        if g in (None, "", "-1"):
            return set(self.s.groups)
        return {int(g)} & set(self.s.groups)

    def _ann_loaded(self, aid):
        a = self.s.annotations[aid]
        if isinstance(a, omero.model.FileAnnotationI) and a.getFile() is not None:
            fid = unwrap(a.getFile().getId())
            if fid in self.s.files:
                a.setFile(self.s.files[fid])
        return a

    def _q_image_ann_links(self, params, current):
        iid = unwrap(params.map["iid"])
        vis = self._visible(current)
        out = []
        for lid, (p, a) in sorted(self.s.image_links.items()):
            if p == iid and self.s.images[p].group_id in vis:
                link = omero.model.ImageAnnotationLinkI(lid, True)
                link.setParent(omero.model.ImageI(p, False))
                link.setChild(self._ann_loaded(a))
                out.append(link)
        return out

    def _q_roi_ann_links(self, params, current):
        iid = unwrap(params.map["iid"])
        out = []
        for lid, (rid, a) in sorted(self.s.roi_links.items()):
            r = self.s.rois.get(rid)
            if r is not None and unwrap(r.getImage().getId()) == iid:
                link = omero.model.RoiAnnotationLinkI(lid, True)
                link.setParent(omero.model.RoiI(rid, False))
                link.setChild(self._ann_loaded(a))
                out.append(link)
        return out

    def _q_run_rois(self, params, current):
        iid, pat = unwrap(params.map["iid"]), _like(unwrap(params.map["tag"]))
        vis = self._visible(current)
        return [[rlong(rid), rstring(unwrap(r.getName())), rstring(unwrap(r.getDescription()))]
                for rid, r in sorted(self.s.rois.items())
                if unwrap(r.getImage().getId()) == iid and self.s.roi_group[rid] in vis
                and pat.match(unwrap(r.getDescription()) or "")]

    def _q_run_anns(self, params, current):
        pat = _like(unwrap(params.map["tag"]))
        vis = self._visible(current)
        return [[rlong(aid), rstring(unwrap(a.getNs())), rstring(unwrap(a.getDescription()))]
                for aid, a in sorted(self.s.annotations.items())
                if self.s.ann_group[aid] in vis and pat.match(unwrap(a.getDescription()) or "")]

    def _q_run_files(self, params, current):
        pat = _like(unwrap(params.map["tag"]))
        vis = self._visible(current)
        return [[rlong(aid), rlong(unwrap(a.getFile().getId()))]
                for aid, a in sorted(self.s.annotations.items())
                if isinstance(a, omero.model.FileAnnotationI) and a.getFile() is not None
                and self.s.ann_group[aid] in vis and pat.match(unwrap(a.getDescription()) or "")]

    def _q_run_table_files(self, params, current):
        pat = _like(unwrap(params.map["name"]))
        return [[rlong(fid), rstring(unwrap(f.getName()))] for fid, f in sorted(self.s.files.items())
                if pat.match(unwrap(f.getName()) or "")]


@_strict
class _Roi(omero.api.IRoi):
    def __init__(self, server):
        self.s = server

    def findByImage_async(self, cb, imageId, opts, current=None):
        try:
            self.s.enter("IRoi", "findByImage", current, imageId)
            with self.s.lock:
                if imageId not in self.s.images or not self.s.readable(self.s.images[imageId].group_id):
                    raise omero.SecurityViolation(message=f"image {imageId} not readable")
                rois = [r for rid, r in sorted(self.s.rois.items()) if unwrap(r.getImage().getId()) == imageId]
                off = unwrap(opts.offset) if opts is not None and opts.offset is not None else 0
                lim = unwrap(opts.limit) if opts is not None and opts.limit is not None else None
                page = rois[off:off + lim if lim is not None else None]
            cb.ice_response(omero.api.RoiResult(opts=opts, rois=page, byZ={}, byT={}))
        except Ice.Exception as e:
            cb.ice_exception(e)


@_strict
class _PixelStore(omero.api.RawPixelsStore):
    """RawPixelsStore over a FakeImage's arrays, honouring the server's conventions."""

    def __init__(self, server):
        self.s = server
        self.image = None
        self.level = 0      # index into FakeImage.levels (0 = full resolution)

    def _cur(self):
        if self.image is None:
            raise omero.ApiUsageException(message="setPixelsId first")
        return self.image.levels[self.level]

    def _ok(self, cb, method, current, detail, fn):
        try:
            fault = self.s.enter("RawPixelsStore", method, current, detail)
            if fault is not None:
                self.s.drop(current, cb)
                return
            cb.ice_response(fn())
        except Ice.Exception as e:
            cb.ice_exception(e)

    def setPixelsId_async(self, cb, pixelsId, bypassOriginalFile, current=None):
        def fn():
            im = next((i for i in self.s.images.values() if i.pixels_id == pixelsId), None)
            if im is None or not self.s.readable(im.group_id):
                raise omero.SecurityViolation(message=f"pixels {pixelsId} not readable")
            self.image, self.level = im, 0
        self._ok(cb, "setPixelsId", current, pixelsId, fn)

    def getResolutionLevels_async(self, cb, current=None):
        self._ok(cb, "getResolutionLevels", current, None, lambda: len(self.image.levels))

    def getResolutionDescriptions_async(self, cb, current=None):
        def fn():
            return [omero.api.ResolutionDescription(int(a.shape[1]), int(a.shape[0])) for a in self.image.levels]
        self._ok(cb, "getResolutionDescriptions", current, None, fn)

    def setResolutionLevel_async(self, cb, resolutionLevel, current=None):
        def fn():
            n = len(self.image.levels)
            if not 0 <= resolutionLevel < n:
                raise omero.ApiUsageException(message=f"resolution level {resolutionLevel} not in [0, {n})")
            self.level = n - 1 - resolutionLevel   # OMERO counts resolution levels from the smallest
        self._ok(cb, "setResolutionLevel", current, resolutionLevel, fn)

    def getResolutionLevel_async(self, cb, current=None):
        self._ok(cb, "getResolutionLevel", current, None, lambda: len(self.image.levels) - 1 - self.level)

    def getTileSize_async(self, cb, current=None):
        self._ok(cb, "getTileSize", current, None, lambda: [int(self.image.tile[0]), int(self.image.tile[1])])

    def _region(self, z, c, t, x, y, w, h) -> bytes:
        a = self._cur()
        H, W = a.shape[:2]
        C = a.shape[2] if a.ndim == 3 else 1
        if z != 0 or t != 0 or not 0 <= c < C:
            raise omero.ApiUsageException(message=f"plane z={z} c={c} t={t} out of range")
        if w <= 0 or h <= 0 or x < 0 or y < 0 or x + w > W or y + h > H:
            raise omero.ApiUsageException(message=f"tile ({x},{y},{w},{h}) outside {W}x{H}")
        if w > MAX_PLANE or h > MAX_PLANE:
            raise omero.ApiUsageException(message=f"tile {w}x{h} larger than {MAX_PLANE}x{MAX_PLANE}")
        block = np.asarray(a[y:y + h, x:x + w, c] if a.ndim == 3 else a[y:y + h, x:x + w])
        data = block.astype(block.dtype.newbyteorder(">")).tobytes()
        self.s.tile_bytes += len(data)
        return data

    def getTile_async(self, cb, z, c, t, x, y, w, h, current=None):
        self._ok(cb, "getTile", current, (self.level, c, x, y, w, h), lambda: self._region(z, c, t, x, y, w, h))

    def getPlane_async(self, cb, z, c, t, current=None):
        def fn():
            H, W = self._cur().shape[:2]
            return self._region(z, c, t, 0, 0, W, H)
        self._ok(cb, "getPlane", current, (z, c, t), fn)

    def close_async(self, cb, current=None):
        try:
            self.s.enter("RawPixelsStore", "close", current)
            _forget(self.s, current)
            cb.ice_response()
        except Ice.Exception as e:
            cb.ice_exception(e)


@_strict
class _FileStore(omero.api.RawFileStore):
    def __init__(self, server):
        self.s = server
        self.fid = None

    def _ok(self, cb, method, current, detail, fn):
        try:
            if self.s.enter("RawFileStore", method, current, detail) is not None:
                self.s.drop(current, cb)
                return
            with self.s.lock:
                cb.ice_response(fn())
        except Ice.Exception as e:
            cb.ice_exception(e)

    def setFileId_async(self, cb, fileId, current=None):
        def fn():
            if fileId not in self.s.files:
                raise omero.ValidationException(message=f"no original file {fileId}")
            self.fid = fileId
        self._ok(cb, "setFileId", current, fileId, fn)

    def write_async(self, cb, buf, position, length, current=None):
        def fn():
            d = self.s.file_data[self.fid]
            if len(d) < position + length:
                d.extend(b"\0" * (position + length - len(d)))
            d[position:position + length] = buf[:length]
        self._ok(cb, "write", current, length, fn)

    def read_async(self, cb, position, length, current=None):
        self._ok(cb, "read", current, length, lambda: bytes(self.s.file_data[self.fid][position:position + length]))

    def size_async(self, cb, current=None):
        self._ok(cb, "size", current, None, lambda: len(self.s.file_data[self.fid]))

    def save_async(self, cb, current=None):
        def fn():
            f = self.s.files[self.fid]
            f.setSize(rlong(len(self.s.file_data[self.fid])))
            return f
        self._ok(cb, "save", current, None, fn)

    def close_async(self, cb, current=None):
        try:
            self.s.enter("RawFileStore", "close", current)
            _forget(self.s, current)
            cb.ice_response(None)
        except Ice.Exception as e:
            cb.ice_exception(e)


class _Table(omero.grid.Table):
    def __init__(self, server, data: _TableData):
        self.s = server
        self.d = data

    def _enter(self, method, current, detail=None):
        if self.s.enter("Table", method, current, detail) is not None:
            self.s.drop(current)
            raise _Dropped()

    def getOriginalFile(self, current=None):
        self._enter("getOriginalFile", current)
        return self.s.files[self.d.file_id]

    def initialize(self, cols, current=None):
        self._enter("initialize", current, len(cols))
        if self.d.headers:
            raise omero.ApiUsageException(message="table already initialized")
        if len(cols) > MAX_TABLE_COLUMNS:
            raise omero.InternalException(message=f"HDF5: object header message is too large ({len(cols)} columns)")
        names = [c.name for c in cols]
        if len(set(names)) != len(names):
            raise omero.ApiUsageException(message=f"duplicate column names {names}")
        for n in names:  # the server's HdfStorage builds a PyTables Description, whose check_name_validity refuses
            # these (tables/path.py); its @remoted decorator returns the ValueError as an InternalException
            if n == "" or n == "." or "/" in n:
                why = ("the empty string is not allowed as an object name" if n == "" else
                       "``.`` is not allowed as an object name" if n == "." else
                       f"the ``/`` character is not allowed in object names: {n!r}")
                raise omero.InternalException(serverExceptionClass="ValueError", message=why)
        with self.s.lock:
            self.d.headers = [(c.name, type(c).__name__, c.description, getattr(c, "size", None)) for c in cols]
            self.d.values = {c.name: [] for c in cols}

    def addData(self, cols, current=None):
        self._enter("addData", current, (len(cols), len(cols[0].values) if cols else 0))
        heads = [(c.name, type(c).__name__) for c in cols]
        if heads != [(h[0], h[1]) for h in self.d.headers]:
            raise omero.ApiUsageException(message="addData columns differ from the table's headers")
        n = {len(c.values) for c in cols}
        if len(n) != 1:
            raise omero.ApiUsageException(message=f"columns of unequal length {sorted(n)}")
        with self.s.lock:
            for c, h in zip(cols, self.d.headers):
                if h[1] == "StringColumn" and any(len(v.encode("utf-8")) > h[3] for v in c.values):
                    raise omero.ApiUsageException(message=f"string longer than column {h[0]}'s size {h[3]}")
                self.d.values[c.name].extend(c.values)
            self.d.n_rows += n.pop()

    def getHeaders(self, current=None):
        self._enter("getHeaders", current)
        return [getattr(omero.grid, t)(n, d, *(() if s is None else (s,))) for n, t, d, s in self.d.headers]

    def getNumberOfRows(self, current=None):
        self._enter("getNumberOfRows", current)
        return self.d.n_rows

    def read(self, colNumbers, start, stop, current=None):
        self._enter("read", current, (len(colNumbers), start, stop))
        cols = []
        for i in colNumbers:
            n, t, d, s = self.d.headers[i]
            col = getattr(omero.grid, t)(n, d, *(() if s is None else (s,)))
            col.values = list(self.d.values[n][start:stop])
            cols.append(col)
        return omero.grid.Data(lastModification=0, rowNumbers=list(range(start, min(stop, self.d.n_rows))),
                               columns=cols)

    def close(self, current=None):
        self._enter("close", current)
        _forget(self.s, current)


class _Resources(omero.grid.SharedResources):
    def __init__(self, server):
        self.s = server

    def repositories(self, current=None):
        self.s.enter("SharedResources", "repositories", current)
        return omero.grid.RepositoryMap(descriptions=[omero.model.OriginalFileI(1, False)], proxies=[])

    def areTablesEnabled(self, current=None):
        return True

    def newTable(self, repoId, path, current=None):
        if self.s.enter("SharedResources", "newTable", current, path) is not None:
            self.s.drop(current)
            raise _Dropped()
        with self.s.lock:
            self.s.group_of(current)
            fid = self.s.new_id()
            f = omero.model.OriginalFileI(fid, True)
            f.setName(rstring(path))
            f.setPath(rstring("/"))
            f.setMimetype(rstring("OMERO.tables"))
            f.setSize(rlong(0))
            self.s.files[fid] = f
            self.s.file_data[fid] = bytearray()
            data = self.s.tables[fid] = _TableData(fid)
        prx = self.s.add_servant(_Table(self.s, data), current.id.category)
        return omero.grid.TablePrx.uncheckedCast(prx)

    def openTable(self, file, current=None):
        self.s.enter("SharedResources", "openTable", current, unwrap(file.getId()))
        data = self.s.tables.get(unwrap(file.getId()))
        if data is None:
            return None
        return omero.grid.TablePrx.uncheckedCast(self.s.add_servant(_Table(self.s, data), current.id.category))


def _forget(s: FakeOmeroServer, current) -> None:
    """Remove a stateful servant (closed store or table)."""
    with s.lock:
        try:
            current.adapter.remove(current.id)
        except Ice.NotRegisteredException:
            pass
        ids = s._identities.get(current.id.category, [])
        if current.id in ids:
            ids.remove(current.id)


# ====================================================================== the gateway surface
class _Handle:
    def __init__(self, request, ctx):
        self.request, self.ctx = request, ctx
        self.closed = False

    def close(self):
        self.closed = True


class _ServiceFactory:
    """``gateway.c.sf``: the few ServiceFactory calls stimage_nb makes."""

    def __init__(self, gw: "FakeBlitzGateway"):
        self.gw = gw

    def sharedResources(self, ctx=None):
        self.gw._check()
        return omero.grid.SharedResourcesPrx.uncheckedCast(self.gw._proxy("resources"))

    def createRawFileStore(self, ctx=None):
        return self.gw.createRawFileStore()

    def submit(self, request, ctx=None):
        self.gw._check()
        self.gw.server.calls.append(("ServiceFactory", "submit", type(request).__name__))
        return _Handle(request, ServiceOptsDict(ctx or {}))


class _Client:
    """``gateway.c``: session id, keep-alive, waitOnCmd (runs Delete2 requests)."""

    def __init__(self, gw: "FakeBlitzGateway"):
        self.gw = gw
        self.sf = _ServiceFactory(gw)

    def getSessionId(self):
        return self.gw.session_id

    def enableKeepAlive(self, seconds):
        pass

    def waitOnCmd(self, handle, loops=10, ms=500, failonerror=True, failontimeout=False, closehandle=False):
        gw, s = self.gw, self.gw.server
        gw._check()
        req = handle.request
        if not isinstance(req, omero.cmd.Delete2):
            raise NotImplementedError(type(req).__name__)
        with s.lock:
            s.calls.append(("ServiceFactory", "Delete2", {k: len(v) for k, v in req.targetObjects.items()}))
            err = _delete(s, req.targetObjects, handle.ctx)
            if err:
                if failonerror:
                    raise omero.CmdError(omero.cmd.ERR(category="graph-fail", name=err, parameters={}))
        if closehandle:
            handle.close()
        return handle


def _delete(s: FakeOmeroServer, targets: dict, ctx) -> str | None:
    """Delete objects like Delete2 (links go with their ends, a FileAnnotation takes its file)."""
    stores = {"Roi": s.rois, "Annotation": s.annotations, "MapAnnotation": s.annotations,
              "FileAnnotation": s.annotations, "OriginalFile": s.files}
    for typ, ids in targets.items():
        if typ not in stores:
            return f"cannot delete {typ}"
        missing = [i for i in ids if i not in stores[typ]]
        if missing:
            return f"no {typ} with ids {missing[:5]}"
    for typ, ids in targets.items():
        for i in ids:
            if typ == "Roi":
                s.rois.pop(i, None)
                s.roi_group.pop(i, None)
                for lid in [k for k, (p, _) in s.roi_links.items() if p == i]:
                    del s.roi_links[lid]
            elif typ == "OriginalFile":
                s.files.pop(i, None)
                s.file_data.pop(i, None)
                s.tables.pop(i, None)
                for aid in [a for a, ann in s.annotations.items() if isinstance(ann, omero.model.FileAnnotationI)
                            and ann.getFile() is not None and unwrap(ann.getFile().getId()) == i]:
                    _drop_annotation(s, aid)
            else:
                ann = s.annotations.get(i)
                if ann is None:
                    continue
                if isinstance(ann, omero.model.FileAnnotationI) and ann.getFile() is not None:
                    fid = unwrap(ann.getFile().getId())
                    s.files.pop(fid, None)
                    s.file_data.pop(fid, None)
                    s.tables.pop(fid, None)
                _drop_annotation(s, i)
    return None


def _drop_annotation(s, aid):
    s.annotations.pop(aid, None)
    s.ann_group.pop(aid, None)
    for links in (s.image_links, s.roi_links):
        for lid in [k for k, (_, a) in links.items() if a == aid]:
            del links[lid]


class _ContainerService:
    def __init__(self, gw):
        self.gw = gw

    def getCollectionCount(self, type_, prop, ids, options, ctx=None):
        s = self.gw.server
        out = {}
        for i in ids:
            if type_.startswith("Project"):
                out[i] = len(s.projects[i][1])
            elif type_.startswith("Dataset"):
                out[i] = len(s.datasets[i][1])
        return out


class FakeBlitzGateway:
    """The BlitzGateway surface stimage_nb uses, backed by a :class:`FakeOmeroServer` (one session)."""

    # omero-py's own upload code runs unchanged against the double
    createFileAnnfromLocalFile = BlitzGateway.createFileAnnfromLocalFile
    createOriginalFileFromLocalFile = BlitzGateway.createOriginalFileFromLocalFile
    createOriginalFileFromFileObj = BlitzGateway.createOriginalFileFromFileObj

    def __init__(self, server: FakeOmeroServer):
        self.server = server
        self.session_id, self._prx = server.open_session()
        self.host, self.port = "fake-omero.test", 4064
        self.SERVICE_OPTS = ServiceOptsDict()
        self._ic = _communicator(client=True)
        self._connected = True
        self.c = _Client(self)

    # --------------------------------------------------------------- connection state
    def _check(self):
        if not self._connected:
            raise omero.ClientError("the gateway is closed")
        if self.session_id in self.server.dead_sessions:
            raise Ice.ConnectionLostException()

    def _proxy(self, name: str):
        return self._ic.stringToProxy(self._prx[name])

    def isConnected(self) -> bool:
        return self._connected and self.session_id not in self.server.dead_sessions

    def keepAlive(self) -> bool:
        return self.isConnected()

    def close(self, hard: bool = True) -> None:
        self._connected = False
        self.server.calls.append(("Gateway", "close", hard))

    def _destroy(self):
        try:
            self._ic.destroy()
        except Exception:  # noqa: BLE001
            pass

    def getEventContext(self):
        class EC:
            userName = self.server.user
            userId = self.server.user_id
            groupId = self.server.default_group
            groupName = self.server.groups[self.server.default_group]
        return EC()

    def getLastError(self):
        return None

    # --------------------------------------------------------------- services (real Ice proxies)
    def getUpdateService(self):
        self._check()
        return omero.api.IUpdatePrx.uncheckedCast(self._proxy("update"))

    def getQueryService(self):
        self._check()
        return omero.api.IQueryPrx.uncheckedCast(self._proxy("query"))

    def getRoiService(self):
        self._check()
        return omero.api.IRoiPrx.uncheckedCast(self._proxy("roi"))

    def getContainerService(self):
        self._check()
        return _ContainerService(self)

    def createRawPixelsStore(self):
        self._check()
        prx = self.server.add_servant(_PixelStore(self.server), self.session_id)
        return omero.api.RawPixelsStorePrx.uncheckedCast(self._ic.stringToProxy(self.server.ic.proxyToString(prx)))

    def createRawFileStore(self):
        self._check()
        prx = self.server.add_servant(_FileStore(self.server), self.session_id)
        return omero.api.RawFileStorePrx.uncheckedCast(self._ic.stringToProxy(self.server.ic.proxyToString(prx)))

    # --------------------------------------------------------------- objects (omero-py wrappers)
    def getObject(self, obj_type: str, oid=None, params=None, attributes=None, opts=None):
        self._check()
        s = self.server
        t = obj_type.lower()
        s.calls.append(("Gateway", "getObject", (obj_type, oid)))
        with s.lock:
            if t == "image":
                im = s.images.get(int(oid))
                if im is None or not self._group_ok(im.group_id):
                    return None
                return ImageWrapper(self, s.image_obj(int(oid)))
            if t == "mapannotation":
                a = s.annotations.get(int(oid))
                if not isinstance(a, omero.model.MapAnnotationI) or not self._group_ok(s.ann_group[int(oid)]):
                    return None
                return MapAnnotationWrapper(self, _ice_copy(self, a))
            if t == "project":
                return self._project(int(oid)) if int(oid) in s.projects else None
            if t == "dataset":
                return self._dataset(int(oid)) if int(oid) in s.datasets else None
        raise NotImplementedError(f"FakeBlitzGateway.getObject({obj_type!r})")

    def _group_ok(self, gid: int) -> bool:
        g = self.SERVICE_OPTS.getOmeroGroup()
        if g in (None, "", "-1", -1):
            return self.server.readable(gid)
        return int(g) == gid and self.server.readable(gid)

    def _project(self, pid):
        p = omero.model.ProjectI(pid, True)
        p.setName(rstring(self.server.projects[pid][0]))
        self.server._details(p, self.server.default_group)
        return ProjectWrapper(self, p)

    def _dataset(self, did):
        d = omero.model.DatasetI(did, True)
        d.setName(rstring(self.server.datasets[did][0]))
        self.server._details(d, self.server.default_group)
        return DatasetWrapper(self, d)

    def getObjects(self, obj_type: str, ids=None, params=None, attributes=None, respect_order=False, opts=None):
        self._check()
        s = self.server
        opts = opts or {}
        s.calls.append(("Gateway", "getObjects", (obj_type, dict(opts))))
        t = obj_type.lower()
        if t == "project":
            return [self._project(p) for p in sorted(s.projects)]
        if t == "dataset":
            ds = s.projects[opts["project"]][1] if "project" in opts else sorted(s.datasets)
            return [self._dataset(d) for d in ds]
        if t == "image":
            if "dataset" in opts:
                ims = s.datasets[opts["dataset"]][1]
            elif opts.get("orphaned"):
                ims = [i for i, im in sorted(s.images.items()) if im.dataset_id is None]
            else:
                ims = sorted(s.images)
            return [ImageWrapper(self, s.image_obj(i)) for i in ims if self._group_ok(s.images[i].group_id)]
        raise NotImplementedError(f"FakeBlitzGateway.getObjects({obj_type!r})")


def _ice_copy(gw, obj):
    """A client-side copy of a server object (what a query would hand back: not the stored object)."""
    import copy

    return copy.deepcopy(obj)
