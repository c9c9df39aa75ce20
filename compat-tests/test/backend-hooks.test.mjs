// Back-end hooks and the server API (README: "Back-end hooks and the server
// API"), with the retail example: unchanged @logux/client clients add
// `order/buy`; the test back-end (lib/backend.mjs) is asked by Ferry whether
// that is allowed (`access`) and to do the work (`process`, durable and
// retried); it charges each order once per Idempotency-Key and writes
// `order/status` actions back through POST /api/v1/actions.
//
// Every test starts its own back-end (127.0.0.1, a free port) and its own
// Ferry with a generated configuration pointing at it, and stops both.

import assert from 'node:assert/strict'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import { describe, test } from 'node:test'

import { MemoryStore, WsConnection } from '@logux/core'
import WebSocket from 'ws'

import { ferryApi, ferryConfig, RETAIL_CHANNELS, RETAIL_TYPES, sign, startBackend } from '../lib/backend.mjs'
import { connectedClient, TestClient, testClient } from '../lib/clients.mjs'
import { EXTERNAL_SERVER, HOST, startServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, settle, until } from '../lib/util.mjs'

const SECRET = 'compat-backend-secret-0123456789abcdef'
const WRONG_SECRET = 'compat-wrong-secret-fedcba9876543210'

/** Small retry settings and short timeouts, so every test stays within seconds. */
const FAST_BACKEND = {
  timeout_ms: 2000,
  process_retry_initial_ms: 50,
  process_retry_max_ms: 300
}

const ONLY_FERRY = EXTERNAL_SERVER ? { skip: 'back-end hooks are Ferry-only (COMPAT_SERVER_CMD is set)' } : {}

/**
 * Starts the test back-end and a Ferry configured for it; both are stopped
 * when the test ends. Returns {backend, srv, api, writeConfig, base}.
 */
async function retail(t, opts = {}) {
  let { ferrySecret = SECRET, backendKeys = {}, types, channels, auth } = opts
  let backend = await startBackend({ secret: SECRET, ...opts.backendOptions })
  t.after(() => backend.stop())
  let dir = await mkdtemp(path.join(os.tmpdir(), 'ferry-backend-'))
  t.after(() => rm(dir, { recursive: true, force: true }))
  let config = path.join(dir, 'ferry.toml')
  let writeConfig = secret =>
    writeFile(
      config,
      ferryConfig({
        backend: { url: backend.url, secret, ...FAST_BACKEND, ...backendKeys },
        types,
        channels,
        auth
      })
    )
  await writeConfig(ferrySecret)
  let srv = await startServer({ config })
  t.after(() => srv.stop())
  let base = `http://${HOST}:${srv.port}`
  backend.setFerry(base)
  let api = (method, apiPath, body, extra = {}) => ferryApi(base, method, apiPath, { secret: SECRET, body, ...extra })
  return { backend, srv, api, writeConfig, base }
}

/**
 * A test body with its own back-end and Ferry; a failure's message ends with
 * the back-end's summary and Ferry's output.
 */
function scenario(opts, body) {
  return async t => {
    let env = await retail(t, opts)
    try {
      await body(t, env)
    } catch (e) {
      if (e && typeof e === 'object') {
        try {
          e.message = `${e.message}\n${env.backend.explain()}\n${env.srv.tail()}`
          e.hasServerLog = true
        } catch {}
      }
      throw e
    } finally {
      if (process.env.COMPAT_SHOW_SERVER_LOG) console.log(env.backend.explain() + '\n' + env.srv.tail(200_000))
    }
  }
}

/** order/status actions for `order` (and `status`) in the client's log. */
function statuses(c, order, status) {
  return c.added.filter(
    e => e.action.type === 'order/status' && e.action.order === order && (status === undefined || e.action.status === status)
  )
}

/** logux/processed and logux/undo for action `id` in the client's log. */
function answers(c, id) {
  return c.added.filter(e => (e.action.type === 'logux/processed' || e.action.type === 'logux/undo') && e.action.id === id)
}

/** How many actions matching `match` the server sent to the client, on the wire. */
function onWire(c, match) {
  let n = 0
  for (let msg of c.incoming) {
    if (!Array.isArray(msg) || msg[0] !== 'sync') continue
    for (let i = 2; i + 1 < msg.length; i += 2) if (match(msg[i])) n += 1
  }
  return n
}

async function assertUndo(promise, reason) {
  let result = await settle(promise)
  assert.equal(result.status, 'rejected', `expected logux/undo ${reason}, got logux/processed`)
  assert.equal(result.reason.name, 'LoguxUndoError', `expected a LoguxUndoError, got ${result.reason.stack}`)
  assert.equal(result.reason.action.reason, reason, JSON.stringify(result.reason.action))
  return result.reason.action
}

