// loupe feature browser: reads the repo's parquet files straight from a static host (a local
// server or the Hugging Face Hub) with HTTP Range requests, fetching only the pages of the
// feature shown (the files are sorted by feature, one row group per 1,024 features, with a
// page index that locates each feature's pages of 64 rows).
import { asyncBufferFromUrl, parquetMetadataAsync, parquetReadObjects } from 'hyparquet'
import { compressors } from 'hyparquet-compressors'

// Bytes and requests per URL and what the page shows: for tests and for the curious (devtools).
const fetched = {}
const requests = {}
const state = { status: 'loading' }
window.loupeFetched = fetched
window.loupeRequests = requests
window.loupeState = state

// First guess of the footer size: one request usually gets the whole footer, a second one
// (made by hyparquet) when a file has many row groups.
const FOOTER_GUESS = 1 << 16
const EXAMPLE_COLUMNS = ['feature', 'activation', 'token', 'context_tokens', 'token_activations', 'rank', 'peak_index']
const INTERVAL_COLUMNS = [...EXAMPLE_COLUMNS, 'interval', 'interval_low', 'interval_high']
const NEIGHBOUR_COLUMNS = ['feature', 'relation', 'rank', 'other_layer', 'other_feature', 'cosine']
const TRACE_COLUMNS = { examples: ['feature', 'token', 'rank'], logits: ['feature', 'sign', 'rank', 'token'] }
const TRACE_TOKENS = 5 // top tokens and top logits shown per step of a trace
// The explain stage's columns the page shows (loupe.explain.explanations_schema).
const EXPLANATION_COLUMNS = ['feature', 'explanation', 'detection', 'fuzzing', 'explainer', 'status']
const SEARCH_LIMIT = 200
// Range requests in flight at once, whatever the page asks for: Chromium refuses thousands
// (net::ERR_INSUFFICIENT_RESOURCES) and a host serves a few at a time anyway.
const MAX_IN_FLIGHT = 6

const $ = id => document.getElementById(id)
const params = new URLSearchParams(location.search)
const base = baseUrl(params)
let suite = null
// The latest request of each kind wins, older ones drop their results: the feature view
// (and its trace) and the side panel (searches, listings) each have their own, so a search
// still reading goes on while features are shown, and the other way round.
const tickets = { view: 0, panel: 0 }

/** The repo root: ?base=URL, ?repo=owner/name[&revision=main] on the Hub, else the repo the
 * page names in <meta name="loupe-repo"> (a Space's copy does), else ../ of this page. */
function baseUrl(params) {
  const slash = url => (url.endsWith('/') ? url : `${url}/`)
  const meta = name => document.querySelector(`meta[name="${name}"]`)?.content
  if (params.get('base')) return slash(new URL(params.get('base'), location.href).href)
  const repo = params.get('repo') || meta('loupe-repo')
  if (repo) {
    const revision = encodeURIComponent(params.get('revision') || meta('loupe-revision') || 'main')
    return `https://huggingface.co/${repo.replace(/^\/+|\/+$/g, '')}/resolve/${revision}/`
  }
  return new URL('../', location.href).href
}

function count(url, bytes) {
  fetched[url] = (fetched[url] || 0) + bytes
  requests[url] = (requests[url] || 0) + 1
}

// The queue of requests beyond MAX_IN_FLIGHT, started in order as others finish.
const waiting = []
let inFlight = 0
state.maxInFlight = 0

/** fetch() for hyparquet's asyncBufferFromUrl: at most MAX_IN_FLIGHT at a time (hyparquet
 * has no such bound), each body read whole inside its slot and counted. */
async function limitedFetch(url, init) {
  if (inFlight >= MAX_IN_FLIGHT) await new Promise(resolve => waiting.push(resolve))
  inFlight += 1
  state.maxInFlight = Math.max(state.maxInFlight, inFlight)
  try {
    const res = await fetch(url, init)
    // A failed range read names its file (hyparquet's own message does not).
    if (!res.ok && init?.method !== 'HEAD') throw new Error(`${url}: HTTP ${res.status}`)
    const body = res.ok ? await res.arrayBuffer() : null
    if (body) count(url, body.byteLength)
    return new Response(body, { status: res.status, statusText: res.statusText, headers: res.headers })
  } finally {
    inFlight -= 1
    waiting.shift()?.()
  }
}

/** An AsyncBuffer that keeps every range it fetched and answers any slice inside one of them
 * (the footer guess often holds the page indexes, or a small file whole).
 * Not hyparquet's cachedAsyncBuffer: it answers only a range asked for before, byte for byte,
 * so each page index inside the footer's first read costs a request of its own (9 requests to
 * one file in the trace test, which allows 5), and under its minSize it fetches a file whole. */
function keptRanges(file) {
  const segments = [] // [start, end, Promise<ArrayBuffer>]: ranges fetched or in flight
  return {
    byteLength: file.byteLength,
    slice(start, end = file.byteLength) {
      for (const [s, e, p] of segments) {
        if (s <= start && end <= e) return p.then(buf => buf.slice(start - s, end - s))
      }
      const segment = [start, end, Promise.resolve(file.slice(start, end))]
      segments.push(segment)
      segment[2].catch(() => segments.splice(segments.indexOf(segment), 1))
      return segment[2]
    },
  }
}

const opened = new Map()

/** {url, file, metadata} of a repo path, the footer read once per file. The file is hyparquet's
 * asyncBufferFromUrl over limitedFetch (suite.json's size spares its HEAD request; a host that
 * ignores Range sends the file once, which it keeps) under keptRanges. */
