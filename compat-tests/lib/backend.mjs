// A small HTTP back-end for Ferry's back-end hooks (README: "Back-end hooks
// and the server API"), implementing the retail example: clients add
// `order/buy`, the back-end charges the order once per idempotency key and
// writes `order/status` actions back through Ferry's server API.
//
//   let backend = await startBackend({ secret })
//   ... start Ferry with [backend] url = backend.url, secret = same ...
//   backend.setFerry(`http://127.0.0.1:${ferryPort}`)
//   backend.behaviour.failNext.process = 2     // answer 500 twice first
//   backend.behaviour.delayMs.process = 300    // then answer slowly
//   await backend.down() / await backend.up()  // refuse connections for a while
//   backend.state.charges.get(1)               // how often order 1 was charged
//   await backend.stop()
//
// Every request must carry a valid Ferry-Timestamp / Ferry-Signature pair
// (HMAC-SHA256 over `timestamp + "." + body`, compared in constant time,
// timestamps within 5 minutes); anything else gets 401 and is counted in
// state.unauthorized. Only 127.0.0.1 is used.
//
// Also exported: sign / signedHeaders / ferryApi, to call Ferry's server API
// directly (with a right or a wrong signature) from tests.

import { createHmac, timingSafeEqual } from 'node:crypto'
import http from 'node:http'

export const HOST = '127.0.0.1'
export const SIGNATURE_WINDOW_MS = 5 * 60 * 1000
const BODY_LIMIT_BYTES = 4 * 1024 * 1024

/** `v1=` + lowercase hex HMAC-SHA256(secret, timestamp + "." + body). */
export function sign(secret, timestamp, body) {
  let mac = createHmac('sha256', secret)
  mac.update(String(timestamp))
  mac.update('.')
  mac.update(body)
  return 'v1=' + mac.digest('hex')
}

/** The Ferry-Timestamp / Ferry-Signature headers of `body` (a string or Buffer). */
export function signedHeaders(secret, body = '', timestamp = Date.now()) {
  return {
    'Ferry-Timestamp': String(timestamp),
    'Ferry-Signature': sign(secret, timestamp, body)
  }
}

/**
 * True when `signature` signs `body` at `timestamp` with `secret` and the
 * timestamp is within 5 minutes of `now`. Constant-time comparison.
 */
export function verifySignature(secret, timestamp, signature, body, now = Date.now()) {
  if (typeof timestamp !== 'string' || !/^-?\d{1,16}$/.test(timestamp)) return false
  if (Math.abs(now - Number(timestamp)) > SIGNATURE_WINDOW_MS) return false
  if (typeof signature !== 'string') return false
  let expected = Buffer.from(sign(secret, timestamp, body))
  let given = Buffer.from(signature)
  // timingSafeEqual needs equal lengths; a length mismatch reveals only the
  // length, which is public (v1= + 64 hex digits).
  if (given.length !== expected.length) return false
  return timingSafeEqual(given, expected)
}

/**
 * One request to Ferry's server API. `auth` is 'hmac' (default), 'bearer' or
 * 'none'; `secret` is the key used (pass a wrong one to test refusals);
 * `timestamp` overrides the signing time. Resolves with {status, body, text}
 * (body is the parsed JSON or null); rejects only on network errors.
 */
export async function ferryApi(base, method, path, { secret, body, auth = 'hmac', timestamp, signature } = {}) {
  let text = body === undefined ? '' : typeof body === 'string' ? body : JSON.stringify(body)
  let headers = {}
  if (text !== '') headers['Content-Type'] = 'application/json'
  if (auth === 'hmac') {
    Object.assign(headers, signedHeaders(secret, text, timestamp ?? Date.now()))
    if (signature !== undefined) headers['Ferry-Signature'] = signature
  } else if (auth === 'bearer') {
    headers.Authorization = `Bearer ${secret}`
  }
  let res = await fetch(base + path, {
    method,
    headers,
    body: method === 'GET' || method === 'HEAD' ? undefined : text,
    signal: AbortSignal.timeout(10_000)
  })
  let answer = await res.text()
  let parsed = null
  try {
    parsed = JSON.parse(answer)
  } catch {}
  return { status: res.status, body: parsed, text: answer }
}

function delay(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    let chunks = []
    let size = 0
    req.on('data', chunk => {
      size += chunk.length
      if (size > BODY_LIMIT_BYTES) {
        reject(new Error('body too large'))
        req.destroy()
        return
      }
      chunks.push(chunk)
    })
    req.on('end', () => resolve(Buffer.concat(chunks)))
    req.on('error', reject)
  })
}

const HOOKS = ['auth', 'access', 'resend', 'load', 'process', 'events']

