// Test wrappers around an unmodified @logux/client `Client` and a raw
// protocol-5 peer. Both speak through a transport's Connection (see
// transports.mjs), so the scenarios run over every transport.

import { Reconnect } from '@logux/core'
import { Client } from '@logux/client'

import './transports.mjs' // sets globalThis.WebSocket for Node 20
import { until, withTimeout } from './util.mjs'

/** Short reconnect delays so that tests do not wait for the 1–5 s defaults. */
export const FAST_RECONNECT = { minDelay: 100, maxDelay: 300 }

/**
 * A started @logux/client `Client` plus everything it saw.
 *   added     every log `add` event: {action, meta} (includes actions from others)
 *   incoming  every message the server sent, as parsed arrays (wire level)
 *   errors    every error the node reported (client.node.catch)
 *   attempts  how many times the connection started to connect
 */
export class TestClient {
  constructor(transport, port, opts = {}) {
    let {
      userId = '10',
      token = userId === '10' ? 'good-10' : userId === '20' ? 'good-20' : 'secret',
      subprotocol = 2,
      reconnect = FAST_RECONNECT,
      ...rest
    } = opts
    this.url = transport.url(port)
    this.connection = new Reconnect(transport.connection(this.url), reconnect)
    this.incoming = []
    // A time-stamped trace of the connection, for failure messages.
    this.trace = []
    let started = Date.now()
    let note = line => {
      this.trace.push(`+${Date.now() - started}ms ${line}`)
      if (this.trace.length > 200) this.trace.shift()
    }
    // Registered before the Client's own listener, which decodes ids in place:
    // this keeps a copy of each message as it was on the wire.
    this.connection.on('message', msg => {
      this.incoming.push(structuredClone(msg))
      note('S>C ' + JSON.stringify(msg))
    })
    for (let event of ['connecting', 'connect', 'disconnect']) {
      this.connection.on(event, () => note(`(${event})`))
    }
    this.connection.on('error', e => note(`(error ${e.message})`))
    let send = this.connection.send.bind(this.connection)
    this.connection.send = msg => {
      note('C>S ' + JSON.stringify(msg))
      return send(msg)
    }
    this.client = new Client({ server: this.connection, subprotocol, userId, token, ...rest })
    this.added = []
    this.errors = []
    this.attempts = 0
    this.states = []
    this.debug = []
    // Client prints every `debug` message from the server with console.error;
    // record them instead (COMPAT_VERBOSE=1 prints them too).
    this.client.node.emitter.events.debug = []
    this.client.node.on('debug', (type, text) => {
      this.debug.push(text)
      if (process.env.COMPAT_VERBOSE) console.error(`debug from the server to ${this.nodeId}: ${text}`)
    })
    // Without catch() an error received from the server is thrown.
    this.client.node.catch(e => this.errors.push(e))
    this.client.on('add', (action, meta) => this.added.push({ action, meta }))
    this.connection.on('connecting', () => {
      this.attempts += 1
    })
    this.client.node.on('state', () => this.states.push(this.client.state))
  }

  get nodeId() {
    return this.client.nodeId
  }

  start() {
    this.client.start()
    return this
  }

  destroy() {
    this.client.destroy()
  }

  /** Waits until client.state is `state`. */
  waitState(state, timeout = 10_000) {
    return until(() => this.client.state === state, {
      timeout,
      what: `client ${this.nodeId} state ${state}`,
      describe: () => this.explain()
    })
  }

  /** `sync` with a timeout, so a missing logux/processed fails the test instead of hanging it. */
  sync(action, meta, timeout = 10_000) {
    return withTimeout(this.client.sync(action, meta), timeout, `logux/processed for ${action.type}`)
  }

  /** Actions of `type` that this client received from the server (not its own). */
  received(type) {
    return this.added.filter(
      e => e.action.type === type && !e.meta.id.includes(' ' + this.nodeId + ' ')
    )
  }

  /** Waits until at least `count` actions of `type` matching `filter` were received. */
  async waitReceived(type, count, { filter = () => true, timeout = 10_000 } = {}) {
    await until(() => this.received(type).filter(e => filter(e.action, e.meta)).length >= count, {
      timeout,
      what: `${count} × ${type} received by ${this.nodeId}`,
      describe: () => this.explain()
    })
    return this.received(type).filter(e => filter(e.action, e.meta))
  }

  /** Subscribes and waits for logux/processed. */
  subscribe(channel, extra = {}) {
    return this.sync({ type: 'logux/subscribe', channel, ...extra })
  }

  explain() {
    let wire = this.trace.slice(-40).map(line => '  ' + line)
    return (
      `client ${this.nodeId}: state=${this.client.state} attempts=${this.attempts}\n` +
      `  errors: ${this.errors.map(e => e.message).join(' | ') || '-'}\n` +
      `  connection trace (last 40):\n${wire.join('\n') || '  (empty)'}`
    )
  }
}

/** Makes a TestClient, starts it unless start:false, and destroys it when the test ends. */
export function testClient(t, transport, port, opts = {}) {
  let { start = true, ...rest } = opts
  let c = new TestClient(transport, port, rest)
  t.after(() => c.destroy())
  if (start) c.start()
  return c
}

/** Starts a client and waits until it is synchronized. */
export async function connectedClient(t, transport, port, opts = {}) {
  let c = testClient(t, transport, port, opts)
  await c.waitState('synchronized')
  return c
}

/**
 * A raw protocol-5 peer over a transport's Connection: it sends exactly the
 * frames a test gives it and records every frame it gets. It answers the
 * server's `sync` with `synced` and `ping` with `pong` unless autoReply is false.
 */