function openParquet(path) {
  if (!opened.has(path)) {
    const url = new URL(path, base).href
    const load = async byteLength => {
      const remote = await asyncBufferFromUrl({ url, byteLength, fetch: limitedFetch })
      const file = keptRanges(remote)
      const metadata = await parquetMetadataAsync(file, { initialFetchSize: Math.min(FOOTER_GUESS, remote.byteLength) })
      return { url, file, metadata }
    }
    const promise = (async () => {
      const listed = suite.bytes?.[path]
      if (listed === undefined) return load()
      // A file replaced since staging has another size: ask the host (a HEAD request).
      return load(listed).catch(() => load())
    })()
    promise.catch(() => opened.delete(path)) // let a retry fetch again
    opened.set(path, promise)
  }
  return opened.get(path)
}

function plain(row) {
  for (const [k, v] of Object.entries(row)) if (typeof v === 'bigint') row[k] = Number(v)
  return row
}

/** The rows of feature f in a repo file; null if absent. hyparquet skips the row groups whose
 * `feature` statistics rule f out and, in the others, reads the column index of `feature` and
 * the offset indexes to fetch only the pages that hold f. */
async function featureRows(path, f, columns) {
  if (!path) return null
  const { file, metadata } = await openParquet(path)
  const names = new Set(metadata.schema.map(s => s.name))
  columns = columns?.filter(c => names.has(c))
  const rows = await parquetReadObjects({ file, metadata, columns, filter: { feature: { $eq: f } }, filterStrict: false, usePageIndex: true, compressors })
  // Not strict: an int64 column reads as BigInt, f is a Number.
  return rows.filter(row => Number(row.feature) === f).map(plain)
}

async function fileMetadataJson(path) {
  const { metadata } = await openParquet(path)
  const kv = metadata.key_value_metadata?.find(e => e.key === 'loupe')
  try {
    return kv ? JSON.parse(kv.value) : {}
  } catch {
    return {}
  }
}

// ---------- rendering ----------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag)
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue
    if (k === 'class') node.className = v
    else if (k.startsWith('data-')) node.setAttribute(k, v)
    else node[k] = v
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c)
  return node
}

const fmt = x => (Number.isFinite(x) ? x.toFixed(3) : String(x))

function fmtDensity(d) {
  if (!Number.isFinite(d)) return '–'
  if (d === 0) return '0 (dead)'
  return `${(d * 100).toPrecision(3)}%`
}

// Token text made readable: whitespace shown by markers, control characters escaped,
// U+FFFD (a partial UTF-8 sequence the tokenizer split) flagged.
const MARKS = { '\n': '↵', '\r': '␍', '\t': '→' }

/** Spans for a token's text; `spaces` marks spaces too (tokens shown alone). */
function tokenText(tok, spaces) {
  const out = []
  let plainRun = ''
  const flush = () => {
    if (plainRun) out.push(plainRun)
    plainRun = ''
  }
  for (const ch of tok) {
    if (MARKS[ch] || (spaces && ch === ' ')) {
      flush()
      out.push(el('span', { class: 'ws', title: JSON.stringify(ch) }, MARKS[ch] || '␣'))
    } else if (ch === '\ufffd') {
      flush()
      out.push(el('span', { class: 'partial', title: 'part of a multi-byte character (U+FFFD)' }, '\ufffd'))
    } else if (ch.codePointAt(0) < 0x20 || ch.codePointAt(0) === 0x7f) {
      flush()
      out.push(el('span', { class: 'ws' }, `\\x${ch.codePointAt(0).toString(16).padStart(2, '0')}`))
    } else {
      plainRun += ch
    }
  }
  flush()
  if (!out.length) out.push(el('span', { class: 'ws', title: 'empty token' }, '∅'))
  return out
}

function chip(tok, extra = {}) {
  return el('span', { class: 'chip', 'data-token': tok, title: JSON.stringify(tok), ...extra }, ...tokenText(tok, true))
}

function parseList(text) {
  try {
    return JSON.parse(text)
  } catch {
    // Non-finite floats are not JSON.
    return JSON.parse(text.replace(/-?\b(nan|inf|infinity)\b/gi, 'null'))
  }
}

function shade(act, scale) {
  const a = scale > 0 ? Math.max(0, Math.min(1, act / scale)) : 0
  return a > 0 ? `rgba(255, 120, 0, ${(0.08 + 0.8 * a).toFixed(3)})` : ''
}

function exampleRow(row, scale) {
  const tokens = parseList(row.context_tokens)
  const acts = parseList(row.token_activations)
  const line = el('div', { class: 'context' })
  tokens.forEach((tok, i) => {
    const act = acts[i] ?? 0
    const peak = i === row.peak_index
    const span = el('span', {
      class: peak ? 'tok peak' : 'tok',
      title: `${JSON.stringify(tok)}  activation ${fmt(act)}${peak ? ' (peak)' : ''}`,
      'data-act': act,
    }, ...tokenText(tok, false))
    const bg = shade(act, scale)
    if (bg) span.style.background = bg
    line.append(span)
  })
  return el('div', { class: 'example', 'data-rank': row.rank },
    el('span', { class: 'act', title: `rank ${row.rank}` }, fmt(row.activation)), line)
}

/** [low, high) of each histogram column. Edges either bound every column (bins + 1 edges) or
 * sit between columns, the first and last open-ended (bins - 1 edges: an underflow column
 * from 0 and an overflow column to infinity). */
function binBounds(n, edges) {
  if (edges?.length === n + 1) return Array.from({ length: n }, (_, i) => [edges[i], edges[i + 1]])
  if (edges?.length === n - 1) return Array.from({ length: n }, (_, i) => [i ? edges[i - 1] : 0, i < n - 1 ? edges[i] : Infinity])
  return null
}

const fmtEdge = x => {
  if (!Number.isFinite(x)) return '∞'
  const a = Math.abs(x)
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : String(Number(x.toPrecision(3)))
}

