// stimage_nb slide viewer: pan/zoom over an OME-Zarr pyramid served as tiles by the Python kernel,
// with a per-spot overlay (predicted gene / cell type, mean or uncertainty) drawn on top.
// Plain ES module, no imports: it ships inside the package and needs no network at run time.
//
// Model traits (see stimage_nb/widgets/viewer.py, SlideCanvas):
//   image_info {width, height, um_per_px, tile_size, levels:[{width,height,downsample}], format}
//   overview (bytes, encoded image of the whole slide), overview_downsample
//   points (float32 x,y pairs, level-0 px), radius_px, values (float32, NaN = not drawn)
//   vmin, vmax, lut (256x4 uint8 RGBA), legend, opacity, show_overlay, selected, view {cx,cy,zoom}
//   height (css px)
//   shapes (float32 x,y vertices, level-0 px), shape_offsets (int32, start of each polygon; n+1 entries),
//   shape_values (float32), shape_lut (256x4 uint8 RGBA over [-shape_limit, shape_limit]): a clicked spot's
//   nuclei coloured by attribution, drawn over the spots
// Custom messages: JS -> Python {type:"tiles", tiles:[{level,col,row}]};
//                  Python -> JS {type:"tile", level, col, row, mime} + one buffer (encoded tile).

function toBytes(v) {
  if (!v) return new Uint8Array(0);
  if (v instanceof Uint8Array) return v;
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  return new Uint8Array(0);
}

function toFloat32(v) {
  const b = toBytes(v);
  const copy = b.slice(); // aligned copy
  return new Float32Array(copy.buffer, 0, Math.floor(copy.byteLength / 4));
}

function fmt(x) {
  if (!isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 0.01 || a >= 1e5)) return x.toExponential(1);
  if (a < 1) return x.toFixed(3);
  if (a < 100) return x.toFixed(2);
  return x.toFixed(0);
}

