// Cluster mode (Ferry): unchanged @logux/client clients on two Ferry nodes that share one
// log on a JetStream stream of a real 3-node NATS cluster (lib/nats.mjs, loopback only).
//
// One NATS cluster serves the whole file; every test starts its own two Ferry nodes on a
// stream of its own (so no test sees another's log) and stops them when it ends.
//
//   c1 two clients on different nodes see each other's actions exactly once, in order,
//      and every sync() resolves with logux/processed
//   c2 a client on node 2 goes offline, actions are added through node 1, and it comes
//      back through node 1 with the same MemoryStore and node id: exactly what it missed
//      a) the same Client object behind a loopback TCP "load balancer" that now routes to
//         node 1 (the client re-subscribes by itself, with `since`)
//      b) a new Client on node 1's URL with the kept MemoryStore and the same node id
//         (as after a page reload), subscribing with the `since` the first Client kept

import assert from 'node:assert/strict'
import net from 'node:net'
import { after, before, describe, test } from 'node:test'

import { MemoryStore } from '@logux/core'

import { TestClient, testClient } from '../lib/clients.mjs'
import { startNatsCluster } from '../lib/nats.mjs'
import { HOST, startServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, FERRY_ONLY, uniq, until } from '../lib/util.mjs'

const NATS_NODES = 3
const FERRY_NODES = 2

/** The `[cluster]` section of a node on `nats` with `stream`. */
function clusterToml(nats, stream) {
  let urls = nats.urls.map(url => JSON.stringify(url)).join(', ')
  return [
    '[cluster]',
    `nats_urls = [${urls}]`,
    `stream = ${JSON.stringify(stream)}`,
    `replicas = ${Math.min(3, nats.urls.length)}`
  ].join('\n')
}

/**
 * Starts `count` Ferry nodes on `nats` sharing a new stream, each waited for on /ready
 * (connected to NATS and applying the stream), stopped when the test ends.
 */
async function startNodes(t, nats, count = FERRY_NODES) {
  let stream = uniq('compat_')
  let nodes = []
  t.after(() => Promise.all(nodes.map(node => node.stop())))
  for (let i = 0; i < count; i++) {
    let node = await startServer({ extraToml: clusterToml(nats, stream), readyPath: '/ready' })
    nodes.push(node)
  }
  return { nodes, stream }
}

/** Wraps a test body: a failure carries every Ferry node's output and the NATS log tails. */
function withCluster(getNats, body) {
  return async t => {
    let nats = getNats()
    let ctx = { nodes: [] }
    try {
      ctx = await startNodes(t, nats)
      await body(t, { ...ctx, nats })
    } catch (e) {
      if (e && typeof e === 'object') {
        let logs = ctx.nodes.map((node, i) => `ferry node ${i + 1}:\n${node.tail(6_000)}`).join('\n')
        try {
          e.message = `${e.message}\n${logs}\n${nats.logTails()}`
        } catch {}
      }
      throw e
    } finally {
      if (process.env.COMPAT_SHOW_SERVER_LOG) {
        ctx.nodes.forEach((node, i) => console.log(`ferry node ${i + 1}:\n${node.tail(200_000)}`))
      }
    }
  }
}

/**
 * A loopback TCP proxy standing in for a load balancer in front of the nodes: new
 * connections go to `target`; switchTo(port) routes new ones elsewhere and cuts the old
 * ones (as when the node behind the balancer changes).
 */
class SwitchProxy {
  constructor(target) {
    this.target = target
    this.pairs = new Set()
    this.server = net.createServer(socket => this.accept(socket))
  }

  static async start(target) {
    let proxy = new SwitchProxy(target)
    await new Promise((resolve, reject) => {
      proxy.server.once('error', reject)
      proxy.server.listen(0, HOST, resolve)
    })
    proxy.port = proxy.server.address().port
    return proxy
  }