/** Up to `most` values of 0..n, evenly spread, both ends included. */
function spread(n, most) {
  return [...new Set(Array.from({ length: most }, (_, i) => Math.round((i * n) / (most - 1))))]
}

/** The activation histogram of a feature: a column per bin on a log count scale, with tick
 * values on both axes (activation at bin edges, counts at 0, powers of ten and the maximum). */
function histogramSvg(counts, edges) {
  // Only the columns from the first to the last nonzero one: a fixed grid spans decades
  // that one feature never reaches.
  const first = counts.findIndex(c => c > 0)
  const last = counts.length - 1 - [...counts].reverse().findIndex(c => c > 0)
  const bounds = binBounds(counts.length, edges)?.slice(first, last + 1)
  counts = counts.slice(first, last + 1)
  const ns = 'http://www.w3.org/2000/svg'
  const w = 420, h = 110, n = counts.length
  const left = 46, right = 14, top = 6, bottom = 30 // room for the tick values and axis titles
  const svg = document.createElementNS(ns, 'svg')
  svg.setAttribute('viewBox', `0 0 ${left + w + right} ${top + h + bottom}`)
  svg.setAttribute('width', left + w + right)
  svg.setAttribute('role', 'img')
  const node = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag)
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v)
    if (text !== undefined) e.textContent = text
    svg.append(e)
    return e
  }
  const most = Math.max(...counts, 1)
  const scale = Math.log1p(most)
  const y = c => top + h - (h * Math.log1p(c)) / scale
  counts.forEach((c, i) => {
    const bh = c ? Math.max(1, (h * Math.log1p(c)) / scale) : 0
    const r = node('rect', { x: left + (i * w) / n, width: Math.max(1, w / n - 1), y: top + h - bh, height: bh })
    const range = bounds ? `[${fmtEdge(bounds[i][0])}, ${fmtEdge(bounds[i][1])})` : `bin ${first + i}`
    r.append(document.createElementNS(ns, 'title'))
    r.lastChild.textContent = `${range}: ${c}`
  })
  node('line', { class: 'axis', x1: left, x2: left + w, y1: top + h, y2: top + h })
  node('line', { class: 'axis', x1: left, x2: left, y1: top, y2: top + h })
  // Activation at the column edges (bin numbers where the file has no edges).
  for (const k of spread(n, 5)) {
    const value = bounds ? (k < n ? bounds[k][0] : bounds[n - 1][1]) : first + k
    const anchor = k === 0 ? 'start' : k === n ? 'end' : 'middle'
    node('text', { class: 'x-tick', x: left + (k * w) / n, y: top + h + 11, 'text-anchor': anchor, 'data-value': value }, bounds ? fmtEdge(value) : String(value))
  }
  node('text', { class: 'axis-title', x: left + w / 2, y: top + h + 25, 'text-anchor': 'middle' }, bounds ? 'activation' : 'histogram bin')
  // Counts: 0, the powers of ten clear of the maximum, the maximum.
  const ticks = [0]
  for (let p = 1; Math.log1p(p) / scale < 0.85; p *= 10) ticks.push(p)
  ticks.push(most)
  for (const c of ticks) {
    node('text', { class: 'y-tick', x: left - 4, y: y(c) + 3, 'text-anchor': 'end', 'data-value': c }, c.toLocaleString('en-US'))
  }
  node('text', { class: 'axis-title', x: 10, y: top + h / 2, 'text-anchor': 'middle', transform: `rotate(-90 10 ${top + h / 2})` }, 'count (log)')
  return svg
}

function setStatus(text, status) {
  $('status').textContent = text
  if (status) {
    state.status = status
    document.body.dataset.status = status
  }
}

function fail(err) {
  console.error(err)
  state.error = String(err?.message || err)
  setStatus(`error: ${state.error}`, 'error')
}

// ---------- feature view ----------

function layerFiles(layer) {
  return suite.files[String(layer)] || {}
}

/** A feature id from what was typed or linked: a whole number, else NaN. */
const featureId = text => (/^\s*\d+\s*$/.test(String(text)) ? Number(text) : Number.NaN)

/** Say that `typed` names no feature, and which ids do, instead of showing one. */
function showNoFeature(layer, typed) {
  tickets.view += 1 // drops a view still loading
  const range = `layer ${layer} has features 0 to ${suite.num_latents - 1}`
  const message = Number.isNaN(featureId(typed))
    ? `${JSON.stringify(String(typed).trim())} is not a feature id: ${range}`
    : `no feature ${featureId(typed)}: ${range}`
  $('title').textContent = `Layer ${layer} · no such feature`
  $('notice').textContent = message
  $('notice').hidden = false
  $('feature-view').hidden = true
  Object.assign(state, { layer, feature: null, error: null, invalid: message, trace: null })
  setStatus(message, 'invalid')
}

/** Show feature f of the layer; `typed` (what the user gave, for the message) where f is no
 * feature of the suite. */
async function showFeature(layer, f, typed = String(f)) {
  $('layer').value = String(layer)
  if (!(Number.isInteger(f) && f >= 0 && f < suite.num_latents)) return showNoFeature(layer, typed)
  const mine = ++tickets.view
  $('feature').value = String(f)
  $('notice').hidden = true
  $('feature-view').hidden = false
  state.invalid = null
  const url = new URL(location.href)
  url.searchParams.set('layer', layer)
  url.searchParams.set('feature', f)
  url.searchParams.delete('trace')
  history.replaceState(null, '', url)
  setStatus(`loading layer ${layer} feature ${f}…`, 'loading')
  Object.assign(state, { layer, feature: f, error: null, trace: null })
  const files = layerFiles(layer)
  const [stats, examples, intervals, logits, statsMeta, neighbours, explained] = await Promise.all([
    featureRows(files.stats, f),
    featureRows(files.examples, f, EXAMPLE_COLUMNS),
    featureRows(files.intervals, f, INTERVAL_COLUMNS),
    featureRows(files.logits, f),
    files.stats ? fileMetadataJson(files.stats) : {},
    featureRows(files.neighbours, f, NEIGHBOUR_COLUMNS),
    layerExplanations(layer),
  ])
  const neighbourTexts = await explanations((neighbours || []).map(r => [r.other_layer, r.other_feature]))
  if (mine !== tickets.view) return
  render(layer, f, stats?.[0] ?? null, examples, intervals, logits, statsMeta)
  renderExplanation(f, explained)
  renderNeighbours(layer, neighbours, neighbourTexts)
  setStatus(`layer ${layer} feature ${f} · ${base}`, 'ready')
}

