// Long-poll under faults: HTTP requests and responses are dropped or repeated
// by a fetch wrapper given to LongPollConnection, and nothing may be lost,
// duplicated or reordered. Also: WebSocket and long-poll clients in one room,
// Retry-After on a busy `open`, and a session closed under a Client.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { Reconnect, WsConnection } from '@logux/core'
import WebSocket from 'ws'

import { LongPollConnection } from '../../js-client-fixtures/long-poll-connection.mjs'
import { connectedClient, rawPeer } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { delay, until, uniq } from '../lib/util.mjs'

const ACTIONS = 50
/** Short retry pauses so that the many injected faults cost little time. */
const FAST_RETRIES = { retryDelaysMs: [20, 50] }

/**
 * A fetch that misbehaves by request number k (1, 2, 3, …):
 *   k % 7 == 0  the request is lost before it reaches the server;
 *   k % 4 == 0  the request reaches the server twice (at once), the client
 *               sees the second answer;
 *   k % 3 == 0  the answer is lost after the server handled the request.
 * `stats` counts what was done.
 */
function faultyFetch(stats) {
  let count = 0
  return async (url, init) => {
    count += 1
    let k = count
    stats.requests += 1
    if (k % 7 === 0) {
      stats.lostRequests += 1
      throw new TypeError('fetch failed (request lost by the test)')
    }
    let response
    if (k % 4 === 0) {
      stats.repeated += 1
      let first = fetch(url, init).then(r => r.text()).catch(() => {})
      response = await fetch(url, init)
      await first
    } else {
      response = await fetch(url, init)
    }
    if (k % 3 === 0) {
      stats.lostAnswers += 1
      await response.text().catch(() => {})
      throw new TypeError('fetch failed (answer lost by the test)')
    }
    return response
  }
}

function newStats() {
  return { requests: 0, lostRequests: 0, repeated: 0, lostAnswers: 0 }
}

/** A long-poll transport whose connections use `fetchImpl`. */
function longPoll(fetchImpl, opts = FAST_RETRIES) {
  return {
    name: 'long-poll (faulty)',
    url: port => 'http://127.0.0.1:' + port,
    connection: url => new LongPollConnection(url, { fetch: fetchImpl, ...opts }),
    sendText: (conn, text) => conn.sendText(text)
  }
}

const WS = {
  name: 'ws',
  url: port => 'ws://127.0.0.1:' + port + '/',
  connection: url => new WsConnection(url, WebSocket)
}

const LONG_POLL = longPoll((...args) => fetch(...args), {})

/** Reads one counter of the server's /metrics (0 when absent). */
async function metric(port, name, labels) {
  let text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text()
  let line = text.split('\n').find(l => l.startsWith(`${name}{${labels}}`))
  return line ? Number(line.split(' ').pop()) : 0
}

/** Every `sync` message number that `peer` got a `synced` for, in order. */
function syncedNumbers(peer) {
  return peer.messages.filter(m => m[0] === 'synced').map(m => m[1])
}