  accept(socket) {
    let upstream = net.connect(this.target, HOST)
    let pair = [socket, upstream]
    this.pairs.add(pair)
    let end = () => {
      this.pairs.delete(pair)
      socket.destroy()
      upstream.destroy()
    }
    for (let s of pair) {
      s.on('error', end)
      s.on('close', end)
    }
    socket.pipe(upstream)
    upstream.pipe(socket)
  }

  cutAll() {
    for (let [a, b] of [...this.pairs]) {
      a.destroy()
      b.destroy()
    }
    this.pairs.clear()
  }

  switchTo(target) {
    this.target = target
    this.cutAll()
  }

  close() {
    this.cutAll()
    return new Promise(resolve => this.server.close(() => resolve()))
  }
}

/** How many times a room/message with `text` came to `c` in a `sync` frame (wire level). */
function wireCount(c, text) {
  let count = 0
  for (let msg of c.incoming) {
    if (msg[0] !== 'sync') continue
    for (let i = 2; i < msg.length; i += 2) {
      if (msg[i] && msg[i].type === 'room/message' && msg[i].text === text) count += 1
    }
  }
  return count
}

/** The texts of the room/message actions of `room` that `c` received from others, in order. */
function texts(c, room) {
  return c.received('room/message').filter(e => e.action.room === room).map(e => e.action.text)
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

/** The id of the action `c` added last with `text`. */
function ownId(c, text) {
  let entry = c.added.find(e => e.action.type === 'room/message' && e.action.text === text)
  assert.ok(entry, `${c.nodeId} logged its own action ${text}`)
  return entry.meta.id
}

/** Sends `count` room/messages from `c` one after another; returns their ids. */
async function sendSequential(c, room, prefix, count) {
  let ids = []
  for (let i = 0; i < count; i++) {
    let text = `${prefix} ${i}`
    let meta = await c.sync({ type: 'room/message', room, text })
    assert.equal(typeof meta.id, 'string', 'sync() resolved with logux/processed meta')
    ids.push(ownId(c, text))
  }
  return ids
}

describe('cluster (Ferry): two Ferry nodes on one NATS JetStream stream', FERRY_ONLY, () => {
  let nats = null
  before(async () => {
    nats = await startNatsCluster({ nodes: NATS_NODES })
  })
  after(async () => {
    if (nats) await nats.stop()
  })

  for (const transport of transports) {
    describe(transport.name, () => {
      test(
        'c1 clients on node 1 and node 2 see each other’s actions once, in order; every sync() is processed',
        { timeout: 60_000 },
        withCluster(() => nats, async (t, { nodes }) => {
          let room = uniq('r')
          let channel = `room/${room}`
          let a = testClient(t, transport, nodes[0].port, { userId: '10' })
          let b = testClient(t, transport, nodes[1].port, { userId: '20' })
          await a.waitState('synchronized')
          await b.waitState('synchronized')
          let aServer = a.client.node.remoteNodeId
          let bServer = b.client.node.remoteNodeId
          assert.notEqual(aServer, bServer, 'the clients are on two different Ferry nodes')
          await a.subscribe(channel)
          await b.subscribe(channel)

          // Ping-pong: each action is seen by the other before it answers (total order).
          let expected = []
          for (let i = 0; i < 5; i++) {
            let text = `ping ${i}`
            await a.sync({ type: 'room/message', room, text })
            await b.waitReceived('room/message', i + 1, { filter: x => x.room === room })
            expected.push(text)
            text = `pong ${i}`
            await b.sync({ type: 'room/message', room, text })
            await a.waitReceived('room/message', i + 1, { filter: x => x.room === room })
          }

          // Pipelined from both sides at once: 15 each, every sync() resolves.
          let N = 15
          let sends = []
          for (let i = 0; i < N; i++) {
            sends.push(a.sync({ type: 'room/message', room, text: `a ${i}` }, undefined, 20_000))
            sends.push(b.sync({ type: 'room/message', room, text: `b ${i}` }, undefined, 20_000))
          }
          let metas = await Promise.all(sends)
          assert.equal(metas.length, 2 * N, 'every sync() resolved with logux/processed')

          await a.waitReceived('room/message', 5 + N, { filter: x => x.room === room, timeout: 20_000 })
          await b.waitReceived('room/message', 5 + N, { filter: x => x.room === room, timeout: 20_000 })
          await delay(700) // a duplicate or an echo would arrive by now

          let pings = Array.from({ length: 5 }, (_, i) => `ping ${i}`)
          let pongs = Array.from({ length: 5 }, (_, i) => `pong ${i}`)
          let as = Array.from({ length: N }, (_, i) => `a ${i}`)
          let bs = Array.from({ length: N }, (_, i) => `b ${i}`)
          assert.deepEqual(texts(b, room), [...pings, ...as], 'B got A’s actions once each, in A’s order')
          assert.deepEqual(texts(a, room), [...pongs, ...bs], 'A got B’s actions once each, in B’s order')

          // The same ids on both sides, and exactly once on the wire; no echo of one's own.
          for (let [author, reader, list] of [
            [a, b, [...pings, ...as]],
            [b, a, [...pongs, ...bs]]
          ]) {
            for (let text of list) {
              assert.equal(wireCount(reader, text), 1, `${text} reached ${reader.nodeId} once on the wire`)
              assert.equal(wireCount(author, text), 0, `${text} was not echoed to its author`)
              let got = reader.received('room/message').find(e => e.action.text === text)
              assert.equal(got.meta.id, ownId(author, text), `${text} has its author’s id`)
            }
          }
          // One logux/processed per own action (and per subscribe), none undone.
          for (let c of [a, b]) {
            let own = c.added.filter(e => e.action.type === 'room/message' && e.meta.id.includes(' ' + c.nodeId + ' '))
            let processed = new Set(c.received('logux/processed').map(e => e.action.id))
            for (let e of own) assert.ok(processed.has(e.meta.id), `processed ${e.action.text}`)
            assert.deepEqual(c.received('logux/undo'), [], `${c.nodeId} got no undo`)
            assert.deepEqual(c.errors.map(e => e.message), [], `${c.nodeId} got no error`)
          }
        })
      )

      test(
        'c2a a client moves from node 2 to node 1 behind a load balancer: the same Client gets exactly what it missed',
        { timeout: 60_000 },
        withCluster(() => nats, async (t, { nodes }) => {
          let room = uniq('r')
          let channel = `room/${room}`
          let proxy = await SwitchProxy.start(nodes[1].port)
          t.after(() => proxy.close())
          let a = testClient(t, transport, nodes[0].port, { userId: '10' })
          let store = new MemoryStore()
          let b = testClient(t, transport, proxy.port, { userId: '20', store })
          await a.waitState('synchronized')
          await b.waitState('synchronized')
          let firstServer = b.client.node.remoteNodeId
          assert.notEqual(firstServer, a.client.node.remoteNodeId, 'B starts on node 2')
          await b.subscribe(channel)

          let live = await sendSequential(a, room, 'live', 3)
          await b.waitReceived('room/message', 3, { filter: x => x.room === room })

          b.connection.disconnect()
          await b.waitState('disconnected')
          proxy.switchTo(nodes[0].port)
          await delay(200)
          let missed = await sendSequential(a, room, 'missed', 6)

          b.connection.connect()
          await b.waitState('synchronized')
          assert.equal(b.client.node.remoteNodeId, a.client.node.remoteNodeId, 'B is on node 1 now')
          await b.waitReceived('room/message', 9, { filter: x => x.room === room, timeout: 15_000 })
          // One more live action through node 1 after the catch-up.
          let later = await sendSequential(a, room, 'after', 1)
          await b.waitReceived('room/message', 10, { filter: x => x.room === room, timeout: 15_000 })
          await delay(700)

          let got = b.received('room/message').filter(e => e.action.room === room)
          assert.deepEqual(
            got.map(e => e.action.text),
            ['live 0', 'live 1', 'live 2', ...missed.map((_, i) => `missed ${i}`), 'after 0'],
            'exactly the missed actions, in order, none twice'
          )
          assert.deepEqual(got.map(e => e.meta.id), [...live, ...missed, ...later], 'with A’s ids')
          for (let e of got) {
            assert.equal(wireCount(b, e.action.text), 1, `${e.action.text} came once on the wire`)
          }
          let resubscribe = b.added.find(e => e.action.type === 'logux/subscribe' && e.meta.resubscribe)
          assert.ok(resubscribe?.action.since, 'B re-subscribed by itself with since')
          assert.deepEqual(b.errors.map(e => e.message), [], 'B got no error')
        })
      )

      test(
        'c2b a client of node 2 comes back on node 1 with its MemoryStore and node id: exactly what it missed',
        { timeout: 60_000 },
        withCluster(() => nats, async (t, { nodes }) => {
          let room = uniq('r')
          let channel = `room/${room}`
          let a = testClient(t, transport, nodes[0].port, { userId: '10' })
          let store = new MemoryStore()
          let b1 = new TestClient(transport, nodes[1].port, { userId: '20', store })
          let b1Destroyed = false
          t.after(() => {
            if (!b1Destroyed) b1.destroy()
          })
          b1.start()
          await a.waitState('synchronized')
          await b1.waitState('synchronized')
          await b1.subscribe(channel)
          let live = await sendSequential(a, room, 'live', 3)
          await b1.waitReceived('room/message', 3, { filter: x => x.room === room })
          // What @logux/client itself would re-subscribe with: {id, time} of the
          // subscription's logux/processed (the server sends no meta.channels). Ferry
          // takes the later of that and the `synced` of the new connect.
          let since = b1.client.last[channel]
          assert.ok(since, 'the client keeps a since for the channel')
          let { clientId, tabId } = b1.client
          let synced = await store.getLastSynced()

          // B goes offline (the tab is closed); A writes meanwhile through node 1.
          b1.destroy()
          b1Destroyed = true
          await delay(200)
          let missed = await sendSequential(a, room, 'missed', 6)

          // Back on node 1: a new Client on the same store with the same node id.
          let b2 = testClient(t, transport, nodes[0].port, { userId: '20', store, start: false })
          adoptIds(b2, clientId, tabId)
          assert.equal(b2.nodeId, b1.nodeId)
          b2.start()
          await b2.waitState('synchronized')
          assert.equal(b2.client.node.remoteNodeId, a.client.node.remoteNodeId, 'on node 1')
          let connect = b2.trace.find(line => line.includes('C>S ["connect"'))
          assert.ok(connect.includes(`,${synced.received},`), `connect carries synced ${synced.received}: ${connect}`)
          await b2.subscribe(channel, { since })
          let later = await sendSequential(a, room, 'after', 1)
          await b2.waitReceived('room/message', 7, { filter: x => x.room === room, timeout: 15_000 })
          await delay(700)

          let got = b2.received('room/message').filter(e => e.action.room === room)
          assert.deepEqual(
            got.map(e => e.action.text),
            [...missed.map((_, i) => `missed ${i}`), 'after 0'],
            'exactly the missed actions (and the live one after), in order'
          )
          assert.deepEqual(got.map(e => e.meta.id), [...missed, ...later], 'with A’s ids')
          for (let i = 0; i < 3; i++) {
            assert.equal(wireCount(b2, `live ${i}`), 0, `live ${i} (seen on node 2) was not sent again`)
          }
          for (let e of got) {
            assert.equal(wireCount(b2, e.action.text), 1, `${e.action.text} came once on the wire`)
          }
          // The store holds every room action once.
          let stored = []
          await store.get({ order: 'added' }).then(async function walk(page) {
            stored.push(...page.entries)
            if (page.next) await page.next().then(walk)
          })
          let roomIds = stored.filter(([action]) => action.type === 'room/message').map(([, meta]) => meta.id)
          assert.equal(new Set(roomIds).size, roomIds.length, 'no action twice in the store')
          assert.deepEqual(b2.errors.map(e => e.message), [], 'B got no error')
        })
      )
    })
  }
})