function render(layer, f, stats, examples, intervals, logits, statsMeta) {
  $('title').textContent = `Layer ${layer} · feature ${f}`
  examples = (examples || []).sort((a, b) => a.rank - b.rank)
  const top = examples[0]
  const scale = Math.max(stats?.max_activation || 0, top?.activation || 0)

  const summary = $('summary')
  summary.replaceChildren()
  // Each label's tooltip is its column's description, as the parquet file's schema holds it
  // (suite.json's `columns`, read from the staged files: one source for the card and the page).
  const item = (label, value, id, [kind, column] = []) => {
    const title = suite.columns?.[kind]?.[column]
    summary.append(el('dt', title ? { title } : {}, label), el('dd', { id }, value))
  }
  item('top activation', top ? fmt(top.activation) : '–', 'top-activation', ['examples', 'activation'])
  item('top token', top ? chip(top.token) : '–', 'top-token', ['examples', 'token'])
  if (stats) {
    item('density', fmtDensity(stats.density), 'density', ['stats', 'density'])
    item(
      'fires on',
      `${stats.fire_count.toLocaleString()} of ${stats.tokens.toLocaleString()} tokens`,
      'fire-count',
      ['stats', 'fire_count'],
    )
    item('mean activation', fmt(stats.mean_activation), 'mean-activation', ['stats', 'mean_activation'])
  } else {
    item('density', 'no feature_stats file for this layer', 'density')
  }

  const hist = $('histogram')
  hist.replaceChildren()
  const counts = Array.from(stats?.histogram || [], Number)
  if (counts.some(c => c > 0)) {
    hist.append(histogramSvg(counts, statsMeta.histogram_edges), el('figcaption', {}, 'activation histogram: tokens per activation bin, log count scale'))
  } else {
    hist.append(el('figcaption', { class: 'muted' }, stats?.histogram ? 'histogram: no activations' : 'no histogram published'))
  }

  const sides = { positive: [], negative: [] }
  for (const row of (logits || []).sort((a, b) => a.rank - b.rank)) sides[row.sign]?.push(row)
  for (const [sign, rows] of Object.entries(sides)) {
    const list = $(`logits-${sign}`)
    list.replaceChildren(...rows.map(r => el('li', {}, chip(r.token), el('span', { class: 'val' }, fmt(r.value)))))
    if (!rows.length) list.append(el('li', { class: 'muted' }, logits ? 'none' : 'not published'))
  }

  const freq = new Map()
  for (const r of examples) freq.set(r.token, (freq.get(r.token) || 0) + 1)
  const common = [...freq].sort((a, b) => b[1] - a[1]).slice(0, 10)
  $('peak-tokens').replaceChildren(...common.map(([t, n]) => el('li', {}, chip(t), el('span', { class: 'val' }, `×${n}`))))

  $('examples').replaceChildren(...examples.map(r => exampleRow(r, scale)))
  if (!examples.length) $('examples').append(el('p', { class: 'muted' }, 'no examples: the feature never fired'))

  const bins = new Map()
  for (const r of intervals || []) {
    if (!bins.has(r.interval)) bins.set(r.interval, [])
    bins.get(r.interval).push(r)
  }
  // Strongest interval first, whichever way the writer numbers them.
  const peak = rows => Math.max(...rows.map(r => r.activation))
  const blocks = [...bins].sort((a, b) => peak(b[1]) - peak(a[1])).map(([bin, rows]) => {
    const r = rows[0]
    const bounds = r.interval_low !== undefined ? ` · activation ${fmt(r.interval_low)} to ${fmt(r.interval_high)}` : ''
    return el('details', { open: true, 'data-interval': bin },
      el('summary', {}, `interval ${bin}${bounds} · ${rows.length} examples`),
      ...rows.map(row => exampleRow(row, scale)))
  })
  $('intervals').replaceChildren(...blocks)
  if (!blocks.length) {
    const why = intervals ? 'no interval examples for this feature' : 'no interval examples published for this layer'
    $('intervals').append(el('p', { class: 'muted' }, why))
  }

  Object.assign(state, {
    layer,
    feature: f,
    topActivation: top ? top.activation : null,
    topToken: top ? top.token : null,
    examples: examples.length,
    intervals: (intervals || []).length,
    density: stats ? stats.density : null,
    logits: { positive: sides.positive.map(r => r.token), negative: sides.negative.map(r => r.token) },
  })
}

// ---------- neighbours and the trace through the stack ----------

const RELATION_TITLES = {
  prev: layer => `Previous layer (${layer - 1})`,
  same: layer => `Same layer (${layer})`,
  next: layer => `Next layer (${layer + 1})`,
}

