#!/usr/bin/env node
// Room fan-out load generator: N raw protocol-5 clients join one room; each
// sends M `room/message` actions as fast as it can (pipelined, one `sync` per
// action). Every other client must receive every action.
//
//   node load/room-load.mjs --url ws://127.0.0.1:31337/ [--clients 50] [--actions 200]
//   node load/room-load.mjs --spawn            # starts the server with lib/server.mjs
//   node load/room-load.mjs --spawn --transport long-poll
//
// Over long-poll the same raw frames travel through LongPollConnection
// (js-client-fixtures/), Ferry's HTTP long-poll transport.
//
// Prints one JSON summary on stdout. Exits 1 if any action was not synced,
// processed or delivered before --timeout, or if any was undone or duplicated.
// Talks to loopback addresses only, and is bounded in count and time.

import { performance } from 'node:perf_hooks'
import { parseArgs } from 'node:util'

import WebSocket from 'ws'

import { LongPollConnection } from '../../js-client-fixtures/long-poll-connection.mjs'

const MAX_CLIENTS = 2000
const MAX_ACTIONS_PER_CLIENT = 100_000
const MAX_DELIVERIES = 50_000_000
const MAX_TIMEOUT_S = 600
const CONNECT_CONCURRENCY = 100
const HANDSHAKE_TIMEOUT_MS = 30_000

const USAGE = `usage: node load/room-load.mjs (--url ws://127.0.0.1:<port>/ | --spawn) [options]
  --transport T   ws (default) or long-poll (then --url is http://127.0.0.1:<port>)
  --clients N     clients in the room (default 50, at most ${MAX_CLIENTS})
  --actions M     actions each client sends (default 200, at most ${MAX_ACTIONS_PER_CLIENT})
  --timeout S     seconds to wait for every ack and delivery (default 120, at most ${MAX_TIMEOUT_S})
  --room NAME     room id (default: a random one, so no history is replayed)
  --token T       token for the users load0..loadN-1 (default "secret", the any_user_token)
  --subprotocol P (default 2)
  --spawn         start the server with lib/server.mjs (FERRY_BIN or COMPAT_SERVER_CMD)
  --verbose       progress on stderr`

function fail(message) {
  console.error(message)
  console.error(USAGE)
  process.exit(2)
}

let args
try {
  args = parseArgs({
    options: {
      url: { type: 'string' },
      transport: { type: 'string', default: 'ws' },
      spawn: { type: 'boolean', default: false },
      clients: { type: 'string', default: '50' },
      actions: { type: 'string', default: '200' },
      timeout: { type: 'string', default: '120' },
      room: { type: 'string' },
      token: { type: 'string', default: 'secret' },
      subprotocol: { type: 'string', default: '2' },
      verbose: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false }
    }
  }).values
} catch (e) {
  fail(e.message)
}
if (args.help) {
  console.log(USAGE)
  process.exit(0)
}

const N = Number(args.clients)
const M = Number(args.actions)
const TIMEOUT_MS = Number(args.timeout) * 1000
const SUBPROTOCOL = Number(args.subprotocol)
if (!Number.isInteger(N) || N < 2 || N > MAX_CLIENTS) fail(`--clients must be 2..${MAX_CLIENTS}`)
if (!Number.isInteger(M) || M < 1 || M > MAX_ACTIONS_PER_CLIENT) {
  fail(`--actions must be 1..${MAX_ACTIONS_PER_CLIENT}`)
}
if (N * (N - 1) * M > MAX_DELIVERIES) fail(`N*(N-1)*M must be at most ${MAX_DELIVERIES}`)
if (!(TIMEOUT_MS > 0) || TIMEOUT_MS > MAX_TIMEOUT_S * 1000) fail(`--timeout must be 1..${MAX_TIMEOUT_S}`)
if (!args.url === !args.spawn) fail('give exactly one of --url and --spawn')
const LONG_POLL = args.transport === 'long-poll'
if (!LONG_POLL && args.transport !== 'ws') fail('--transport must be ws or long-poll')