/** Gives a not yet started client the ids of an earlier one (as after a page reload). */
function adoptIds(c, clientId, tabId) {
  let client = c.client
  client.clientId = clientId
  client.tabId = tabId
  client.nodeId = `${clientId}:${tabId}`
  client.log.nodeId = client.nodeId
  client.node.localNodeId = client.nodeId
}

/** A client destroyed when the test ends unless the test destroyed it first. */
function ownedClient(t, transport, port, opts) {
  let c = new TestClient(transport, port, opts)
  let destroyed = false
  let destroy = () => {
    if (!destroyed) {
      destroyed = true
      c.client.destroy()
    }
  }
  c.destroy = destroy
  t.after(destroy)
  return c
}

/**
 * Reads a whole channel through GET /api/v1/channel, page by page.
 * Returns the entries [{added, action, meta}].
 */
async function readChannel(api, name, limit = 2) {
  let all = []
  let since = 0
  for (let page = 0; page < 1000; page++) {
    let res = await api('GET', `/api/v1/channel?name=${encodeURIComponent(name)}&since=${since}&limit=${limit}`)
    assert.equal(res.status, 200, `GET /api/v1/channel: ${res.status} ${res.text}`)
    assert.ok(Array.isArray(res.body.actions), `channel answer has actions: ${res.text}`)
    all.push(...res.body.actions)
    if (res.body.actions.length < limit) break
    assert.ok(res.body.next > since, `next (${res.body.next}) moves past since (${since})`)
    since = res.body.next
  }
  return all
}

/**
 * The events hook delivered every action of `channel` at least once, in log
 * order: the ids in first-seen order equal the channel's stored order, and
 * within each batch `added` increases.
 */
async function assertEventsCover(backend, api, channel) {
  let stored = await readChannel(api, channel)
  let storedIds = stored.map(e => e.meta.id)
  let firstSeen = []
  await until(
    () => {
      firstSeen = []
      for (let e of backend.events()) {
        if (!(e.meta?.channels ?? []).includes(channel)) continue
        if (!firstSeen.includes(e.meta.id)) firstSeen.push(e.meta.id)
      }
      return storedIds.every(id => firstSeen.includes(id))
    },
    {
      timeout: 10_000,
      what: `the events hook to deliver every action of ${channel}`,
      describe: () => `stored: ${JSON.stringify(storedIds)}\nevents: ${JSON.stringify(firstSeen)}`
    }
  )
  assert.deepEqual(firstSeen, storedIds, `events of ${channel} in log order`)
  for (let batch of backend.state.eventBatches) {
    for (let i = 1; i < batch.length; i++) {
      assert.ok(batch[i].added > batch[i - 1].added, `added increases within a batch: ${JSON.stringify(batch.map(e => e.added))}`)
    }
  }
  return stored
}

// ---------------------------------------------------------------------------

