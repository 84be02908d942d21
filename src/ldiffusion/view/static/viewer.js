// ldiffusion view: the slide page. Layers are deep-zoom tile sources served by the ldiffusion
// server (/tiles/<id>/<layer>/<level>/<col>_<row>.png), stacked in OpenSeadragon.
// URL parameters: labels=0|1, uncertainty=0|1, objects=0|1 (layer on/off),
// opacity=<0..1> (class map), uopacity=<0..1> (uncertainty), navigator=0 (hide the overview).
'use strict';

const sid = decodeURIComponent(location.pathname.split('/')[2] || '');
const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const LAYERS = {
  labels: {title: 'Class map', on: true, opacity: 0.5},
  uncertainty: {title: 'Uncertainty', on: false, opacity: 0.7},
  objects: {title: 'Object outlines', on: true, opacity: 1.0},
};
const state = {tiles: 0, firstTileMs: null, t0: performance.now(), items: {}, pinned: false};

function fmt(v, digits) {
  if (v === null || v === undefined) return '–';
  return Number(v).toFixed(digits);
}

function tileSource(info, layer) {
  return {
    width: info.width, height: info.height, tileSize: info.tile_px, tileOverlap: 0,
    minLevel: info.min_level, maxLevel: info.max_level,
    getTileUrl: (level, x, y) => `/tiles/${encodeURIComponent(sid)}/${layer}/${level}/${x}_${y}.png`,
  };
}

function setLayer(name, on, opacity) {
  const item = state.items[name];
  const cfg = LAYERS[name];
  if (on !== undefined) cfg.on = on;
  if (opacity !== undefined) cfg.opacity = opacity;
  if (item) item.setOpacity(cfg.on ? cfg.opacity : 0);
  const box = $('chk-' + name);
  if (box) box.checked = cfg.on;
  document.body.dataset[name] = cfg.on ? 'on' : 'off';
}

function buildLayerControls(info) {
  const div = $('layers');
  for (const name of Object.keys(LAYERS)) {
    if (!info.layers.includes(name)) continue;
    const cfg = LAYERS[name];
    const row = document.createElement('div');
    row.className = 'layer';
    row.innerHTML = `<input type="checkbox" id="chk-${name}"><label for="chk-${name}">${cfg.title}</label>` +
      `<input type="range" min="0" max="1" step="0.05" id="op-${name}" title="opacity">`;
    div.appendChild(row);
    $('chk-' + name).checked = cfg.on;
    $('chk-' + name).addEventListener('change', (e) => setLayer(name, e.target.checked));
    $('op-' + name).value = cfg.opacity;
    $('op-' + name).addEventListener('input', (e) => setLayer(name, undefined, Number(e.target.value)));
  }
  if (info.layers.includes('objects')) {
    const note = document.createElement('div');
    note.className = 'muted';
    note.textContent = `outlines appear from ${info.objects_max_downsample}x downsampling and finer`;
    div.appendChild(note);
  }
}

function buildLegend(info) {
  const t = $('legend');
  t.innerHTML = '<tr class="muted"><td></td><td>class</td><td class="num">mm²</td><td class="num">% fg</td></tr>';
  for (const c of info.classes) {
    const tr = document.createElement('tr');
    const [r, g, b] = c.color;
    const sw = c.id === 0 ? 'transparent' : `rgb(${r},${g},${b})`;
    tr.innerHTML = `<td><span class="swatch" style="background:${sw}"></span></td><td></td>` +
      `<td class="num">${fmt(c.area_mm2, 3)}</td>` +
      `<td class="num">${c.fraction_of_foreground == null ? '–' : fmt(100 * c.fraction_of_foreground, 1)}</td>`;
    tr.children[1].textContent = c.name;
    t.appendChild(tr);
  }
  if (info.layers.includes('uncertainty')) {
    const stops = info.uncertainty_colormap.map((c, i, a) =>
      `rgb(${c[0]},${c[1]},${c[2]}) ${(100 * i / (a.length - 1)).toFixed(1)}%`);
    $('colorbar').style.background = `linear-gradient(to right, ${stops.join(',')})`;
    $('cbwrap').hidden = false;
  }
  const ul = $('files');
  for (const f of info.files) {
    const li = document.createElement('li');
    const a = document.createElement('a');
    a.href = `/files/${encodeURIComponent(sid)}/${encodeURIComponent(f)}`;
    a.textContent = f;
    li.appendChild(a);
    ul.appendChild(li);
  }
}

function niceLength(um) {
  // largest 1, 2 or 5 x 10^k not above um
  const p = Math.pow(10, Math.floor(Math.log10(um)));
  for (const m of [5, 2, 1]) if (m * p <= um) return m * p;
  return p;
}