function isLoopback(host) {
  let h = host.replace(/^\[|\]$/g, '')
  return h === 'localhost' || h === '::1' || /^127\.\d+\.\d+\.\d+$/.test(h)
}

const verbose = (...a) => {
  if (args.verbose) console.error('[load]', ...a)
}

let server = null
let url = args.url
if (args.spawn) {
  let { startServer } = await import('../lib/server.mjs')
  server = await startServer()
  url = LONG_POLL ? `http://127.0.0.1:${server.port}` : `ws://127.0.0.1:${server.port}/`
  verbose('server started:', server.command)
}
{
  let parsed
  try {
    parsed = new URL(url)
  } catch {
    fail(`bad --url ${url}`)
  }
  if (LONG_POLL && !/^https?:$/.test(parsed.protocol)) fail('--url must be http:// or https:// for long-poll')
  if (!LONG_POLL && !/^wss?:$/.test(parsed.protocol)) fail('--url must be ws:// or wss://')
  if (!isLoopback(parsed.hostname)) fail(`refusing non-loopback address ${parsed.hostname}`)
}

const room = args.room ?? 'load-' + Math.random().toString(36).slice(2, 10)
const channel = `room/${room}`

// Counters.
let delivered = 0
let duplicates = 0
let acked = 0 // actions with both `synced` and logux/processed
let undos = []
let errors = []
let unexpectedCloses = 0
let latencies = new Float64Array(N * (N - 1) * M)
let latencyCount = 0
let phase = 'connect'
let sendStart = 0
let inDoneAt = 0
let deliverDoneAt = 0
let allDone
let allDonePromise = new Promise(resolve => {
  allDone = resolve
})

function checkDone() {
  let now = performance.now()
  if (!inDoneAt && acked === N * M) inDoneAt = now
  if (!deliverDoneAt && delivered === N * (N - 1) * M) deliverDoneAt = now
  if (inDoneAt && deliverDoneAt) allDone()
}

class LoadClient {
  constructor(index) {
    this.index = index
    this.userId = `load${index}`
    this.nodeId = `${this.userId}:c${index}:t`
    this.baseTime = 0
    this.synced = new Uint8Array(M + 2) // by sync number: 1 = subscribe, k+2 = action k
    this.processed = new Uint8Array(M + 2)
    this.fromOthers = new Uint8Array(N * M) // received[c * M + k]
    this.receivedCount = 0
    this.onConnected = null
    this.onSubscribed = null
    this.closing = false
  }

  open() {
    return LONG_POLL ? this.openLongPoll() : this.openWs()
  }

  openLongPoll() {
    return new Promise((resolve, reject) => {
      let timer = setTimeout(() => reject(new Error(`${this.nodeId}: no connected in time`)), HANDSHAKE_TIMEOUT_MS)
      this.conn = new LongPollConnection(url)
      this.conn.on('message', msg => this.onParsed(msg))
      this.conn.on('error', e => errors.push(`${this.nodeId}: ${e.message}`))
      this.conn.on('disconnect', () => {
        if (!this.closing) {
          unexpectedCloses += 1
          errors.push(`${this.nodeId}: session closed in phase ${phase}`)
          reject(new Error(`${this.nodeId}: closed`))
        }
      })
      this.onConnected = () => {
        clearTimeout(timer)
        resolve()
      }
      this.conn.connect().then(() => {
        if (this.conn.connected) {
          this.send(['connect', 5, this.nodeId, 0, { token: args.token, subprotocol: SUBPROTOCOL }])
        }
      })
    })
  }

  openWs() {
    return new Promise((resolve, reject) => {
      let timer = setTimeout(() => reject(new Error(`${this.nodeId}: no connected in time`)), HANDSHAKE_TIMEOUT_MS)
      this.ws = new WebSocket(url, { perMessageDeflate: false })
      this.ws.on('open', () => {
        this.send(['connect', 5, this.nodeId, 0, { token: args.token, subprotocol: SUBPROTOCOL }])
      })
      this.ws.on('message', data => this.onMessage(data.toString()))
      this.ws.on('error', e => {
        errors.push(`${this.nodeId}: ${e.message}`)
        reject(e)
      })
      this.ws.on('close', () => {
        if (!this.closing) {
          unexpectedCloses += 1
          errors.push(`${this.nodeId}: connection closed by the server in phase ${phase}`)
          reject(new Error(`${this.nodeId}: closed`))
        }
      })
      this.onConnected = () => {
        clearTimeout(timer)
        resolve()
      }
    })
  }