for (const transport of transports) {
  describe(`backend hooks over ${transport.name}`, () => {
    test(
      'a retail happy path: process fails twice, then answers slowly; the author gets processed and paid exactly once',
      ONLY_FERRY,
      scenario({}, async (t, { backend, srv }) => {
        backend.behaviour.failNext.process = 2
        backend.behaviour.delayMs.process = 400
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        await c.subscribe('orders/1')

        let meta = {}
        let started = Date.now()
        let processed = await c.sync({ type: 'order/buy', order: 1, item: 'book' }, meta, 20_000)
        let elapsed = Date.now() - started
        assert.equal(typeof processed.id, 'string')
        assert.ok(elapsed >= 400, `processed only after the slow answer (${elapsed} ms)`)

        await c.waitReceived('order/status', 2, { filter: a => a.order === 1 })
        await delay(400)
        assert.equal(statuses(c, 1, 'paid').length, 1, 'paid exactly once in the client log')
        assert.equal(statuses(c, 1, 'processing').length, 1, 'processing exactly once in the client log')
        assert.equal(onWire(c, a => a.type === 'order/status' && a.status === 'paid'), 1, 'paid sent exactly once')
        assert.deepEqual(
          answers(c, meta.id).map(e => e.action.type),
          ['logux/processed'],
          'one logux/processed and no undo'
        )
        assert.equal(statuses(c, 1, 'paid')[0].meta.id, '0 server:api:order-1-paid 0', 'the Logux id of an API action')

        let calls = backend.processCalls(1)
        assert.equal(calls.length, 3, 'two failures, then the success')
        for (let call of calls) {
          assert.equal(call.headers['idempotency-key'], meta.id, 'Idempotency-Key is the action id')
          assert.equal(call.headers['ferry-hook'], 'process')
          assert.match(call.headers['content-type'], /^application\/json/)
        }
        let body = calls[2].body
        assert.equal(body.hook, 'process')
        assert.equal(body.user_id, '10')
        assert.equal(body.client_id, c.client.clientId)
        assert.equal(body.node_id, c.nodeId)
        assert.equal(body.subprotocol, 2)
        assert.deepEqual(body.action, { type: 'order/buy', order: 1, item: 'book' })
        assert.equal(body.meta.id, meta.id)
        assert.equal(typeof body.meta.time, 'number')
        assert.equal(typeof body.meta.added, 'number')
        assert.deepEqual(body.meta.channels, ['orders/1'])
        assert.equal(backend.state.charges.get(1), 1, 'charged once')

        let access = backend.state.requests.filter(r => r.hook === 'access')
        assert.ok(
          access.some(r => r.body.action.type === 'logux/subscribe' && r.body.action.channel === 'orders/1'),
          'the channel access hook was asked about the subscription'
        )
        assert.ok(
          access.some(r => r.body.action.type === 'order/buy' && r.body.meta.id === meta.id),
          'the type access hook was asked about the order'
        )
        assert.equal(c.client.state, 'synchronized')
      })
    )

    test(
      'b offline client restarted once, Ferry SIGKILLed mid-retry: processed and paid once, charged once',
      ONLY_FERRY,
      scenario({}, async (t, { backend, srv, api }) => {
        let order = 2
        let store = new MemoryStore()

        // First life: the app adds the order while offline and is closed
        // before it ever connects.
        let a = ownedClient(t, transport, srv.port, { userId: '10', store })
        a.client.sync({ type: 'logux/subscribe', channel: `orders/${order}` }).catch(() => {})
        let meta = {}
        a.client.sync({ type: 'order/buy', order, item: 'lamp' }, meta).catch(() => {})
        await until(() => a.added.some(e => e.meta.id === meta.id), { what: 'the order in the log' })
        let { clientId, tabId } = a.client
        a.destroy()

        // The back-end fails every call for now.
        backend.behaviour.failNext.process = 1e9

        // Second life: the same store and node id; the queued order goes out.
        let b = ownedClient(t, transport, srv.port, { userId: '10', store })
        adoptIds(b, clientId, tabId)
        b.start()
        await b.waitState('synchronized')
        await b.subscribe(`orders/${order}`)
        await until(() => backend.processCalls(order).length >= 2, {
          what: 'Ferry to retry process at least once',
          describe: () => backend.explain()
        })
        assert.deepEqual(answers(b, meta.id), [], 'no answer while the back-end fails')

        // Crash Ferry mid-retry; the back-end is down while Ferry comes back.
        let killed = await srv.kill()
        assert.equal(killed.signal, 'SIGKILL')
        let callsBeforeRestart = backend.processCalls(order).length
        await backend.down()
        backend.behaviour.failNext.process = 0
        // The first successful call charges and writes, then its answer is lost,
        // as if the back-end crashed right after the charge: Ferry calls again.
        backend.behaviour.loseAfterWork.process = 1
        await srv.start()
        await delay(600)
        await backend.up()

        await until(() => answers(b, meta.id).length > 0, {
          timeout: 20_000,
          what: `logux/processed for ${meta.id} after the restart`,
          describe: () => b.explain() + '\n' + backend.explain()
        })
        await b.waitReceived('order/status', 1, { filter: x => x.order === order && x.status === 'paid', timeout: 10_000 })
        await delay(500)

        assert.deepEqual(answers(b, meta.id).map(e => e.action.type), ['logux/processed'], 'processed once, never undone')
        assert.equal(statuses(b, order, 'paid').length, 1, 'paid exactly once in the client log')
        assert.equal(statuses(b, order, 'processing').length, 1, 'processing exactly once in the client log')
        assert.ok(backend.processCalls(order).length > callsBeforeRestart, 'Ferry called process again after the restart')
        for (let call of backend.processCalls(order)) {
          assert.equal(call.headers['idempotency-key'], meta.id, 'every delivery has the same key')
        }
        assert.equal(backend.state.lostAnswers, 1)
        assert.ok(backend.state.duplicates >= 1, 'the back-end saw the order delivered again after its charge')
        assert.equal(backend.state.charges.get(order), 1, 'charged exactly once')

        // The order and both statuses are stored once each, and the events
        // hook got all of them, in order (at least once across the crash).
        let stored = await assertEventsCover(backend, api, `orders/${order}`)
        assert.deepEqual(
          stored.map(e => (e.action.type === 'order/status' ? e.action.status : e.action.type)),
          ['order/buy', 'processing', 'paid']
        )
      })
    )

    test(
      'c back-end down for a while, then up: process is retried and the order processed',
      ONLY_FERRY,
      scenario(
        {
          types: [{ ...RETAIL_TYPES[0], hooks: ['process'] }, ...RETAIL_TYPES.slice(1)],
          channels: [{ ...RETAIL_CHANNELS[0], hooks: ['events'] }, ...RETAIL_CHANNELS.slice(1)]
        },
        async (t, { backend, srv, api }) => {
          let order = 3
          await backend.down()
          let c = await connectedClient(t, transport, srv.port, { userId: '10' })
          await c.subscribe(`orders/${order}`)
          let meta = {}
          let result = settle(c.sync({ type: 'order/buy', order, item: 'chair' }, meta, 30_000))

          // Actions without hooks go on while the back-end is down.
          await c.sync({ type: 'room/message', room: 'lobby', text: 'meanwhile' })
          await delay(1000)
          assert.deepEqual(answers(c, meta.id), [], 'not processed while the back-end is down')

          await backend.up()
          let { status, reason } = await result
          assert.equal(status, 'fulfilled', `processed after the back-end came up: ${reason?.stack}`)
          await c.waitReceived('order/status', 1, { filter: x => x.order === order && x.status === 'paid' })
          await delay(300)
          assert.equal(statuses(c, order, 'paid').length, 1)
          assert.equal(backend.state.charges.get(order), 1)
          await assertEventsCover(backend, api, `orders/${order}`)
        }
      )
    )

    test(
      'c back-end slower than timeout_ms: the call is repeated and the order charged once',
      ONLY_FERRY,
      scenario(
        {
          backendKeys: { timeout_ms: 500 },
          types: [{ ...RETAIL_TYPES[0], hooks: ['process'] }, ...RETAIL_TYPES.slice(1)]
        },
        async (t, { backend, srv }) => {
          let order = 33
          backend.behaviour.delayMs.process = 1200
          let c = await connectedClient(t, transport, srv.port, { userId: '10' })
          let meta = {}
          let result = settle(c.sync({ type: 'order/buy', order, item: 'desk' }, meta, 30_000))
          await until(() => backend.processCalls(order).length >= 1, { what: 'the first process call' })
          // Later calls are answered at once; the first one is still sleeping.
          backend.behaviour.delayMs.process = 0
          let { status, reason } = await result
          assert.equal(status, 'fulfilled', `processed: ${reason?.stack}`)
          await delay(1500) // the first, timed-out call finishes too
          assert.ok(backend.processCalls(order).length >= 2, 'the timed-out call was repeated')
          assert.ok(backend.state.duplicates >= 1, 'the back-end saw the repeat')
          assert.equal(backend.state.charges.get(order), 1, 'charged once')
          assert.deepEqual(answers(c, meta.id).map(e => e.action.type), ['logux/processed'])
        }
      )
    )

    test(
      'e failed process: the author gets logux/undo outOfStock, a subscriber the undo, and the answer actions once',
      ONLY_FERRY,
      scenario({}, async (t, { backend, srv }) => {
        let order = 5
        backend.behaviour.outOfStock.add(order)
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        let watcher = await connectedClient(t, transport, srv.port, { userId: '20' })
        await c.subscribe(`orders/${order}`)
        await watcher.subscribe(`orders/${order}`)

        let meta = {}
        let undo = await assertUndo(c.sync({ type: 'order/buy', order, item: 'vase' }, meta, 20_000), 'outOfStock')
        assert.equal(undo.id, meta.id)

        await c.waitReceived('order/status', 1, { filter: x => x.order === order })
        // The order reached the channel at once; its undo follows it there.
        await watcher.waitReceived('order/buy', 1, { filter: x => x.order === order })
        await watcher.waitReceived('logux/undo', 1, { filter: x => x.id === meta.id })
        await delay(300)
        assert.deepEqual(
          statuses(c, order).map(e => e.action.status),
          ['outOfStock'],
          'the actions of the failed answer, once'
        )
        assert.deepEqual(answers(c, meta.id).map(e => e.action.type), ['logux/undo'])
        assert.equal(watcher.received('logux/undo').filter(e => e.action.id === meta.id).length, 1)
        assert.equal(backend.state.charges.get(order) ?? 0, 0, 'not charged')
        assert.equal(backend.processCalls(order).length, 1)
      })
    )

    test(
      'f access hook: denied and not_found become logux/undo; order/status is server-only; the events hook gets the channel in order',
      ONLY_FERRY,
      scenario({ backendKeys: { events_batch_max: 2 } }, async (t, { backend, srv, api }) => {
        backend.behaviour.deniedUsers.add('20')
        backend.behaviour.deniedChannels.add('orders/66')
        backend.behaviour.notFoundChannels.add('orders/404')
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        let denied = await connectedClient(t, transport, srv.port, { userId: '20' })

        // Denied by the hook.
        let deniedMeta = {}
        await assertUndo(denied.sync({ type: 'order/buy', order: 6, item: 'rug' }, deniedMeta), 'denied')
        await assertUndo(denied.subscribe('orders/6'), 'denied')
        await assertUndo(c.subscribe('orders/66'), 'denied')
        await assertUndo(c.subscribe('orders/404'), 'notFound')
        // Denied by the static rule (nobody): the hook is not asked.
        let accessBefore = backend.state.calls.access
        await assertUndo(c.sync({ type: 'order/status', order: 6, status: 'paid' }), 'denied')
        assert.equal(backend.state.calls.access, accessBefore, 'a static denial does not reach the hook')
        assert.equal(backend.state.requests.filter(r => r.hook === 'process').length, 0, 'nothing denied was processed')

        // Allowed: three orders in one channel; the events hook sees them all.
        await c.subscribe('orders/6')
        for (let i = 0; i < 3; i++) {
          await c.sync({ type: 'order/buy', order: 6, item: `item ${i}` }, {}, 20_000)
        }
        await c.waitReceived('order/status', 2, { filter: x => x.order === 6 })
        let stored = await assertEventsCover(backend, api, 'orders/6')
        assert.equal(stored.filter(e => e.action.type === 'order/buy').length, 3, 'the denied order was not stored')
        assert.ok(
          backend.events().every(e => e.meta.id !== deniedMeta.id),
          'the denied order never reached the events hook'
        )
        assert.ok(
          backend.state.eventBatches.every(batch => batch.length >= 1 && batch.length <= 2),
          `events_batch_max = 2: batch sizes ${JSON.stringify(backend.state.eventBatches.map(b => b.length))}`
        )
        let events = backend.events()
        for (let e of events) {
          assert.equal(typeof e.added, 'number')
          assert.equal(typeof e.action?.type, 'string')
        }

        // A back-end that is down turns an access hook into logux/undo error.
        await backend.down()
        await assertUndo(c.sync({ type: 'order/buy', order: 6, item: 'late' }), 'error')
        assert.equal(c.client.state, 'synchronized', 'the connection stays up')
      })
    )

    test(
      'process past process_deadline_ms ends in logux/undo error',
      ONLY_FERRY,
      scenario({ backendKeys: { process_deadline_ms: 1500 } }, async (t, { backend, srv }) => {
        backend.behaviour.failNext.process = 1e9
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        let started = Date.now()
        await assertUndo(c.sync({ type: 'order/buy', order: 8, item: 'clock' }, {}, 20_000), 'error')
        let elapsed = Date.now() - started
        assert.ok(elapsed >= 1400, `undone only after the deadline (${elapsed} ms)`)
        assert.ok(backend.processCalls(8).length >= 3, 'retried until the deadline')
        assert.equal(backend.state.charges.get(8) ?? 0, 0)
      })
    )

    test(
      'l one client’s orders are processed in the order sent, none lost: 20 pipelined, then 20 one at a time',
      ONLY_FERRY,
      scenario(
        { types: [{ ...RETAIL_TYPES[0], hooks: ['process'] }, ...RETAIL_TYPES.slice(1)] },
        async (t, { backend, srv }) => {
          let c = await connectedClient(t, transport, srv.port, { userId: '10' })
          let ids = []
          let pipelined = []
          for (let i = 0; i < 20; i++) {
            let meta = {}
            pipelined.push(c.sync({ type: 'order/buy', order: 100 + i, item: 'bulk' }, meta, 30_000))
            ids.push(meta.id)
          }
          let first = await Promise.all(pipelined.map(settle))
          assert.deepEqual(first.map(r => r.status), Array(20).fill('fulfilled'), 'all 20 pipelined orders processed')
          for (let i = 20; i < 40; i++) {
            let meta = {}
            let r = await settle(c.sync({ type: 'order/buy', order: 100 + i, item: 'one by one' }, meta, 10_000))
            ids.push(meta.id)
            assert.equal(r.status, 'fulfilled', `order ${i} processed: ${r.reason?.message}`)
          }
          let calls = backend.state.requests.filter(r => r.hook === 'process')
          let firstCalls = []
          for (let call of calls) {
            if (!firstCalls.includes(call.headers['idempotency-key'])) firstCalls.push(call.headers['idempotency-key'])
          }
          assert.deepEqual(firstCalls, ids, 'process calls in the order the client sent the actions')
          for (let i = 0; i < 40; i++) assert.equal(backend.state.charges.get(100 + i), 1, `order ${i} charged once`)
        }
      )
    )

    test(
      'm a slow back-end holds up only that client’s order: another client’s order and plain actions go on',
      ONLY_FERRY,
      scenario(
        { types: [{ ...RETAIL_TYPES[0], hooks: ['process'] }, ...RETAIL_TYPES.slice(1)] },
        async (t, { backend, srv }) => {
          backend.behaviour.slowOrders.set(20, 1500)
          let a = await connectedClient(t, transport, srv.port, { userId: '10' })
          let b = await connectedClient(t, transport, srv.port, { userId: '20' })
          let done = []
          let slow = a.sync({ type: 'order/buy', order: 20, item: 'slow' }, {}, 20_000).then(() => done.push('a slow'))
          await until(() => backend.processCalls(20).length === 1, { what: 'the slow call to start' })
          await a.sync({ type: 'room/message', room: 'side', text: 'not held up' })
          done.push('a plain')
          await b.sync({ type: 'order/buy', order: 21, item: 'fast' }, {}, 20_000)
          done.push('b fast')
          await slow
          assert.deepEqual(done, ['a plain', 'b fast', 'a slow'])
          assert.equal(backend.processCalls(20).length, 1, 'the slow call was not repeated (within timeout_ms)')
          assert.equal(a.client.state, 'synchronized')
        }
      )
    )

    test(
      'k actions added by the server API reach clients under their stored Logux id, the same on every connection',
      ONLY_FERRY,
      scenario({}, async (t, { srv, api }) => {
        let order = 12
        let first = await connectedClient(t, transport, srv.port, { userId: '10' })
        await first.subscribe(`orders/${order}`)
        await delay(50) // another connection time, so another protocol-5 baseTime
        let second = await connectedClient(t, transport, srv.port, { userId: '20' })
        await second.subscribe(`orders/${order}`)
        let res = await api('POST', '/api/v1/actions', {
          actions: [{ id: `order-${order}-paid`, action: { type: 'order/status', order, status: 'paid' }, channels: [`orders/${order}`] }]
        })
        assert.equal(res.status, 200, res.text)
        let [stored] = await readChannel(api, `orders/${order}`)
        let [a] = await first.waitReceived('order/status', 1)
        let [b] = await second.waitReceived('order/status', 1)
        // A client de-duplicates by meta.id (a re-delivery after a reconnect is
        // dropped only if it has the same id), and Logux ids are
        // "<ms> <node id> <integer seq>": @logux/core 0.10 sends them as
        // [ms - baseTime, node id, seq] and rebuilds them from that array.
        assert.equal(a.meta.id, stored.meta.id, 'the first client has the stored id')
        assert.equal(b.meta.id, stored.meta.id, 'the second client has the stored id')
      })
    )
  })
}

