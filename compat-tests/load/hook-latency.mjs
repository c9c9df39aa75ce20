// The latency a `process` back-end hook adds, on loopback.
//
//   node load/hook-latency.mjs [--actions 500] [--warmup 50] [--timeout 120]
//
// Starts Ferry (FERRY_BIN, its own temporary data directory, a free port on
// 127.0.0.1) with a [backend] pointing at a fast test back-end (lib/backend.mjs:
// `process` answers {"result":"processed"} at once, no server API calls), and
// one raw protocol-5 WebSocket client. It then sends, one at a time (each
// waits for the previous `logux/processed`), N actions of a hooked type
// (`order/buy`, hooks = ["process"], resent to `orders/{order}`) and N of an
// unhooked one (`room/message`, resent to `room/{room}`), alternating, and
// times each from sending its `sync` to receiving its `logux/processed`.
// A warm-up of W of each comes first and is not counted.
//
// Prints one JSON object: p50/p90/p99/mean/max in milliseconds for both
// types and the differences (hooked − unhooked). Exits 1 if an action was
// undone or not answered in time, 2 on bad arguments.

import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { performance } from 'node:perf_hooks'
import { parseArgs } from 'node:util'

import WebSocket from 'ws'

import { ferryConfig, startBackend } from '../lib/backend.mjs'
import { HOST, startServer } from '../lib/server.mjs'

const SECRET = 'hook-latency-secret-0123456789abcdef'
const ACTIONS_MAX = 100_000
const ACTION_TIMEOUT_MS = 10_000

function fail(message, code = 2) {
  console.error(message)
  process.exit(code)
}

let args
try {
  args = parseArgs({
    options: {
      actions: { type: 'string', default: '500' },
      warmup: { type: 'string', default: '50' },
      timeout: { type: 'string', default: '120' },
      help: { type: 'boolean', default: false }
    }
  }).values
} catch (e) {
  fail(e.message)
}
if (args.help) {
  console.log('node load/hook-latency.mjs [--actions 500] [--warmup 50] [--timeout 120]')
  process.exit(0)
}
const N = Number(args.actions)
const WARMUP = Number(args.warmup)
const TIMEOUT_S = Number(args.timeout)
if (!Number.isInteger(N) || N < 1 || N > ACTIONS_MAX) fail(`--actions must be 1…${ACTIONS_MAX}`)
if (!Number.isInteger(WARMUP) || WARMUP < 0 || WARMUP > ACTIONS_MAX) fail(`--warmup must be 0…${ACTIONS_MAX}`)
if (!(TIMEOUT_S > 0)) fail('--timeout must be a positive number of seconds')

// A hard deadline: never hang.
let deadline = setTimeout(() => fail(`hook-latency: not done after ${TIMEOUT_S} s`, 1), TIMEOUT_S * 1000)
deadline.unref()

/** A raw protocol-5 client: answers sync/ping, resolves waits for processed/undo. */
class RawClient {
  constructor(url) {
    this.ws = new WebSocket(url)
    this.nodeId = `load:${Math.random().toString(36).slice(2, 10)}:hook`
    this.waiting = new Map()
    this.baseTime = null
    this.serverNodeId = null
    this.lastAdded = 0
    this.connected = new Promise((resolve, reject) => {
      this.ws.on('error', reject)
      this.ws.on('close', () => reject(new Error('the server closed the connection')))
      this.ws.on('message', data => {
        let msg = JSON.parse(data.toString())
        if (msg[0] === 'connected') {
          this.serverNodeId = msg[2]
          this.baseTime = msg[3][1]
          resolve()
        } else if (msg[0] === 'error') {
          reject(new Error(`server error: ${JSON.stringify(msg)}`))
        } else {
          this.onMessage(msg)
        }
      })
    })
    this.ws.on('open', () => {
      this.ws.send(JSON.stringify(['connect', 5, this.nodeId, 0, { token: 'secret', subprotocol: 2 }]))
    })
  }

  onMessage(msg) {
    if (msg[0] === 'ping') {
      this.ws.send(JSON.stringify(['pong', this.lastAdded]))
    } else if (msg[0] === 'sync') {
      this.lastAdded = Math.max(this.lastAdded, msg[1])
      this.ws.send(JSON.stringify(['synced', msg[1]]))
      for (let i = 2; i + 1 < msg.length; i += 2) {
        let action = msg[i]
        if (action.type !== 'logux/processed' && action.type !== 'logux/undo') continue
        let wait = this.waiting.get(action.id)
        if (wait) {
          this.waiting.delete(action.id)
          wait(action)
        }
      }
    }
  }