function niceScaleBar(umPerScreenPx, maxPx) {
  const target = umPerScreenPx * maxPx;
  const pow = Math.pow(10, Math.floor(Math.log10(target)));
  let best = pow;
  for (const m of [1, 2, 5, 10]) if (m * pow <= target) best = m * pow;
  return best;
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "stimage-viewer";
  const canvas = document.createElement("canvas");
  canvas.className = "stimage-viewer-canvas";
  canvas.tabIndex = 0;
  const bar = document.createElement("div");
  bar.className = "stimage-viewer-toolbar";
  const mk = (label, title, fn) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.title = title;
    b.className = "stimage-viewer-btn";
    b.addEventListener("click", (e) => { e.preventDefault(); fn(); });
    bar.appendChild(b);
    return b;
  };
  root.appendChild(canvas);
  root.appendChild(bar);
  el.appendChild(root);
  const ctx = canvas.getContext("2d");

  // ----------------------------------------------------------------------------- state
  const tiles = new Map();      // key -> ImageBitmap | "pending"
  const order = [];             // LRU of loaded keys
  const MAX_TILES = 400;
  let overview = null;          // ImageBitmap
  let pts = new Float32Array(0);
  let vals = new Float32Array(0);
  let lut = new Uint8Array(0);
  let shp = new Float32Array(0), shpOff = new Int32Array(0), shpVal = new Float32Array(0), shpLut = new Uint8Array(0);
  let view = null;              // {cx, cy, zoom}: level-0 px at the centre; css px per level-0 px
  let cssW = 0, cssH = 0, dpr = 1;
  let frame = 0;
  let sendTimer = null;

  const info = () => model.get("image_info") || {};

  function fit() {
    const im = info();
    if (!im.width || !cssW) return;
    const zoom = Math.min(cssW / im.width, cssH / im.height) * 0.98;
    view = { cx: im.width / 2, cy: im.height / 2, zoom };
  }

  function syncView() {
    if (sendTimer) clearTimeout(sendTimer);
    sendTimer = setTimeout(() => {
      sendTimer = null;
      if (!view) return;
      model.set("view", { cx: view.cx, cy: view.cy, zoom: view.zoom });
      model.save_changes();
    }, 150);
  }

  function schedule() {
    if (frame) return;
    frame = requestAnimationFrame(() => { frame = 0; draw(); });
  }

  async function loadOverview() {
    const bytes = toBytes(model.get("overview"));
    overview = null;
    if (bytes.length) {
      const mime = (info().format === "png") ? "image/png" : "image/jpeg";
      try { overview = await createImageBitmap(new Blob([bytes], { type: mime })); } catch (e) { overview = null; }
    }
    schedule();
  }

  function loadOverlay() {
    pts = toFloat32(model.get("points"));
    vals = toFloat32(model.get("values"));
    lut = toBytes(model.get("lut"));
    schedule();
  }

  function loadShapes() {
    shp = toFloat32(model.get("shapes"));
    const ob = toBytes(model.get("shape_offsets")).slice();
    shpOff = new Int32Array(ob.buffer, 0, Math.floor(ob.byteLength / 4));
    shpVal = toFloat32(model.get("shape_values"));
    shpLut = toBytes(model.get("shape_lut"));
    schedule();
  }

  function drawShapes() {
    const n = Math.min(shpOff.length - 1, shpVal.length);
    if (n <= 0 || shpLut.length < 1024) return;
    const lim = model.get("shape_limit") || 1;
    ctx.globalAlpha = Math.max(0.35, Math.min(1, model.get("opacity")));
    ctx.lineWidth = 0.6;
    ctx.strokeStyle = "rgba(0,0,0,0.8)";
    for (let i = 0; i < n; i++) {
      const a = shpOff[i], b = shpOff[i + 1];
      if (b - a < 3) continue;
      const k = Math.max(0, Math.min(255, Math.round((0.5 + 0.5 * shpVal[i] / lim) * 255))) * 4;
      ctx.fillStyle = `rgb(${shpLut[k]},${shpLut[k + 1]},${shpLut[k + 2]})`;
      ctx.beginPath();
      for (let j = a; j < b; j++) {
        const [sx, sy] = toScreen(shp[2 * j], shp[2 * j + 1]);
        if (j === a) ctx.moveTo(sx, sy); else ctx.lineTo(sx, sy);
      }
      ctx.closePath();
      ctx.fill();
      ctx.stroke();
    }
    ctx.globalAlpha = 1;
  }

  function resize() {
    const h = model.get("height") || 520;
    const w = Math.max(200, root.clientWidth || el.clientWidth || 640);
    dpr = window.devicePixelRatio || 1;
    if (w === cssW && h === cssH) return;
    cssW = w; cssH = h;
    canvas.style.width = w + "px";
    canvas.style.height = h + "px";
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    if (!view) fit();
    schedule();
  }

  // ----------------------------------------------------------------------------- tiles
  function chooseLevel(im) {
    const levels = im.levels || [];
    const wanted = 1 / (view.zoom * dpr); // level-0 px per device px
    let best = 0;
    for (let i = 0; i < levels.length; i++) if (levels[i].downsample <= wanted * 1.01) best = i;
    return best;
  }

  function requestTiles(list) {
    if (!list.length) return;
    for (const t of list) tiles.set(`${t.level}/${t.col}/${t.row}`, "pending");
    model.send({ type: "tiles", tiles: list });
  }

  function onCustom(msg, buffers) {
    if (!msg || msg.type !== "tile") return;
    const key = `${msg.level}/${msg.col}/${msg.row}`;
    const buf = buffers && buffers.length ? toBytes(buffers[0]) : null;
    if (!buf || !buf.length) { tiles.delete(key); return; }
    createImageBitmap(new Blob([buf], { type: msg.mime || "image/jpeg" })).then((bmp) => {
      tiles.set(key, bmp);
      order.push(key);
      while (order.length > MAX_TILES) {
        const old = order.shift();
        const b = tiles.get(old);
        if (b && b.close) b.close();
        tiles.delete(old);
      }
      schedule();
    }).catch(() => tiles.delete(key));
  }

  // ----------------------------------------------------------------------------- drawing
  function toScreen(x, y) {
    return [(x - view.cx) * view.zoom + cssW / 2, (y - view.cy) * view.zoom + cssH / 2];
  }
  function toImage(sx, sy) {
    return [(sx - cssW / 2) / view.zoom + view.cx, (sy - cssH / 2) / view.zoom + view.cy];
  }

  function draw() {
    if (!cssW) return;
    if (!view) fit();
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.fillStyle = "#f2f2f2";
    ctx.fillRect(0, 0, cssW, cssH);
    const im = info();
    if (!view || !im.width) return;
    // the current view, readable from the page (level-0 px at the centre, css px per level-0 px)
    canvas.dataset.view = JSON.stringify({ cx: view.cx, cy: view.cy, zoom: view.zoom, width: cssW, height: cssH });
    // base: the overview, then the tiles of the level that matches the zoom
    const [ox, oy] = toScreen(0, 0);
    ctx.imageSmoothingEnabled = true;
    if (overview) ctx.drawImage(overview, ox, oy, im.width * view.zoom, im.height * view.zoom);
    const lev = chooseLevel(im);
    const ovDs = model.get("overview_downsample") || Infinity;
    const L = (im.levels || [])[lev];
    if (L && (!overview || L.downsample < ovDs * 0.99)) {
      const T = im.tile_size || 512;
      const [x0, y0] = toImage(0, 0);
      const [x1, y1] = toImage(cssW, cssH);
      const c0 = Math.max(0, Math.floor(x0 / L.downsample / T));
      const r0 = Math.max(0, Math.floor(y0 / L.downsample / T));
      const c1 = Math.min(Math.ceil(L.width / T) - 1, Math.floor(x1 / L.downsample / T));
      const r1 = Math.min(Math.ceil(L.height / T) - 1, Math.floor(y1 / L.downsample / T));
      const missing = [];
      for (let r = r0; r <= r1; r++) {
        for (let c = c0; c <= c1; c++) {
          const key = `${lev}/${c}/${r}`;
          const t = tiles.get(key);
          if (t === undefined) { missing.push({ level: lev, col: c, row: r }); continue; }
          if (t === "pending") continue;
          const [sx, sy] = toScreen(c * T * L.downsample, r * T * L.downsample);
          ctx.drawImage(t, sx, sy, t.width * L.downsample * view.zoom, t.height * L.downsample * view.zoom);
        }
      }
      if (missing.length > 64) missing.length = 64;
      requestTiles(missing);
    }
    // overlay
    const n = Math.min(pts.length / 2, vals.length);
    if (model.get("show_overlay") && n > 0 && lut.length >= 1024) {
      const vmin = model.get("vmin"), vmax = model.get("vmax");
      const span = vmax > vmin ? vmax - vmin : 1;
      const r = Math.max(1.5, (model.get("radius_px") || 10) * view.zoom);
      ctx.globalAlpha = Math.max(0, Math.min(1, model.get("opacity")));
      for (let i = 0; i < n; i++) {
        const v = vals[i];
        if (!isFinite(v)) continue;
        const [sx, sy] = toScreen(pts[2 * i], pts[2 * i + 1]);
        if (sx < -r || sy < -r || sx > cssW + r || sy > cssH + r) continue;
        const k = Math.max(0, Math.min(255, Math.round(((v - vmin) / span) * 255))) * 4;
        ctx.fillStyle = `rgb(${lut[k]},${lut[k + 1]},${lut[k + 2]})`;
        ctx.beginPath();
        ctx.arc(sx, sy, r, 0, 2 * Math.PI);
        ctx.fill();
      }
      ctx.globalAlpha = 1;
      const sel = model.get("selected");
      if (sel >= 0 && sel < pts.length / 2) {
        const [sx, sy] = toScreen(pts[2 * sel], pts[2 * sel + 1]);
        ctx.lineWidth = 2.5;
        ctx.strokeStyle = "#000";
        ctx.beginPath(); ctx.arc(sx, sy, r + 2, 0, 2 * Math.PI); ctx.stroke();
        ctx.lineWidth = 1.2;
        ctx.strokeStyle = "#fff";
        ctx.beginPath(); ctx.arc(sx, sy, r + 4, 0, 2 * Math.PI); ctx.stroke();
      }
      drawLegend(vmin, vmax);
    }
    if (model.get("show_overlay")) drawShapes();
    drawScaleBar(im);
  }

  function drawLegend(vmin, vmax) {
    const w = 160, h = 10, x = 12, y = cssH - 34;
    ctx.fillStyle = "rgba(255,255,255,0.85)";
    ctx.fillRect(x - 6, y - 20, w + 12, 48);
    for (let i = 0; i < w; i++) {
      const k = Math.round((i / (w - 1)) * 255) * 4;
      ctx.fillStyle = `rgb(${lut[k]},${lut[k + 1]},${lut[k + 2]})`;
      ctx.fillRect(x + i, y, 1.5, h);
    }
    ctx.fillStyle = "#111";
    ctx.font = "11px sans-serif";
    ctx.textBaseline = "alphabetic";
    ctx.textAlign = "left";
    ctx.fillText(String(model.get("legend") || "").slice(0, 40), x, y - 6);
    ctx.fillText(fmt(vmin), x, y + h + 12);
    ctx.textAlign = "right";
    ctx.fillText(fmt(vmax), x + w, y + h + 12);
    ctx.textAlign = "left";
  }

  function drawScaleBar(im) {
    if (!im.um_per_px) return;
    const umPerCss = im.um_per_px / view.zoom;
    const um = niceScaleBar(umPerCss, 120);
    const px = um / umPerCss;
    const x = cssW - px - 16, y = cssH - 16;
    ctx.fillStyle = "rgba(255,255,255,0.85)";
    ctx.fillRect(x - 6, y - 18, px + 12, 26);
    ctx.fillStyle = "#111";
    ctx.fillRect(x, y, px, 3);
    ctx.font = "11px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(um >= 1000 ? `${um / 1000} mm` : `${um} µm`, x + px / 2, y - 5);
    ctx.textAlign = "left";
  }

  // ----------------------------------------------------------------------------- interaction
  let drag = null;
  function zoomAt(sx, sy, factor) {
    if (!view) return;
    const im = info();
    const [ix, iy] = toImage(sx, sy);
    const minZoom = Math.min(cssW / (im.width || 1), cssH / (im.height || 1)) * 0.25;
    const maxZoom = 16 / dpr;
    view.zoom = Math.max(minZoom, Math.min(maxZoom, view.zoom * factor));
    view.cx = ix - (sx - cssW / 2) / view.zoom;
    view.cy = iy - (sy - cssH / 2) / view.zoom;
    schedule();
    syncView();
  }
  function pick(sx, sy) {
    const [ix, iy] = toImage(sx, sy);
    const n = pts.length / 2;
    const r = Math.max((model.get("radius_px") || 10), 3 / view.zoom);
    let best = -1, bestD = r * r;
    for (let i = 0; i < n; i++) {
      if (i < vals.length && !isFinite(vals[i])) continue;
      const dx = pts[2 * i] - ix, dy = pts[2 * i + 1] - iy;
      const d = dx * dx + dy * dy;
      if (d <= bestD) { bestD = d; best = i; }
    }
    return best;
  }
  canvas.addEventListener("pointerdown", (e) => {
    drag = { x: e.offsetX, y: e.offsetY, cx: view ? view.cx : 0, cy: view ? view.cy : 0, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag || !view) return;
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    if (drag.moved) {
      view.cx = drag.cx - dx / view.zoom;
      view.cy = drag.cy - dy / view.zoom;
      schedule();
    }
  });
  canvas.addEventListener("pointerup", (e) => {
    if (!drag) return;
    const moved = drag.moved;
    drag = null;
    if (moved) { syncView(); return; }
    if (!view) return;
    const i = pick(e.offsetX, e.offsetY);
    model.set("selected", i);
    model.save_changes();
    schedule();
  });
  canvas.addEventListener("wheel", (e) => {
    e.preventDefault();
    zoomAt(e.offsetX, e.offsetY, Math.pow(1.0015, -e.deltaY));
  }, { passive: false });
  mk("+", "zoom in", () => zoomAt(cssW / 2, cssH / 2, 1.6));
  mk("−", "zoom out", () => zoomAt(cssW / 2, cssH / 2, 1 / 1.6));
  mk("⤢", "fit the slide", () => { fit(); schedule(); syncView(); });

  // ----------------------------------------------------------------------------- model events
  function onView() {
    const v = model.get("view");
    if (v && isFinite(v.zoom) && v.zoom > 0) {
      if (!view || Math.abs(v.cx - view.cx) > 1e-6 || Math.abs(v.cy - view.cy) > 1e-6 || Math.abs(v.zoom - view.zoom) > 1e-9) {
        view = { cx: v.cx, cy: v.cy, zoom: v.zoom };
        schedule();
      }
    }
  }
  function onImage() {
    for (const b of tiles.values()) if (b && b.close) b.close();
    tiles.clear();
    order.length = 0;
    view = null;
    onView();
    if (!view) fit();
    loadOverview();
  }
  const handlers = [
    ["change:image_info", onImage],
    ["change:overview", loadOverview],
    ["change:points", loadOverlay],
    ["change:values", loadOverlay],
    ["change:lut", loadOverlay],
    ["change:vmin", schedule], ["change:vmax", schedule], ["change:legend", schedule],
    ["change:opacity", schedule], ["change:show_overlay", schedule], ["change:radius_px", schedule],
    ["change:selected", schedule], ["change:view", onView], ["change:height", resize],
    ["msg:custom", onCustom],
    ["change:shapes", loadShapes], ["change:shape_values", loadShapes], ["change:shape_offsets", loadShapes],
    ["change:shape_lut", loadShapes], ["change:shape_limit", schedule],
  ];
  for (const [ev, fn] of handlers) model.on(ev, fn);
  const ro = new ResizeObserver(() => resize());
  ro.observe(root);

  onView();
  loadOverlay();
  loadShapes();
  loadOverview();
  resize();
  schedule();

  return () => {
    ro.disconnect();
    for (const [ev, fn] of handlers) model.off(ev, fn);
    if (frame) cancelAnimationFrame(frame);
    for (const b of tiles.values()) if (b && b.close) b.close();
  };
}

export default { render };