/** A link to a feature of the suite (plain text when the suite lacks its layer). */
function featureLink(layer, f, text) {
  if (!suite.layers.includes(layer)) return el('span', { title: `layer ${layer} is not in this repo` }, text)
  const url = new URL(location.href)
  url.searchParams.set('layer', layer)
  url.searchParams.set('feature', f)
  url.searchParams.delete('trace')
  const link = el('a', { href: url.href, 'data-layer': layer, 'data-feature': f }, text)
  link.addEventListener('click', e => {
    if (e.button !== 0 || e.ctrlKey || e.metaKey || e.shiftKey) return // a new tab keeps the href
    e.preventDefault()
    showFeature(layer, f).catch(fail)
  })
  return link
}

const layerReads = new Map()

/** The promise of `read({file, metadata})` over the layer's file of `kind`, made once per layer
 * and kind (again after a failure); null where the layer has no such file. */
function readLayerOnce(layer, kind, read) {
  const path = layerFiles(layer)[kind]
  if (!path) return Promise.resolve(null)
  const key = `${kind}:${layer}`
  if (!layerReads.has(key)) {
    const promise = openParquet(path).then(read)
    promise.catch(() => layerReads.delete(key))
    layerReads.set(key, promise)
  }
  return layerReads.get(key)
}

/** Map feature -> {explanation, detection, fuzzing, explainer, status} of a layer's features
 * that have an explanation; null where the layer has no explanations file. A layer's file is
 * small (a line of text and two scores per feature), so it is read whole, once. */
function layerExplanations(layer) {
  return readLayerOnce(layer, 'explanations', async ({ file, metadata }) => {
    const names = new Set(metadata.schema.map(s => s.name))
    const columns = EXPLANATION_COLUMNS.filter(c => names.has(c))
    const rows = await parquetReadObjects({ file, metadata, columns, compressors })
    // Failed and unparsed requests are rows without an explanation: nothing to show.
    return new Map(rows.filter(r => r.explanation).map(r => [Number(r.feature), plain(r)]))
  })
}

/** {"layer:feature": text} of the given features that have an explanation (nothing fetched
 * for layers without an explanations file). */
async function explanations(features) {
  const layers = [...new Set(features.map(([layer]) => layer))]
  const byLayer = new Map(await Promise.all(layers.map(async layer => [layer, await layerExplanations(layer)])))
  const found = {}
  for (const [layer, f] of features) {
    const text = byLayer.get(layer)?.get(f)?.explanation
    if (text) found[`${layer}:${f}`] = text
  }
  return found
}

const fmtScore = x => (x === null || x === undefined ? 'not scored' : fmt(x))

/** The feature's explanation and its detection and fuzzing scores; the block stays hidden where
 * the layer has no explanations file. */
function renderExplanation(f, explained) {
  const row = explained?.get(f) ?? null
  const box = $('explanation')
  box.hidden = explained === null
  state.explanation = row && { text: row.explanation, detection: row.detection ?? null, fuzzing: row.fuzzing ?? null, explainer: row.explainer ?? null }
  if (!explained) return
  if (!row) {
    box.replaceChildren(el('p', { class: 'muted' }, 'no explanation for this feature (not chosen for explaining, or its request failed)'))
    return
  }
  const score = (label, id, value, title) => el('span', { class: 'score', title }, `${label} `, el('span', { id, class: 'val' }, fmtScore(value)))
  box.replaceChildren(
    el('p', { id: 'explanation-text', class: 'explanation' }, row.explanation),
    el('p', { class: 'scores' },
      score('detection', 'detection-score', row.detection, 'accuracy of the explainer model telling held-out activating examples from inactive windows by the explanation (delphi)'),
      score('fuzzing', 'fuzzing-score', row.fuzzing, 'accuracy of the explainer model telling rightly highlighted examples from wrongly highlighted ones by the explanation (delphi)'),
      row.explainer ? el('span', { class: 'muted' }, `explained by ${row.explainer}`) : null))
}

/** Rows of one relation, best first. */
const related = (rows, relation) => (rows || []).filter(r => r.relation === relation).sort((a, b) => a.rank - b.rank)

function renderNeighbours(layer, rows, explained) {
  const published = rows !== null
  $('trace-button').disabled = !published
  $('trace').replaceChildren()
  state.neighbours = {}
  state.explanations = explained
  const explanation = (l, g) => (explained[`${l}:${g}`] ? el('span', { class: 'explanation' }, explained[`${l}:${g}`]) : null)
  for (const relation of Object.keys(RELATION_TITLES)) {
    const found = related(rows, relation)
    state.neighbours[relation] = found.map(r => [r.other_layer, r.other_feature, r.cosine])
    const list = $(`neighbours-${relation}`)
    list.previousElementSibling.textContent = RELATION_TITLES[relation](layer)
    list.replaceChildren(...found.map(r => el('li', { 'data-rank': r.rank },
      featureLink(r.other_layer, r.other_feature, `L${r.other_layer} · feature ${r.other_feature}`),
      el('span', { class: 'val', title: 'cosine of the decoder directions' }, fmt(r.cosine)),
      explanation(r.other_layer, r.other_feature))))
    if (!found.length) {
      const why = !published ? 'no feature_neighbours file for this layer'
        : relation === 'same' ? 'none' : 'no SAE of that layer in the suite'
      list.append(el('li', { class: 'muted' }, why))
    }
  }
}

/** The chain of rank-0 matches from (layer, f) in one direction ('next' or 'prev'): each
 * step {layer, feature, cosine}, reading one row group of each layer's neighbours file. */
async function followMatches(layer, f, relation) {
  const steps = []
  const step = relation === 'next' ? 1 : -1
  for (;;) {
    const rows = await featureRows(layerFiles(layer).neighbours, f, NEIGHBOUR_COLUMNS)
    const best = related(rows, relation)[0]
    // The stack ends, or the suite lacks the layer: the chain stops there.
    if (!best || best.other_layer !== layer + step || !suite.layers.includes(best.other_layer)) return steps
    layer = best.other_layer
    f = best.other_feature
    steps.push({ layer, feature: f, cosine: best.cosine })
  }
}

