// ldiffusion view: `predict` outputs of an image folder, image + class map + uncertainty side by side.
// URL parameter: id=<image id>.
'use strict';

const sid = decodeURIComponent(location.pathname.split('/')[2] || '');
const $ = (id) => document.getElementById(id);
const VIRIDIS = [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]];
let info = null;

function pic(id, kind) {
  return `/picture/${encodeURIComponent(sid)}/${encodeURIComponent(id)}/${kind}.png`;
}

async function show(id) {
  $('pick').value = id;
  history.replaceState(null, '', `?id=${encodeURIComponent(id)}`);
  const hasImage = info.with_images.includes(id);
  $('img-image').src = pic(id, hasImage ? 'image' : 'overlay');
  $('cap-image').textContent = hasImage ? 'Image' : 'Overlay (no --images given)';
  $('img-labels').src = pic(id, 'labels');
  const hasUnc = info.with_uncertainty.includes(id);
  $('img-uncertainty').hidden = !hasUnc;
  if (hasUnc) $('img-uncertainty').src = pic(id, 'uncertainty');
  $('cap-unc').textContent = hasUnc ? 'Uncertainty' : 'Uncertainty (none: predict --uncertainty)';
  $('cbwrap').hidden = !hasUnc;
  const r = await fetch(`/api/images/${encodeURIComponent(sid)}?id=${encodeURIComponent(id)}`);
  const d = await r.json();
  const t = $('legend');
  t.innerHTML = '<tr class="muted"><td></td><td>class</td><td class="num">% of image</td></tr>';
  d.classes.forEach((c, k) => {
    const tr = document.createElement('tr');
    tr.innerHTML = `<td><span class="swatch" style="background:rgb(${c.color.join(',')})"></span></td><td></td>` +
      `<td class="num">${(100 * d.shares[k]).toFixed(1)}</td>`;
    tr.children[1].textContent = c.name;
    t.appendChild(tr);
  });
}

async function main() {
  const r = await fetch(`/api/images/${encodeURIComponent(sid)}`);
  info = await r.json();
  $('title').textContent = `${info.id} (${info.ids.length} images)`;
  for (const id of info.ids) {
    const o = document.createElement('option');
    o.value = id; o.textContent = id; $('pick').appendChild(o);
  }
  const stops = VIRIDIS.map((c, i, a) => `rgb(${c.join(',')}) ${(100 * i / (a.length - 1)).toFixed(1)}%`);
  $('colorbar').style.background = `linear-gradient(to right, ${stops.join(',')})`;
  $('pick').addEventListener('change', (e) => show(e.target.value));
  const step = (k) => {
    const i = info.ids.indexOf($('pick').value);
    show(info.ids[(i + k + info.ids.length) % info.ids.length]);
  };
  $('prev').addEventListener('click', () => step(-1));
  $('next').addEventListener('click', () => step(1));
  const want = new URLSearchParams(location.search).get('id');
  show(info.ids.includes(want) ? want : info.ids[0]);
}

main();