// ---------------------------------------------------------------------------
// Server-side behaviour that does not depend on the client transport.

describe('backend hooks: server API and signatures', () => {
  test(
    'd the server API refuses wrong signatures with 401 and stores nothing; a right one stores once',
    ONLY_FERRY,
    scenario({}, async (t, { api, srv }) => {
      let order = 9
      let action = {
        id: `order-${order}-paid`,
        action: { type: 'order/status', order, status: 'paid' },
        channels: [`orders/${order}`],
        users: [],
        clients: [],
        nodes: []
      }
      let body = JSON.stringify({ actions: [action] })
      let refusals = {
        'signed with another secret': await api('POST', '/api/v1/actions', body, { secret: WRONG_SECRET }),
        'a signature of another body': await api('POST', '/api/v1/actions', body, {
          signature: sign(SECRET, Date.now(), '{"actions":[]}')
        }),
        'a timestamp 10 minutes old': await api('POST', '/api/v1/actions', body, { timestamp: Date.now() - 10 * 60_000 }),
        'a malformed signature': await api('POST', '/api/v1/actions', body, { signature: 'v1=zz' }),
        'a wrong bearer token': await api('POST', '/api/v1/actions', body, { auth: 'bearer', secret: WRONG_SECRET }),
        'no credentials': await api('POST', '/api/v1/actions', body, { auth: 'none' }),
        'GET without credentials': await api('GET', `/api/v1/channel?name=orders/${order}&since=0&limit=10`, undefined, {
          auth: 'none'
        })
      }
      for (let [what, res] of Object.entries(refusals)) {
        assert.equal(res.status, 401, `${what}: expected 401, got ${res.status} ${res.text}`)
        assert.equal(typeof res.body?.error, 'string', `${what}: {"error": ...} body, got ${res.text}`)
      }
      assert.deepEqual(await readChannel(api, `orders/${order}`), [], 'nothing was stored')

      // A subscriber sees what the API adds.
      let c = await connectedClient(t, transports[0], srv.port, { userId: '10' })
      await c.subscribe(`orders/${order}`)

      let first = await api('POST', '/api/v1/actions', body)
      assert.equal(first.status, 200, first.text)
      assert.equal(first.body.results.length, 1)
      assert.equal(first.body.results[0].id, action.id)
      assert.equal(first.body.results[0].duplicate, false)
      assert.equal(typeof first.body.results[0].added, 'number')
      let again = await api('POST', '/api/v1/actions', body, { auth: 'bearer' })
      assert.equal(again.status, 200, again.text)
      assert.equal(again.body.results[0].duplicate, true, 'the same id again is a duplicate')

      let stored = await readChannel(api, `orders/${order}`)
      assert.equal(stored.length, 1, 'stored once')
      assert.deepEqual(stored[0].action, action.action)
      assert.equal(stored[0].added, first.body.results[0].added)
      assert.equal(stored[0].meta.id, '0 server:api:order-9-paid 0', 'the Logux id of an API action')
      let bearerRead = await api('GET', `/api/v1/channel?name=orders/${order}&since=0&limit=10`, undefined, {
        auth: 'bearer'
      })
      assert.equal(bearerRead.status, 200, bearerRead.text)

      await c.waitReceived('order/status', 1)
      await delay(300)
      assert.equal(statuses(c, order).length, 1, 'the subscriber got it once')
      assert.equal(c.received('order/status')[0].meta.id, stored[0].meta.id, 'the client has the stored id')

      let missing = await api('GET', '/api/v1/state?key=nothing/here')
      assert.equal(missing.status, 404, missing.text)
      let bad = await api('POST', '/api/v1/actions', { actions: [{ ...action, id: 'has space' }] })
      assert.equal(bad.status, 400, `an id with a space: ${bad.text}`)
    })
  )

  test(
    'd a Ferry with the wrong secret gets 401 from the back-end, keeps the task, and processes it once fixed',
    ONLY_FERRY,
    scenario(
      {
        ferrySecret: WRONG_SECRET,
        types: [{ ...RETAIL_TYPES[0], hooks: ['process'] }, ...RETAIL_TYPES.slice(1)],
        channels: [{ ...RETAIL_CHANNELS[0], hooks: [] }, ...RETAIL_CHANNELS.slice(1)]
      },
      async (t, { backend, srv, writeConfig }) => {
        let order = 10
        let c = await connectedClient(t, transports[0], srv.port, { userId: '10' })
        let meta = {}
        let result = settle(c.sync({ type: 'order/buy', order, item: 'mirror' }, meta, 30_000))
        await until(() => (backend.state.unauthorizedByHook.process ?? 0) >= 3, {
          what: 'three refused process calls',
          describe: () => backend.explain()
        })
        assert.equal(backend.state.calls.process, 0, 'no call got through')
        assert.deepEqual(answers(c, meta.id), [], 'neither processed nor undone')
        assert.equal(backend.state.charges.size, 0)

        // Fixed configuration, graceful restart: the stored task is processed.
        await writeConfig(SECRET)
        await srv.restart()
        let { status, reason } = await result
        assert.equal(status, 'fulfilled', `processed after the fix: ${reason?.stack}`)
        assert.equal(backend.state.charges.get(order), 1)
        assert.deepEqual(answers(c, meta.id).map(e => e.action.type), ['logux/processed'])
      }
    )
  )

  // Connection headers and cookies named by a rule reach its hooks; the auth
  // hook decides about connections. WebSocket only: it can set headers.
  const deviceWs = {
    ...transports.find(x => x.name === 'ws'),
    name: 'ws with headers',
    connection: url =>
      new WsConnection(url, WebSocket, {
        headers: { 'X-Device': 'phone-7', 'X-Other': 'hidden', Cookie: 'session=s3cr3t; theme=dark' }
      })
  }

  test(
    'g headers and cookies listed by the rule are sent with its hooks, others are not',
    ONLY_FERRY,
    scenario(
      {
        types: [
          { ...RETAIL_TYPES[0], hooks: ['access', 'process'], headers: ['x-device'], cookies: ['session'] },
          ...RETAIL_TYPES.slice(1)
        ]
      },
      async (t, { backend, srv }) => {
        let c = await connectedClient(t, deviceWs, srv.port, { userId: '10' })
        await c.sync({ type: 'order/buy', order: 11, item: 'pen' }, {}, 20_000)
        let hooks = backend.state.requests.filter(r => r.body.action?.type === 'order/buy')
        assert.deepEqual(hooks.map(r => r.hook).sort(), ['access', 'process'])
        for (let r of hooks) {
          assert.deepEqual(r.body.headers, { 'x-device': 'phone-7' }, `${r.hook}: headers`)
          assert.deepEqual(r.body.cookies, { session: 's3cr3t' }, `${r.hook}: cookies`)
        }
        // The channel rule lists none.
        await c.subscribe('orders/11')
        let sub = backend.state.requests.find(r => r.hook === 'access' && r.body.action.type === 'logux/subscribe')
        assert.deepEqual(sub.body.headers, {})
        assert.deepEqual(sub.body.cookies, {})
      }
    )
  )

  test(
    'i auth hook: allowed connects, denied gets wrong-credentials, a down back-end makes the client retry',
    ONLY_FERRY,
    scenario(
      { auth: null, backendKeys: { auth: true, auth_headers: ['x-device'], auth_cookies: ['session'] } },
      async (t, { backend, srv }) => {
        backend.behaviour.tokens = { 30: 'backend-30' }
        let ok = await connectedClient(t, deviceWs, srv.port, { userId: '30', token: 'backend-30' })
        let auth = backend.state.requests.filter(r => r.hook === 'auth')
        assert.equal(auth.length, 1)
        assert.equal(auth[0].body.user_id, '30')
        assert.equal(auth[0].body.token, 'backend-30')
        assert.equal(auth[0].body.node_id, ok.nodeId)
        assert.equal(auth[0].body.subprotocol, 2)
        assert.deepEqual(auth[0].body.headers, { 'x-device': 'phone-7' })
        assert.deepEqual(auth[0].body.cookies, { session: 's3cr3t' })

        let refused = testClient(t, transports[0], srv.port, { userId: '31', token: 'nope' })
        await until(() => refused.errors.some(e => e.type === 'wrong-credentials'), {
          what: 'wrong-credentials',
          describe: () => refused.explain()
        })

        await backend.down()
        let later = testClient(t, transports[0], srv.port, { userId: '30', token: 'backend-30' })
        await until(() => later.attempts >= 2, {
          timeout: 5000,
          what: 'the client to retry while the back-end is down',
          describe: () => later.explain()
        })
        assert.ok(
          !later.errors.some(e => e.type === 'wrong-credentials'),
          'a down back-end is not a wrong token'
        )
        await backend.up()
        await later.waitState('synchronized')
        assert.equal(ok.client.state, 'synchronized', 'connected clients are not affected')
      }
    )
  )

  test(
    'j load hook answers a subscription without storing; resend hook replaces the rule templates',
    ONLY_FERRY,
    scenario(
      {
        types: [...RETAIL_TYPES, { type: 'note/add', access: 'anyone', resend: ['room/never'], hooks: ['resend'] }],
        channels: [...RETAIL_CHANNELS, { pattern: 'catalog/:id', access: 'anyone', hooks: ['load'] }]
      },
      async (t, { backend, srv, api }) => {
        backend.behaviour.loadActions = action => [
          { id: `${action.channel}-item-1`, action: { type: 'catalog/item', channel: action.channel, n: 1 } },
          { id: `${action.channel}-item-2`, action: { type: 'catalog/item', channel: action.channel, n: 2 } }
        ]
        backend.behaviour.resend = action => ({ channels: [`room/${action.room}`] })
        let c = await connectedClient(t, transports[0], srv.port, { userId: '10' })
        let subMeta = {}
        await c.sync({ type: 'logux/subscribe', channel: 'catalog/1' }, subMeta)
        let items = c.received('catalog/item')
        assert.deepEqual(items.map(e => e.action.n), [1, 2], 'the load actions, before processed')
        let processedAt = c.added.findIndex(e => e.action.type === 'logux/processed' && e.action.id === subMeta.id)
        assert.ok(c.added.indexOf(items[1]) < processedAt, 'sent before the logux/processed')
        assert.deepEqual(await readChannel(api, 'catalog/1'), [], 'load actions are not stored')

        let r = await connectedClient(t, transports[0], srv.port, { userId: '20' })
        await r.subscribe('room/notes')
        let never = await connectedClient(t, transports[0], srv.port, { userId: '20' })
        await never.subscribe('room/never')
        await c.sync({ type: 'note/add', room: 'notes', text: 'hello' })
        await r.waitReceived('note/add', 1)
        await delay(300)
        assert.equal(never.received('note/add').length, 0, 'the hook replaced the rule’s resend')
        assert.equal(backend.state.calls.resend, 1)
      }
    )
  )
})