  /** Sends one action with relative id `shift`; resolves with the ms until its answer. */
  send(shift, action) {
    let id = `${this.baseTime + shift} ${this.nodeId} 0`
    let started = performance.now()
    let answered = new Promise((resolve, reject) => {
      let timer = setTimeout(() => {
        this.waiting.delete(id)
        reject(new Error(`no answer for ${id} (${action.type}) within ${ACTION_TIMEOUT_MS} ms`))
      }, ACTION_TIMEOUT_MS)
      this.waiting.set(id, answer => {
        clearTimeout(timer)
        if (answer.type === 'logux/undo') reject(new Error(`${action.type} undone: ${JSON.stringify(answer)}`))
        else resolve(performance.now() - started)
      })
    })
    this.ws.send(JSON.stringify(['sync', shift, action, { id: shift, time: shift }]))
    return answered
  }

  close() {
    this.ws.removeAllListeners('close')
    this.ws.close()
  }
}

function stats(samples) {
  let sorted = [...samples].sort((a, b) => a - b)
  let at = q => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))]
  let round = x => Math.round(x * 1000) / 1000
  return {
    count: sorted.length,
    p50: round(at(0.5)),
    p90: round(at(0.9)),
    p99: round(at(0.99)),
    mean: round(sorted.reduce((s, x) => s + x, 0) / sorted.length),
    max: round(sorted[sorted.length - 1])
  }
}

let backend
let srv
let configDir
let client
let code = 0
try {
  backend = await startBackend({ secret: SECRET, writeStatus: false })
  configDir = await mkdtemp(path.join(os.tmpdir(), 'ferry-hook-latency-config-'))
  let config = path.join(configDir, 'ferry.toml')
  await writeFile(
    config,
    ferryConfig({
      backend: { url: backend.url, secret: SECRET },
      types: [
        { type: 'order/buy', access: 'anyone', resend: ['orders/{order}'], hooks: ['process'] },
        { type: 'room/message', access: 'anyone', resend: ['room/{room}'] }
      ],
      channels: [
        { pattern: 'orders/:id', access: 'anyone' },
        { pattern: 'room/:id', access: 'anyone' }
      ]
    })
  )
  srv = await startServer({ config })
  backend.setFerry(`http://${HOST}:${srv.port}`)

  client = new RawClient(`ws://${HOST}:${srv.port}/`)
  await client.connected

  let hooked = []
  let unhooked = []
  let shift = 0
  for (let i = 0; i < WARMUP + N; i++) {
    shift += 1
    let a = await client.send(shift, { type: 'order/buy', order: i, item: 'x' })
    shift += 1
    let b = await client.send(shift, { type: 'room/message', room: 'latency', text: `m${i}` })
    if (i >= WARMUP) {
      hooked.push(a)
      unhooked.push(b)
    }
  }
  let h = stats(hooked)
  let u = stats(unhooked)
  let round = x => Math.round(x * 1000) / 1000
  console.log(
    JSON.stringify(
      {
        actions: N,
        warmup: WARMUP,
        measure: 'ms from sending `sync` to receiving `logux/processed`, one action at a time, loopback',
        hooked: { type: 'order/buy (hooks = ["process"])', ...h },
        unhooked: { type: 'room/message (resend only)', ...u },
        addedByHookMs: { p50: round(h.p50 - u.p50), p99: round(h.p99 - u.p99), mean: round(h.mean - u.mean) },
        backendProcessCalls: backend.state.calls.process,
        backendUnauthorized: backend.state.unauthorized
      },
      null,
      2
    )
  )
  if (backend.state.calls.process < WARMUP + N) {
    console.error(`the back-end saw ${backend.state.calls.process} process calls, expected ${WARMUP + N}`)
    code = 1
  }
} catch (e) {
  console.error(`hook-latency: ${e.stack || e}`)
  if (srv) console.error(srv.tail())
  code = 1
} finally {
  client?.close()
  await srv?.stop()
  await backend?.stop()
  if (configDir) await rm(configDir, { recursive: true, force: true })
}
process.exit(code)