/** The most frequent peak tokens of a feature's top examples and its top promoted tokens. */
async function traceTokens(layer, f) {
  const files = layerFiles(layer)
  const [examples, logits] = await Promise.all([
    featureRows(files.examples, f, TRACE_COLUMNS.examples),
    featureRows(files.logits, f, TRACE_COLUMNS.logits),
  ])
  const freq = new Map()
  for (const r of (examples || []).sort((a, b) => a.rank - b.rank)) freq.set(r.token, (freq.get(r.token) || 0) + 1)
  const tokens = [...freq].sort((a, b) => b[1] - a[1]).slice(0, TRACE_TOKENS).map(([t]) => t)
  const promoted = (logits || []).filter(r => r.sign === 'positive').sort((a, b) => a.rank - b.rank)
  return { tokens, logits: promoted.slice(0, TRACE_TOKENS).map(r => r.token) }
}

/** Follow the best match of the shown feature through every layer, down and up, and show
 * each step's top tokens and top logits: a few row groups per layer. */
async function trace() {
  const mine = tickets.view // showing another feature drops this trace
  const { layer, feature } = state
  setStatus(`tracing layer ${layer} feature ${feature} through the stack…`, 'loading')
  const [down, up] = await Promise.all([followMatches(layer, feature, 'prev'), followMatches(layer, feature, 'next')])
  // Earliest layer first; each step's cosine is that of its match with the step it came from.
  const steps = [...down.reverse(), { layer, feature, cosine: null }, ...up]
  const [tokens, explained] = await Promise.all([
    Promise.all(steps.map(s => traceTokens(s.layer, s.feature))),
    explanations(steps.map(s => [s.layer, s.feature])),
  ])
  if (mine !== tickets.view) return
  for (const [i, s] of steps.entries()) Object.assign(s, tokens[i], { explanation: explained[`${s.layer}:${s.feature}`] ?? null })
  const hasExplanations = steps.some(s => s.explanation)
  const chips = list => el('span', { class: 'chips' }, ...list.map(t => chip(t)))
  $('trace').replaceChildren(el('table', {},
    el('thead', {}, el('tr', {}, ...['layer', 'feature', 'match cosine', 'top tokens', 'top logits', ...(hasExplanations ? ['explanation'] : [])].map(h => el('th', {}, h)))),
    el('tbody', {}, ...steps.map(s => el('tr', { class: s.cosine === null ? 'here' : null, 'data-layer': s.layer, 'data-feature': s.feature },
      el('td', {}, String(s.layer)),
      el('td', {}, featureLink(s.layer, s.feature, String(s.feature))),
      el('td', { class: 'val', title: s.cosine === null ? 'the feature shown' : 'decoder cosine with the row it was matched from' }, s.cosine === null ? '–' : fmt(s.cosine)),
      el('td', { class: 'trace-tokens' }, chips(s.tokens)),
      el('td', { class: 'trace-logits' }, chips(s.logits)),
      hasExplanations ? el('td', { class: 'explanation' }, s.explanation ?? '') : null)))))
  state.trace = { layer, feature, steps }
  setStatus(`trace of layer ${layer} feature ${feature}: ${steps.length} layers · ${base}`, 'ready')
}

// ---------- token search ----------

const searchIndex = new Map()
const SEARCH_GROUPS_AT_ONCE = 3 // row groups read at once by a search (each a few requests)

/** Every (feature, token[, sign]) of a layer's top examples and logits: those columns only,
 * row group by row group, a few at a time; `progress(done, total)` after each. */
function layerIndex(layer, progress) {
  if (!searchIndex.has(layer)) {
    const files = layerFiles(layer)
    const promise = (async () => {
      const opened = await Promise.all([files.examples, files.logits].map(path => (path ? openParquet(path) : null)))
      const jobs = [] // [file index, rowStart, rowEnd]
      opened.forEach((o, i) => {
        let start = 0
        for (const group of o?.metadata.row_groups ?? []) {
          const rows = Number(group.num_rows)
          if (rows) jobs.push([i, start, start + rows])
          start += rows
        }
      })
      const found = [[], []]
      let done = 0
      let next = 0
      const worker = async () => {
        while (next < jobs.length) {
          const [i, rowStart, rowEnd] = jobs[next++]
          const { file, metadata } = opened[i]
          const columns = i === 0 ? ['feature', 'token'] : ['feature', 'sign', 'token']
          found[i].push(...(await parquetReadObjects({ file, metadata, columns, rowStart, rowEnd, compressors })))
          progress?.(++done, jobs.length)
        }
      }
      await Promise.all(Array.from({ length: SEARCH_GROUPS_AT_ONCE }, worker))
      return found
    })()
    promise.catch(() => searchIndex.delete(layer))
    searchIndex.set(layer, promise)
  }
  return searchIndex.get(layer)
}

const mb = bytes => `${(bytes / 1e6).toFixed(1)} MB`
const totalFetched = () => Object.values(fetched).reduce((a, b) => a + b, 0)

const norm = s => s.trim().toLowerCase()