/**
 * Starts the back-end on 127.0.0.1 (port 0 unless `port` is given).
 *
 * Options:
 *   secret        the shared HMAC key (required; also used for the server API)
 *   basePath      where hooks live (default '/ferry': POST /ferry/<hook>)
 *   ferry         Ferry's base URL, 'http://127.0.0.1:<port>' (or setFerry later)
 *   apiAuth       'hmac' (default) or 'bearer': how it calls POST /api/v1/actions
 *   writeStatus   false: `process` answers at once without calling the API
 *                 (for the latency measurement)
 *
 * `behaviour` (mutable at any time):
 *   deniedUsers      Set of user ids the `access` hook denies (actions and subscriptions)
 *   deniedChannels   Set of channel names whose subscription the `access` hook denies
 *   notFoundChannels Set of channel names answered `not_found`
 *   outOfStock       Set of order numbers `process` answers with failed/outOfStock
 *   failNext         {hook: n}: the next n requests of that hook get 500
 *   loseAfterWork    {hook: n}: the next n requests of that hook do their work
 *                    (for process: charge and write) and then lose the answer
 *                    (the socket is destroyed), as a crash after the charge would
 *   delayMs          {hook: ms}: answer that hook after a pause
 *   tokens           {userId: token} the `auth` hook accepts
 *   loadActions      (action, body) => [...] the `load` hook's actions
 *   resend           (action, body) => {...} the `resend` hook's answer
 *   slowOrders       Map order → ms: `process` of that order answers after a pause
 */