  subscribe() {
    return new Promise((resolve, reject) => {
      let timer = setTimeout(() => reject(new Error(`${this.nodeId}: subscribe not processed in time`)), HANDSHAKE_TIMEOUT_MS)
      this.onSubscribed = () => {
        clearTimeout(timer)
        resolve()
      }
      this.send(['sync', 1, { type: 'logux/subscribe', channel }, { id: 1, time: 1 }])
    })
  }

  send(msg) {
    if (LONG_POLL) this.conn.send(msg)
    else this.ws.send(JSON.stringify(msg))
  }

  /** Sends all M actions at once; action k has relative id k+2 (1 is the subscribe). */
  sendAll() {
    for (let k = 0; k < M; k++) {
      let n = k + 2
      this.send([
        'sync',
        n,
        { type: 'room/message', room, c: this.index, k, s: performance.timeOrigin + performance.now() },
        { id: n, time: n }
      ])
    }
  }

  ack(n, kind) {
    let table = kind === 'synced' ? this.synced : this.processed
    if (n < 1 || n > M + 1 || table[n]) return
    table[n] = 1
    if (n === 1) {
      if (this.processed[1] && this.onSubscribed) this.onSubscribed()
      return
    }
    if (this.synced[n] && this.processed[n]) {
      acked += 1
      checkDone()
    }
  }

  onMessage(text) {
    let msg
    try {
      msg = JSON.parse(text)
    } catch {
      errors.push(`${this.nodeId}: non-JSON frame ${text.slice(0, 100)}`)
      return
    }
    this.onParsed(msg)
  }

  onParsed(msg) {
    switch (msg[0]) {
      case 'connected':
        this.baseTime = msg[3][1]
        if (this.onConnected) this.onConnected()
        break
      case 'synced':
        this.ack(msg[1], 'synced')
        break
      case 'ping':
        this.send(['pong', 0])
        break
      case 'error':
        errors.push(`${this.nodeId}: ${JSON.stringify(msg)}`)
        break
      case 'sync': {
        let now = performance.timeOrigin + performance.now()
        for (let i = 2; i + 1 < msg.length; i += 2) this.onAction(msg[i], now)
        this.send(['synced', msg[1]])
        break
      }
    }
  }

  onAction(action, now) {
    if (action.type === 'room/message' && action.room === room) {
      let slot = action.c * M + action.k
      if (action.c === this.index) {
        errors.push(`${this.nodeId}: got its own action ${action.k} back`)
      } else if (this.fromOthers[slot]) {
        duplicates += 1
      } else {
        this.fromOthers[slot] = 1
        this.receivedCount += 1
        delivered += 1
        if (latencyCount < latencies.length) latencies[latencyCount++] = now - action.s
        checkDone()
      }
    } else if (action.type === 'logux/processed' || action.type === 'logux/undo') {
      let [ms, node] = String(action.id).split(' ')
      if (node !== this.nodeId) return
      let n = Number(ms) - this.baseTime
      if (action.type === 'logux/undo') {
        undos.push({ node: this.nodeId, n, reason: action.reason })
        if (n === 1 && this.onSubscribed) this.onSubscribed()
        return
      }
      this.ack(n, 'processed')
    }
  }

  close() {
    this.closing = true
    try {
      if (LONG_POLL) this.conn.disconnect('destroy')
      else this.ws.close()
    } catch {}
  }
}

async function inBatches(items, size, fn) {
  for (let i = 0; i < items.length; i += size) {
    await Promise.all(items.slice(i, i + size).map(fn))
  }
}

function percentile(sorted, p) {
  if (sorted.length === 0) return null
  let i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1))
  return Math.round(sorted[i] * 100) / 100
}