async function search(query) {
  const q = norm(query)
  if (!q) return
  const layer = Number($('layer').value)
  const mine = ++tickets.panel
  const before = totalFetched()
  const saying = text => mine === tickets.panel && setStatus(text, 'loading')
  saying(`searching layer ${layer} for ${JSON.stringify(query)}: reading the token columns…`)
  const [examples, logits] = await layerIndex(layer, (done, total) => {
    state.searchProgress = { done, total }
    saying(`searching layer ${layer} for ${JSON.stringify(query)}: read ${done} of ${total} row groups of the token columns (${mb(totalFetched() - before)})`)
  })
  if (mine !== tickets.panel) return
  // Exact matches (ignoring case and surrounding whitespace) if any, else substrings.
  const tally = exact => {
    const hits = new Map()
    const add = (row, key) => {
      const t = norm(row.token)
      if (exact ? t !== q : !t.includes(q)) return
      const f = Number(row.feature)
      if (!hits.has(f)) hits.set(f, { feature: f, examples: 0, positive: 0, negative: 0 })
      hits.get(f)[key] += 1
    }
    for (const row of examples) add(row, 'examples')
    for (const row of logits) add(row, row.sign === 'negative' ? 'negative' : 'positive')
    return [...hits.values()]
  }
  let hits = tally(true)
  const exact = hits.length > 0
  if (!exact) hits = tally(false)
  hits.sort((a, b) => b.examples - a.examples || b.positive - a.positive || b.negative - a.negative || a.feature - b.feature)
  state.search = { query, layer, by: 'token', exact, features: hits.map(h => h.feature) }
  state.list = null
  showResults(`${hits.length} features ${exact ? 'with' : 'containing'} ${JSON.stringify(query)} · layer ${layer}`,
    hits.slice(0, SEARCH_LIMIT).map(h => {
      const parts = []
      if (h.examples) parts.push(`${h.examples} top example${h.examples === 1 ? '' : 's'}`)
      if (h.positive) parts.push(`${h.positive} promoted`)
      if (h.negative) parts.push(`${h.negative} suppressed`)
      return el('li', {}, featureLink(layer, h.feature, `feature ${h.feature}`), el('span', { class: 'muted' }, ` ${parts.join(', ')}`))
    }))
  setStatus(`search done: ${hits.length} features`, 'ready')
}

/** The side panel with a heading note and a list of items (each led by a feature link). */
function showResults(note, items) {
  $('results').hidden = false
  $('pager').hidden = true
  $('results-note').textContent = note
  $('result-list').replaceChildren(...items)
}

/** The mean of a row's detection and fuzzing scores (those it has), or null. */
function meanScore(row) {
  const scores = [row.detection, row.fuzzing].filter(x => x !== null && x !== undefined)
  return scores.length ? scores.reduce((a, b) => a + b) / scores.length : null
}

/** Features of the layer whose explanation holds every word of the query (ignoring case),
 * best scored first, each a link with its explanation and scores. */
async function searchExplanations(query) {
  const words = norm(query).split(/\s+/).filter(Boolean)
  if (!words.length) return
  const layer = Number($('layer').value)
  const mine = ++tickets.panel
  setStatus(`searching the explanations of layer ${layer} for ${JSON.stringify(query)}…`, 'loading')
  const explained = await layerExplanations(layer)
  if (mine !== tickets.panel) return
  const hits = [...(explained?.values() ?? [])]
    .filter(r => words.every(w => r.explanation.toLowerCase().includes(w)))
    .map(r => ({ row: r, feature: Number(r.feature), score: meanScore(r) }))
    .sort((a, b) => (b.score ?? -1) - (a.score ?? -1) || a.feature - b.feature)
  state.search = { query, layer, by: 'explanation', features: hits.map(h => h.feature) }
  state.list = null
  const note = explained
    ? `${hits.length} features explained with ${JSON.stringify(query)} · layer ${layer}`
    : `layer ${layer} has no explanations`
  showResults(note, hits.slice(0, SEARCH_LIMIT).map(({ row, feature }) => el('li', {},
    featureLink(layer, feature, `feature ${feature}`),
    el('span', { class: 'val muted', title: 'detection / fuzzing score' }, ` ${fmtScore(row.detection)} / ${fmtScore(row.fuzzing)}`),
    el('span', { class: 'explanation' }, row.explanation))))
  setStatus(`search done: ${hits.length} features`, 'ready')
}

// ---------- a layer's features, listed and sorted ----------

// What a layer's features can be sorted by: feature_stats' columns, and the explanations'
// scores where the layer has them; each with how its values are shown.
const LISTS = {
  density: { label: 'density', show: fmtDensity },
  max_activation: { label: 'max activation', show: fmt },
  detection: { label: 'detection score', show: fmtScore, explained: true },
  fuzzing: { label: 'fuzzing score', show: fmtScore, explained: true },
}
const STATS_COLUMNS = ['feature', 'density', 'max_activation']
const LIST_PAGE = 100 // features per page of a listing

/** feature_stats' STATS_COLUMNS of every feature of a layer (those columns only, read once);
 * null where the layer has no stats file. */
function layerStats(layer) {
  return readLayerOnce(layer, 'stats', async ({ file, metadata }) =>
    (await parquetReadObjects({ file, metadata, columns: STATS_COLUMNS, compressors })).map(plain))
}

/** The layer's features sorted by `by` (a key of LISTS), `order` 'desc' or 'asc', features
 * without a value last and ties by feature id; page `page` (from 1) of LIST_PAGE, each a link.
 * Reads feature_stats and explanations only, never the per-feature example files. Score lists
 * hold the explained features. */