export async function startBackend(opts = {}) {
  let { secret, basePath = '/ferry', port = 0, apiAuth = 'hmac', writeStatus = true } = opts
  if (!secret) throw new Error('startBackend: secret is required')
  let ferry = opts.ferry ?? null

  let behaviour = {
    deniedUsers: new Set(),
    deniedChannels: new Set(),
    notFoundChannels: new Set(),
    outOfStock: new Set(),
    failNext: {},
    loseAfterWork: {},
    delayMs: {},
    tokens: {},
    loadActions: null,
    resend: null,
    slowOrders: new Map()
  }

  let state = {
    /** Every authenticated hook request: {hook, body, headers, at}. */
    requests: [],
    /** Authenticated requests per hook. */
    calls: Object.fromEntries(HOOKS.map(h => [h, 0])),
    /** Requests refused with 401 (bad or missing signature, stale timestamp). */
    unauthorized: 0,
    unauthorizedByHook: {},
    /** 500s given on purpose (failNext). */
    injectedFailures: 0,
    /** Answers lost on purpose (loseAfterWork). */
    lostAnswers: 0,
    /** Order number → how many times it was charged. */
    charges: new Map(),
    /** Idempotency key → the answer given (completed process calls). */
    completed: new Map(),
    /** Idempotency keys whose order was charged. */
    charged: new Set(),
    /** `process` calls whose key had already been charged (duplicate deliveries). */
    duplicates: 0,
    /** Idempotency key → how many `process` calls carried it. */
    processCallsByKey: new Map(),
    /** `process` requests without an Idempotency-Key header. */
    missingKeys: 0,
    /** Every `events` batch received (the `events` arrays, in arrival order). */
    eventBatches: [],
    /** Server API calls made by the back-end: {ids, status, body} or {ids, error}. */
    apiCalls: [],
    /** Errors in the back-end itself (bad bodies etc.). */
    errors: []
  }

  let sockets = new Set()
  let server = http.createServer((req, res) => {
    handle(req, res).catch(e => {
      state.errors.push(e.stack || String(e))
      if (!res.headersSent) {
        res.writeHead(500, { 'Content-Type': 'application/json' })
        res.end(JSON.stringify({ error: 'internal' }))
      } else {
        res.destroy()
      }
    })
  })
  server.on('connection', socket => {
    sockets.add(socket)
    socket.on('close', () => sockets.delete(socket))
  })

  function json(res, status, value) {
    let text = JSON.stringify(value)
    res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(text) })
    res.end(text)
  }

  async function handle(req, res) {
    let url = new URL(req.url, 'http://x')
    let raw = await readBody(req)
    if (req.method !== 'POST' || !url.pathname.startsWith(basePath + '/')) {
      return json(res, 404, { error: 'not found' })
    }
    let hook = url.pathname.slice(basePath.length + 1)
    if (!HOOKS.includes(hook)) return json(res, 404, { error: 'unknown hook' })
    let ok = verifySignature(
      secret,
      req.headers['ferry-timestamp'],
      req.headers['ferry-signature'],
      raw
    )
    if (!ok) {
      state.unauthorized += 1
      state.unauthorizedByHook[hook] = (state.unauthorizedByHook[hook] ?? 0) + 1
      return json(res, 401, { error: 'wrong signature' })
    }
    let body
    try {
      body = JSON.parse(raw.toString('utf8'))
    } catch {
      state.errors.push(`${hook}: body is not JSON`)
      return json(res, 400, { error: 'not JSON' })
    }
    state.calls[hook] += 1
    state.requests.push({ hook, body, headers: { ...req.headers }, at: Date.now() })

    if ((behaviour.failNext[hook] ?? 0) > 0) {
      behaviour.failNext[hook] -= 1
      state.injectedFailures += 1
      return json(res, 500, { error: 'injected failure' })
    }
    let pause = behaviour.delayMs[hook] ?? 0
    if (pause > 0) await delay(pause)

    let answer = await HANDLERS[hook](body, req)
    if (answer.status) return json(res, answer.status, answer.body)
    if ((behaviour.loseAfterWork[hook] ?? 0) > 0) {
      behaviour.loseAfterWork[hook] -= 1
      state.lostAnswers += 1
      req.socket.destroy()
      return
    }
    return json(res, 200, answer.body)
  }

  function userDenied(body) {
    return body.user_id !== null && behaviour.deniedUsers.has(String(body.user_id))
  }

  const HANDLERS = {
    async auth(body) {
      let expected = behaviour.tokens[body.user_id]
      if (expected !== undefined && body.token === expected) return { body: { result: 'allowed' } }
      if (body.token === 'backend-wrong-subprotocol') return { body: { result: 'wrong_subprotocol' } }
      return { body: { result: 'denied' } }
    },

    async access(body) {
      let action = body.action ?? {}
      if (action.type === 'logux/subscribe') {
        if (behaviour.notFoundChannels.has(action.channel)) return { body: { result: 'not_found' } }
        if (behaviour.deniedChannels.has(action.channel)) return { body: { result: 'denied' } }
      }
      if (userDenied(body)) return { body: { result: 'denied' } }
      return { body: { result: 'allowed' } }
    },

    async resend(body) {
      if (behaviour.resend) return { body: behaviour.resend(body.action, body) }
      let action = body.action ?? {}
      if (action.order !== undefined) return { body: { channels: [`orders/${action.order}`] } }
      return { body: {} }
    },

    async load(body) {
      let actions = behaviour.loadActions ? behaviour.loadActions(body.action, body) : []
      return { body: { actions } }
    },

    async events(body) {
      state.eventBatches.push(Array.isArray(body.events) ? body.events : body.events)
      return { body: { ok: true } }
    },

    async process(body, req) {
      let action = body.action ?? {}
      let key = req.headers['idempotency-key']
      if (!key) {
        state.missingKeys += 1
        return { status: 400, body: { error: 'Idempotency-Key is missing' } }
      }
      state.processCallsByKey.set(key, (state.processCallsByKey.get(key) ?? 0) + 1)
      if (action.type !== 'order/buy') return { body: { result: 'processed' } }

      if (state.charged.has(key) || state.completed.has(key)) state.duplicates += 1
      let done = state.completed.get(key)
      if (done) return { body: done }

      let order = action.order
      let slow = behaviour.slowOrders.get(order)
      if (slow) await delay(slow)
      let clientId = body.client_id
      let target = { channels: [`orders/${order}`], users: [], clients: clientId ? [clientId] : [], nodes: [] }
      if (behaviour.outOfStock.has(order)) {
        let answer = {
          result: 'failed',
          reason: 'outOfStock',
          actions: [
            {
              id: `order-${order}-failed`,
              action: { type: 'order/status', order, status: 'outOfStock' },
              ...target
            }
          ]
        }
        state.completed.set(key, answer)
        return { body: answer }
      }
      if (!writeStatus) {
        let answer = { result: 'processed' }
        state.completed.set(key, answer)
        return { body: answer }
      }

      // processing → charge (once per key) → paid. Every write is idempotent
      // by its id, so a repeated call (a lost answer, a Ferry restart) may
      // repeat them without harm; only the charge must not repeat.
      let processing = await writeActions([
        { id: `order-${order}-processing`, action: { type: 'order/status', order, status: 'processing' }, ...target }
      ])
      if (!processing) return { status: 503, body: { error: 'could not reach Ferry' } }
      if (!state.charged.has(key)) {
        state.charged.add(key)
        state.charges.set(order, (state.charges.get(order) ?? 0) + 1)
      }
      let paid = await writeActions([
        { id: `order-${order}-paid`, action: { type: 'order/status', order, status: 'paid' }, ...target }
      ])
      if (!paid) return { status: 503, body: { error: 'could not reach Ferry' } }
      let answer = { result: 'processed' }
      state.completed.set(key, answer)
      return { body: answer }
    }
  }

  /** POST /api/v1/actions; true on a 200 with one result per action. */
  async function writeActions(actions) {
    let ids = actions.map(a => a.id)
    if (!ferry) {
      state.apiCalls.push({ ids, error: 'no Ferry URL (setFerry)' })
      return false
    }
    try {
      let res = await ferryApi(ferry, 'POST', '/api/v1/actions', { secret, body: { actions }, auth: apiAuth })
      state.apiCalls.push({ ids, status: res.status, body: res.body })
      return res.status === 200 && Array.isArray(res.body?.results) && res.body.results.length === actions.length
    } catch (e) {
      state.apiCalls.push({ ids, error: e.message })
      return false
    }
  }

  function listen() {
    return new Promise((resolve, reject) => {
      server.once('error', reject)
      server.listen(port, HOST, () => {
        server.off('error', reject)
        port = server.address().port
        resolve()
      })
    })
  }

  let isUp = false
  async function up() {
    if (isUp) return
    await listen()
    isUp = true
  }

  /** Stops listening and drops every open connection: Ferry's requests are refused. */
  async function down() {
    if (!isUp) return
    isUp = false
    let closed = new Promise(resolve => server.close(() => resolve()))
    for (let socket of sockets) socket.destroy()
    await closed
  }

  await up()

  return {
    get port() {
      return port
    },
    /** The `[backend] url` for Ferry's config. */
    get url() {
      return `http://${HOST}:${port}${basePath}`
    },
    get isUp() {
      return isUp
    },
    secret,
    behaviour,
    state,
    setFerry(url) {
      ferry = url
    },
    writeActions,
    up,
    down,
    async stop() {
      await down()
    },
    /** Process calls whose body's action is order/buy for `order`. */
    processCalls(order) {
      return state.requests.filter(r => r.hook === 'process' && r.body.action?.order === order)
    },
    /** Every event received, flattened in arrival order. */
    events() {
      return state.eventBatches.flat()
    },
    /** A one-line summary, for failure messages. */
    explain() {
      return (
        `backend: up=${isUp} calls=${JSON.stringify(state.calls)} unauthorized=${state.unauthorized}` +
        ` injected=${state.injectedFailures} lost=${state.lostAnswers} duplicates=${state.duplicates}` +
        ` charges=${JSON.stringify([...state.charges])} errors=${JSON.stringify(state.errors)}` +
        `\n  api calls: ${JSON.stringify(state.apiCalls.slice(-10))}` +
        `\n  last requests: ${JSON.stringify(state.requests.slice(-5).map(r => ({ hook: r.hook, body: r.body })))}`
      )
    }
  }
}