let clients = Array.from({ length: N }, (_, i) => new LoadClient(i))
let summary = { transport: LONG_POLL ? 'long-poll' : 'ws', url, room, clients: N, actionsPerClient: M }
let exitCode = 0
let hardTimer
try {
  hardTimer = setTimeout(() => {
    // Bounded in time whatever happens: the timeout plus a grace for setup.
    console.error('[load] hard deadline reached, exiting')
    process.exit(1)
  }, TIMEOUT_MS + 2 * HANDSHAKE_TIMEOUT_MS + 30_000)
  hardTimer.unref()

  let t0 = performance.now()
  await inBatches(clients, CONNECT_CONCURRENCY, c => c.open())
  let t1 = performance.now()
  verbose(`${N} connected in ${Math.round(t1 - t0)} ms`)
  phase = 'subscribe'
  await inBatches(clients, CONNECT_CONCURRENCY, c => c.subscribe())
  let t2 = performance.now()
  verbose(`${N} subscribed in ${Math.round(t2 - t1)} ms`)
  if (undos.length) throw new Error(`subscriptions undone: ${JSON.stringify(undos.slice(0, 5))}`)

  phase = 'send'
  sendStart = performance.now()
  let cpuStart = process.cpuUsage()
  for (let c of clients) c.sendAll()
  let sendEnd = performance.now()
  verbose(`queued ${N * M} actions in ${Math.round(sendEnd - sendStart)} ms`)

  let progress = args.verbose
    ? setInterval(() => verbose(`acked ${acked}/${N * M}, delivered ${delivered}/${N * (N - 1) * M}`), 1000)
    : null
  let timer
  let finished = await Promise.race([
    allDonePromise.then(() => true),
    new Promise(resolve => {
      timer = setTimeout(() => resolve(false), TIMEOUT_MS)
    })
  ])
  clearTimeout(timer)
  if (progress) clearInterval(progress)
  phase = 'done'
  let cpu = process.cpuUsage(cpuStart)
  let wallMs = performance.now() - sendStart

  let sorted = latencies.subarray(0, latencyCount).sort()
  let expectedDeliveries = N * (N - 1) * M
  let inMs = inDoneAt ? inDoneAt - sendStart : null
  let deliverMs = deliverDoneAt ? deliverDoneAt - sendStart : null
  Object.assign(summary, {
    actions: N * M,
    expectedDeliveries,
    connectMs: Math.round(t1 - t0),
    subscribeMs: Math.round(t2 - t1),
    acked,
    delivered,
    missingAcks: N * M - acked,
    missingDeliveries: expectedDeliveries - delivered,
    duplicates,
    undos: undos.length,
    unexpectedCloses,
    inDurationMs: inMs && Math.round(inMs),
    actionsInPerSec: inMs ? Math.round((N * M) / (inMs / 1000)) : null,
    deliverDurationMs: deliverMs && Math.round(deliverMs),
    deliveriesPerSec: deliverMs ? Math.round(expectedDeliveries / (deliverMs / 1000)) : null,
    latencyMs: {
      p50: percentile(sorted, 50),
      p90: percentile(sorted, 90),
      p99: percentile(sorted, 99),
      max: percentile(sorted, 100)
    },
    // Near 100 % means the generator (one Node thread) limits the numbers above.
    generatorCpuPercent: Math.round(((cpu.user + cpu.system) / 1000 / wallMs) * 100),
    errors: errors.slice(0, 10),
    undoSamples: undos.slice(0, 5)
  })
  summary.ok =
    finished && duplicates === 0 && undos.length === 0 && errors.length === 0 && unexpectedCloses === 0
  if (!summary.ok) exitCode = 1
} catch (e) {
  summary.ok = false
  summary.error = e.message
  summary.errors = errors.slice(0, 10)
  exitCode = 1
} finally {
  for (let c of clients) if (c.ws || c.conn) c.close()
  if (server) {
    if (exitCode !== 0) console.error(server.tail())
    await server.stop()
  }
}
console.log(JSON.stringify(summary, null, 2))
clearTimeout(hardTimer)
process.exit(exitCode)