describe('long-poll faults', () => {
  test(
    `${ACTIONS} actions with lost and repeated requests and answers: each delivered once, in order (wire level)`,
    withServer(async (t, srv) => {
      let authorStats = newStats()
      let readerStats = newStats()
      let room = uniq('r')
      let channel = `room/${room}`
      let reader = await rawPeer(t, longPoll(faultyFetch(readerStats)), srv.port)
      await reader.handshake({ userId: '20' })
      reader.send(['sync', 1, { type: 'logux/subscribe', channel }, { id: 1, time: 1 }])
      await reader.waitProcessed(reader.ownId(1), 10_000)

      let author = await rawPeer(t, longPoll(faultyFetch(authorStats)), srv.port)
      await author.handshake({ userId: '10' })
      // Sent in small groups, so that they travel in many requests.
      for (let k = 0; k < ACTIONS; k++) {
        let n = k + 1
        author.send(['sync', n, { type: 'room/message', room, k }, { id: n, time: n }])
        if (k % 3 === 2) await delay(15)
      }
      for (let k = 0; k < ACTIONS; k++) await author.waitProcessed(author.ownId(k + 1), 20_000)
      await until(() => reader.actions().filter(e => e.action.type === 'room/message').length >= ACTIONS, {
        timeout: 20_000,
        what: `${ACTIONS} room/message at the reader`,
        describe: () => reader.explain()
      })
      await delay(300) // a duplicate would arrive by now

      let got = reader.actions().filter(e => e.action.type === 'room/message')
      assert.deepEqual(
        got.map(e => e.action.k),
        Array.from({ length: ACTIONS }, (_, k) => k),
        'the reader got each action exactly once, in order'
      )
      assert.deepEqual(
        got.map(e => e.meta.id),
        Array.from({ length: ACTIONS }, (_, k) => author.ownId(k + 1)),
        'with the author’s ids'
      )
      assert.deepEqual(
        syncedNumbers(author),
        Array.from({ length: ACTIONS }, (_, k) => k + 1),
        'one synced per sync, in order'
      )
      let processed = author.actions().filter(e => e.action.type === 'logux/processed')
      assert.equal(processed.length, ACTIONS, 'one logux/processed per action')
      assert.equal(new Set(processed.map(e => e.action.id)).size, ACTIONS)
      // A sync applied twice would be stored once but counted as a duplicate.
      assert.equal(await metric(srv.port, 'ferry_actions_received_total', 'outcome="duplicate"'), 0)
      assert.ok(!author.isClosed && !reader.isClosed, 'neither session had to reconnect')
      for (let stats of [authorStats, readerStats]) {
        assert.ok(stats.lostAnswers >= 3 && stats.repeated >= 3 && stats.lostRequests >= 2, JSON.stringify(stats))
      }
    })
  )

  test(
    `${ACTIONS} Client.sync calls with faults on both sides: ${ACTIONS} processed, the subscriber gets each once, in order`,
    withServer(async (t, srv) => {
      let room = uniq('r')
      let reader = await connectedClient(t, longPoll(faultyFetch(newStats())), srv.port, { userId: '20' })
      await reader.subscribe(`room/${room}`)
      let author = await connectedClient(t, longPoll(faultyFetch(newStats())), srv.port, { userId: '10' })
      let results = []
      for (let k = 0; k < ACTIONS; k++) {
        results.push(author.sync({ type: 'room/message', room, k }, {}, 20_000))
        if (k % 5 === 4) await delay(10)
      }
      await Promise.all(results)
      await reader.waitReceived('room/message', ACTIONS, { timeout: 20_000 })
      await delay(300)
      assert.deepEqual(
        reader.received('room/message').map(e => e.action.k),
        Array.from({ length: ACTIONS }, (_, k) => k)
      )
      // On the wire too: no frame reached the reader twice.
      let onWire = reader.incoming
        .filter(m => m[0] === 'sync')
        .flatMap(m => m.slice(2).filter((_, i) => i % 2 === 0))
        .filter(a => a.type === 'room/message')
      assert.equal(onWire.length, ACTIONS)
      assert.equal(await metric(srv.port, 'ferry_actions_received_total', 'outcome="duplicate"'), 0)
      assert.deepEqual(author.errors, [])
      assert.deepEqual(reader.errors, [])
    })
  )

  test(
    'a WebSocket client and a long-poll client in one room see each other’s actions',
    withServer(async (t, srv) => {
      let room = uniq('r')
      let overWs = await connectedClient(t, WS, srv.port, { userId: '10' })
      let overLp = await connectedClient(t, LONG_POLL, srv.port, { userId: '20' })
      await overWs.subscribe(`room/${room}`)
      await overLp.subscribe(`room/${room}`)
      await overWs.sync({ type: 'room/message', room, text: 'from ws' })
      await overLp.sync({ type: 'room/message', room, text: 'from long-poll' })
      let [fromWs] = await overLp.waitReceived('room/message', 1)
      let [fromLp] = await overWs.waitReceived('room/message', 1)
      assert.equal(fromWs.action.text, 'from ws')
      assert.equal(fromLp.action.text, 'from long-poll')
    })
  )

  test(
    'a 503 with Retry-After on open keeps the connection connecting that long, then Reconnect retries',
    withServer(async (t, srv) => {
      let opens = []
      let busyOnce = async (url, init) => {
        if (String(url).endsWith('/lp/open')) {
          opens.push(Date.now())
          if (opens.length === 1) {
            return new Response('{"error":"busy"}', { status: 503, headers: { 'Retry-After': '1' } })
          }
        }
        return fetch(url, init)
      }
      let events = []
      let connection = new LongPollConnection(`http://127.0.0.1:${srv.port}`, { fetch: busyOnce })
      for (let event of ['connecting', 'connect', 'disconnect']) {
        connection.on(event, () => events.push([event, Date.now()]))
      }
      let reconnect = new Reconnect(connection, { minDelay: 100, maxDelay: 300 })
      t.after(() => reconnect.destroy())
      reconnect.connect()
      await until(() => connection.connected, { timeout: 5000, what: 'the second open' })
      let disconnectAt = events.find(([e]) => e === 'disconnect')[1]
      assert.ok(disconnectAt - opens[0] >= 950, `disconnect ${disconnectAt - opens[0]} ms after the 503`)
      assert.ok(opens[1] - disconnectAt >= 90, 'Reconnect added its own delay')
      assert.deepEqual(
        events.map(([e]) => e),
        ['connecting', 'disconnect', 'connecting', 'connect']
      )
    })
  )

  test(
    'a Client whose session is closed under it reconnects and gets what it missed',
    withServer(async (t, srv) => {
      let room = uniq('r')
      let writer = await connectedClient(t, LONG_POLL, srv.port, { userId: '10' })
      let reader = await connectedClient(t, LONG_POLL, srv.port, { userId: '20' })
      await reader.subscribe(`room/${room}`)
      let session = reader.connection.connection.session.id
      let closed = await fetch(`http://127.0.0.1:${srv.port}/lp/${session}/close`, { method: 'POST' })
      assert.equal(closed.status, 204)
      await reader.waitState('disconnected')
      await writer.sync({ type: 'room/message', room, text: 'while away' })
      await reader.waitState('synchronized')
      let [got] = await reader.waitReceived('room/message', 1)
      assert.equal(got.action.text, 'while away')
      let gone = await fetch(`http://127.0.0.1:${srv.port}/lp/${session}/poll?ack=0`)
      assert.equal(gone.status, 410)
    })
  )
})