function updateScaleBar(viewer, info) {
  if (!info.mpp || !viewer.world.getItemAt(0)) { $('scalebar').hidden = true; return; }
  const item = viewer.world.getItemAt(0);
  const screenPerImagePx = item.viewportToImageZoom(viewer.viewport.getZoom(true));
  const umPerScreenPx = info.mpp / screenPerImagePx;
  const um = niceLength(umPerScreenPx * 120);
  $('sbbar').style.width = `${um / umPerScreenPx}px`;
  $('sblabel').textContent = um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

function showPoint(d) {
  const lines = [`x ${d.x.toFixed(0)}, y ${d.y.toFixed(0)} (level-0 px)`];
  lines.push(`class map: ${d.class === null ? 'outside' : d.class}`);
  if (d.uncertainty !== undefined && d.uncertainty !== null) lines.push(`uncertainty: ${fmt(d.uncertainty, 3)}`);
  if (d.object) {
    const o = d.object;
    lines.push(`object: ${o.class}`);
    lines.push(o.area_um2 === null ? `area: ${fmt(o.area_px, 0)} px²` : `area: ${fmt(o.area_um2, 1)} µm²`);
    if (o.perimeter_um !== null) lines.push(`perimeter: ${fmt(o.perimeter_um, 1)} µm`);
    if (o.mean_uncertainty !== undefined && o.mean_uncertainty !== null) {
      lines.push(`mean uncertainty: ${fmt(o.mean_uncertainty, 3)}`);
    }
  }
  $('info').textContent = lines.join('\n');
  $('info').className = '';
}

let pending = null;
let busy = false;
async function queryPoint(viewer, pos) {
  const item = viewer.world.getItemAt(0);
  if (!item) return;
  const p = item.viewerElementToImageCoordinates(pos);
  if (busy) { pending = pos; return; }
  busy = true;
  try {
    const r = await fetch(`/api/slide/${encodeURIComponent(sid)}/at?x=${p.x.toFixed(1)}&y=${p.y.toFixed(1)}`);
    if (r.ok) showPoint(await r.json());
  } finally {
    busy = false;
    if (pending) { const q = pending; pending = null; queryPoint(viewer, q); }
  }
}

async function main() {
  const r = await fetch(`/api/slide/${encodeURIComponent(sid)}`);
  if (!r.ok) { $('status').textContent = `cannot load ${sid}: ${r.status}`; return; }
  const info = await r.json();
  document.title = `${info.id} – ldiffusion view`;
  $('title').textContent = `${info.id}`;
  for (const name of Object.keys(LAYERS)) {
    if (params.has(name)) LAYERS[name].on = params.get(name) === '1';
  }
  if (params.has('opacity')) LAYERS.labels.opacity = Number(params.get('opacity'));
  if (params.has('uopacity')) LAYERS.uncertainty.opacity = Number(params.get('uopacity'));
  buildLayerControls(info);
  buildLegend(info);
  const sources = [{tileSource: tileSource(info, 'slide')}];
  for (const name of Object.keys(LAYERS)) {
    if (info.layers.includes(name)) {
      sources.push({tileSource: tileSource(info, name), opacity: LAYERS[name].on ? LAYERS[name].opacity : 0});
    }
  }
  const viewer = OpenSeadragon({
    id: 'osd', prefixUrl: '/static/openseadragon/images/', drawer: 'canvas',
    showNavigator: params.get('navigator') !== '0', navigatorPosition: 'TOP_RIGHT', maxZoomPixelRatio: 8, visibilityRatio: 0.5,
    imageSmoothingEnabled: false, animationTime: 0.4, timeout: 60000,
  });
  window.ldvViewer = viewer;
  viewer.addHandler('tile-loaded', () => {
    state.tiles += 1;
    if (state.firstTileMs === null) {
      state.firstTileMs = performance.now() - state.t0;
      document.body.dataset.firstTileMs = state.firstTileMs.toFixed(0);
    }
    document.body.dataset.tilesLoaded = String(state.tiles);
    $('status').textContent = `${info.width} x ${info.height} px` +
      (info.mpp ? `, ${info.mpp} µm/px` : ', mpp unknown') +
      ` · ${state.tiles} tiles · first tile ${state.firstTileMs.toFixed(0)} ms`;
  });
  viewer.addHandler('tile-load-failed', (e) => {
    document.body.dataset.tilesFailed = String(Number(document.body.dataset.tilesFailed || 0) + 1);
    document.body.dataset.lastFailure = String(e.message);
  });
  viewer.world.addHandler('add-item', (e) => {
    const url = e.item.source.getTileUrl(info.max_level, 0, 0);
    const name = url.split('/')[3];
    state.items[name] = e.item;
    if (LAYERS[name]) setLayer(name);
    if (Object.keys(state.items).length === sources.length) document.body.dataset.ready = '1';
  });
  viewer.addHandler('animation', () => updateScaleBar(viewer, info));
  viewer.addHandler('open', () => updateScaleBar(viewer, info));
  viewer.addHandler('canvas-click', (e) => {
    if (!e.quick) return;
    state.pinned = !state.pinned;
    queryPoint(viewer, e.position);
  });
  new OpenSeadragon.MouseTracker({
    element: viewer.canvas,
    moveHandler: (e) => { if (!state.pinned) queryPoint(viewer, e.position); },
  });
  viewer.open(sources);
}

main();