// ---------------------------------------------------------------------------
// Ferry configurations with a [backend] section.

function tomlValue(value) {
  if (typeof value === 'string') return JSON.stringify(value)
  if (typeof value === 'number' || typeof value === 'boolean') return String(value)
  if (Array.isArray(value)) return '[' + value.map(tomlValue).join(', ') + ']'
  if (value && typeof value === 'object') {
    return '{ ' + Object.entries(value).map(([k, v]) => `${JSON.stringify(k)} = ${tomlValue(v)}`).join(', ') + ' }'
  }
  throw new Error(`no TOML for ${value}`)
}

function tomlTable(header, fields) {
  let lines = [header]
  for (let [key, value] of Object.entries(fields)) {
    if (value !== undefined) lines.push(`${key} = ${tomlValue(value)}`)
  }
  return lines.join('\n')
}

/** The retail rules of the README example (the hooks can be overridden). */
export const RETAIL_TYPES = [
  { type: 'order/buy', access: 'anyone', resend: ['orders/{order}'], hooks: ['access', 'process'] },
  { type: 'order/status', access: 'nobody' },
  { type: 'room/message', access: 'anyone', resend: ['room/{room}'] }
]
export const RETAIL_CHANNELS = [
  { pattern: 'orders/:id', access: 'anyone', hooks: ['access', 'events'] },
  { pattern: 'room/:id', access: 'anyone' }
]

/**
 * A Ferry configuration (TOML text) with a [backend] section.
 *   backend   the [backend] keys ({url, secret, timeout_ms, ...})
 *   types     [[types]] rules (default RETAIL_TYPES)
 *   channels  [[channels]] rules (default RETAIL_CHANNELS)
 *   auth      the [auth] table (default: the tokens of ferry-test.toml); null for none
 */
export function ferryConfig({ backend, types = RETAIL_TYPES, channels = RETAIL_CHANNELS, auth } = {}) {
  let parts = [
    'env = "development"\nsubprotocol = 2\nmin_subprotocol = 2'
  ]
  if (auth !== null) {
    parts.push(
      tomlTable('[auth]', auth ?? { tokens: { 10: 'good-10', 20: 'good-20' }, any_user_token: 'secret' })
    )
  }
  parts.push(tomlTable('[backend]', backend))
  for (let rule of channels) parts.push(tomlTable('[[channels]]', rule))
  for (let rule of types) parts.push(tomlTable('[[types]]', rule))
  return parts.join('\n\n') + '\n'
}