export class RawPeer {
  constructor(transport, port, { autoReply = true } = {}) {
    this.transport = transport
    this.conn = transport.connection(transport.url(port))
    this.messages = []
    this.errors = []
    this.closedAt = null
    this.autoReply = autoReply
    this.lastAdded = 0
    this.baseTime = null
    this.serverNodeId = null
    this.nodeId = null
    this.conn.on('message', msg => this.onMessage(msg))
    this.conn.on('error', e => this.errors.push(e))
    this.closed = new Promise(resolve => {
      this.conn.on('disconnect', () => {
        if (this.closedAt === null) this.closedAt = this.messages.length
        resolve()
      })
    })
  }

  onMessage(msg) {
    this.messages.push(msg)
    if (!this.autoReply || !Array.isArray(msg)) return
    if (msg[0] === 'sync') this.send(['synced', msg[1]])
    if (msg[0] === 'ping') this.send(['pong', this.lastAdded])
  }

  open() {
    return withTimeout(this.conn.connect(), 5000, 'the transport to open')
  }

  send(msg) {
    this.conn.send(msg)
  }

  get canSendText() {
    return typeof this.transport.sendText === 'function'
  }

  sendText(text) {
    this.transport.sendText(this.conn, text)
  }

  close() {
    if (this.conn.connected) this.conn.disconnect('destroy')
  }

  get isClosed() {
    return this.closedAt !== null
  }

  /** Waits for the first message (from index `from`) matching `match`; returns {msg, index}. */
  async waitFor(match, { from = 0, timeout = 5000, what = 'a message' } = {}) {
    let found
    await until(
      () => {
        for (let i = from; i < this.messages.length; i++) {
          if (match(this.messages[i])) {
            found = { msg: this.messages[i], index: i }
            return true
          }
        }
        return false
      },
      { timeout, what, describe: () => this.explain() }
    )
    return found
  }

  waitClosed(timeout = 5000) {
    return withTimeout(this.closed, timeout, 'the server to close the connection').catch(e => {
      e.message += '\n' + this.explain()
      throw e
    })
  }

  /**
   * Sends `connect` and waits for `connected`. Records baseTime (the `end`
   * time in `connected`) and the server node id, which relative ids use.
   */
  async handshake({ userId = '10', token, subprotocol = 2, nodeId, protocol = 5, synced = 0 } = {}) {
    this.nodeId = nodeId ?? `${userId}:${Math.random().toString(36).slice(2, 10)}:t`
    let options = {}
    if (token !== undefined) options.token = token
    else options.token = userId === '10' ? 'good-10' : userId === '20' ? 'good-20' : 'secret'
    if (subprotocol) options.subprotocol = subprotocol
    this.send(['connect', protocol, this.nodeId, synced, options])
    let { msg } = await this.waitFor(m => m[0] === 'connected' || m[0] === 'error', {
      what: '`connected`'
    })
    if (msg[0] === 'error') throw new Error(`handshake failed: ${JSON.stringify(msg)}`)
    this.serverNodeId = msg[2]
    this.baseTime = msg[3][1]
    return msg
  }

  /** The full action id of this peer's own action sent with relative id `shift` (seq 0). */
  ownId(shift, seq = 0) {
    return `${this.baseTime + shift} ${this.nodeId} ${seq}`
  }

  /** Decodes a protocol-5 wire meta.id into the full id string. */
  decodeId(id) {
    if (typeof id === 'number') return `${id + this.baseTime} ${this.serverNodeId} 0`
    if (id.length === 2) return `${id[0] + this.baseTime} ${this.serverNodeId} ${id[1]}`
    return `${id[0] + this.baseTime} ${id[1]} ${id[2]}`
  }

  /** Every [action, meta] the server sent in `sync` messages, with meta.id decoded. */
  actions() {
    let list = []
    for (let msg of this.messages) {
      if (msg[0] !== 'sync') continue
      for (let i = 2; i + 1 < msg.length; i += 2) {
        list.push({ action: msg[i], meta: { ...msg[i + 1], id: this.decodeId(msg[i + 1].id) } })
      }
    }
    return list
  }

  /** Waits for logux/processed (resolves) or logux/undo (rejects) of the action `id`. */
  async waitProcessed(id, timeout = 5000) {
    await until(
      () => this.actions().some(e => (e.action.type === 'logux/processed' || e.action.type === 'logux/undo') && e.action.id === id),
      { timeout, what: `logux/processed for ${id}`, describe: () => this.explain() }
    )
    let entry = this.actions().find(
      e => (e.action.type === 'logux/processed' || e.action.type === 'logux/undo') && e.action.id === id
    )
    if (entry.action.type === 'logux/undo') {
      throw new Error(`action ${id} was undone: ${JSON.stringify(entry.action)}`)
    }
    return entry
  }

  explain() {
    let lines = this.messages.slice(-30).map(m => '  S>C ' + JSON.stringify(m))
    return (
      `raw peer ${this.nodeId ?? '(no connect)'}: closed=${this.isClosed}` +
      ` errors=${this.errors.map(e => e.message).join(' | ') || '-'}\n` +
      `  messages from the server:\n${lines.join('\n') || '  (none)'}`
    )
  }
}

/** Makes a RawPeer, opens it, and closes it when the test ends. */
export async function rawPeer(t, transport, port, opts) {
  let peer = new RawPeer(transport, port, opts)
  t.after(() => peer.close())
  await peer.open()
  return peer
}