async function listFeatures(layer, by, order, page) {
  const list = LISTS[by] ? by : 'density'
  const mine = ++tickets.panel
  setStatus(`listing layer ${layer}'s features by ${LISTS[list].label}…`, 'loading')
  const [stats, explained] = await Promise.all([layerStats(layer), layerExplanations(layer)])
  if (mine !== tickets.panel) return
  const rows = LISTS[list].explained ? [...(explained?.values() ?? [])] : (stats ?? [])
  const sign = order === 'asc' ? -1 : 1
  const sorted = rows
    .map(r => ({ feature: Number(r.feature), value: r[list] ?? null }))
    .sort((a, b) => (a.value === null) - (b.value === null) || (a.value === null ? 0 : sign * (b.value - a.value)) || a.feature - b.feature)
  const pages = Math.max(1, Math.ceil(sorted.length / LIST_PAGE))
  page = Math.max(1, Math.min(pages, Math.floor(page) || 1))
  const shown = sorted.slice((page - 1) * LIST_PAGE, page * LIST_PAGE)
  state.list = { layer, by: list, order: sign > 0 ? 'desc' : 'asc', page, pages, features: shown.map(r => r.feature), values: shown.map(r => r.value) }
  state.search = null
  const url = new URL(location.href)
  for (const [k, v] of Object.entries({ list, order: state.list.order, page })) url.searchParams.set(k, v)
  history.replaceState(null, '', url)
  const why = rows.length ? '' : LISTS[list].explained ? ': the layer has no explanations' : ': the layer has no feature_stats file'
  showResults(`layer ${layer} by ${LISTS[list].label}, ${sign > 0 ? 'highest' : 'lowest'} first · ${sorted.length.toLocaleString('en-US')} features${why}`,
    shown.map(({ feature, value }, i) => el('li', { value: (page - 1) * LIST_PAGE + i + 1 },
      featureLink(layer, feature, `feature ${feature}`),
      el('span', { class: 'val muted' }, ` ${value === null && !LISTS[list].explained ? '–' : LISTS[list].show(value)}`),
      explained?.get(feature) ? el('span', { class: 'explanation' }, explained.get(feature).explanation) : null)))
  $('pager').hidden = false
  $('page-note').textContent = `page ${page} of ${pages}`
  $('page-prev').disabled = page <= 1
  $('page-next').disabled = page >= pages
  setStatus(`layer ${layer}: ${sorted.length} features by ${LISTS[list].label}, page ${page} of ${pages}`, 'ready')
}

// ---------- start ----------

async function start() {
  const suiteUrl = new URL('browser/suite.json', base).href
  const res = await fetch(suiteUrl)
  if (!res.ok) throw new Error(`${suiteUrl}: HTTP ${res.status} (is this a staged loupe repo?)`)
  suite = await res.json()
  state.base = base
  state.suite = { prefix: suite.prefix, layers: suite.layers, num_latents: suite.num_latents }
  $('model').textContent = [suite.model, suite.prefix].filter(Boolean).join(' · ')
  $('layer').replaceChildren(...suite.layers.map(l => el('option', { value: String(l) }, String(l))))
  $('feature').max = suite.num_latents - 1
  $('range').textContent = `0–${suite.num_latents - 1}`

  const layerShown = () => Number($('layer').value)
  const typed = () => $('feature').value
  const go = (layer, f, text) => showFeature(layer, f, text).catch(fail)
  // ◀ ▶ and the arrow keys stop at the ends; a typed id out of range gets its message.
  const step = by => {
    const f = featureId(typed())
    go(layerShown(), Number.isNaN(f) ? 0 : Math.max(0, Math.min(suite.num_latents - 1, f + by)))
  }
  $('pick').addEventListener('submit', e => {
    e.preventDefault()
    go(layerShown(), featureId(typed()), typed())
  })
  $('layer').addEventListener('change', () => go(layerShown(), featureId(typed()), typed()))
  $('prev').addEventListener('click', () => step(-1))
  $('next').addEventListener('click', () => step(1))
  document.addEventListener('keydown', e => {
    if (e.target.closest('input, select, textarea')) return
    if (e.key === 'ArrowLeft') step(-1)
    if (e.key === 'ArrowRight') step(1)
  })
  // Explanations are searched where some layer has them.
  const searchBy = $('search-by')
  searchBy.querySelector('option[value="explanation"]').hidden = !suite.layers.some(l => layerFiles(l).explanations)
  searchBy.addEventListener('change', () => {
    $('query').placeholder = searchBy.value === 'explanation' ? 'find features by explanation, e.g. code' : 'find features by token, e.g. the'
  })
  // A listing: by what, in which order; ◀ ▶ page through it.
  const explainedLayers = suite.layers.some(l => layerFiles(l).explanations)
  for (const [key, { explained }] of Object.entries(LISTS)) {
    if (explained) $('list-by').querySelector(`option[value="${key}"]`).hidden = !explainedLayers
  }
  const listing = page => listFeatures(layerShown(), $('list-by').value, $('list-order').value, page).catch(fail)
  $('list').addEventListener('submit', e => {
    e.preventDefault()
    listing(1)
  })
  $('page-prev').addEventListener('click', () => listing((state.list?.page ?? 1) - 1))
  $('page-next').addEventListener('click', () => listing((state.list?.page ?? 1) + 1))
  const find = query => (searchBy.value === 'explanation' ? searchExplanations(query) : search(query))
  $('search').addEventListener('submit', e => {
    e.preventDefault()
    find($('query').value).catch(fail)
  })
  $('trace-button').addEventListener('click', () => {
    const url = new URL(location.href)
    url.searchParams.set('trace', '1')
    history.replaceState(null, '', url)
    trace().catch(fail)
  })

  const layer = suite.layers.includes(Number(params.get('layer'))) && params.get('layer') !== null
    ? Number(params.get('layer'))
    : suite.layers[0]
  const asked = params.get('feature') ?? '0'
  $('feature').value = asked
  await showFeature(layer, featureId(asked), asked)
  if (params.get('trace') && !$('trace-button').disabled) await trace()
  if (params.get('q')) {
    $('query').value = params.get('q')
    if (params.get('by') === 'explanation') searchBy.value = 'explanation'
    await find(params.get('q'))
  } else if (params.get('list')) {
    if (LISTS[params.get('list')]) $('list-by').value = params.get('list')
    if (params.get('order') === 'asc') $('list-order').value = 'asc'
    await listing(Number(params.get('page')) || 1)
  }
}

start().catch(fail)
