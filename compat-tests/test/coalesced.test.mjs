// Coalesced delivery frames: Ferry sends the actions queued back to back for one client in
// one `sync` frame with several action/meta pairs (up to a byte limit). An unchanged
// @logux/client must take such frames like any other: every action added to its log once, in
// order, and the frame acknowledged with `synced`. The frames are observed as they came off
// the connection (TestClient.incoming, recorded before the Client decodes them), so the tests
// assert only what they saw: that at least one frame really carried more than one action.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { connectedClient } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, FERRY_ONLY, until, uniq } from '../lib/util.mjs'

/** Actions A sends while B cannot receive them: well under subscribe_history_max (1,000). */
const MISSED = 300

/** Records what `c` sends from now on (after TestClient's own trace wrapper). */
function recordSent(c) {
  let sent = []
  let send = c.connection.send.bind(c.connection)
  c.connection.send = msg => {
    sent.push(structuredClone(msg))
    return send(msg)
  }
  return sent
}

/** The server `sync` frames `c` received from `from` on that carried actions of `type`. */
function syncFrames(c, type, from = 0) {
  return c.incoming
    .slice(from)
    .filter(m => m[0] === 'sync')
    .map(m => ({ added: m[1], actions: m.slice(2).filter((_, i) => i % 2 === 0) }))
    .filter(f => f.actions.some(a => a.type === type))
}

/** A sends `count` room messages `<prefix> <i>` at once and waits for every processed. */
async function sendMany(a, room, prefix, count) {
  await Promise.all(
    Array.from({ length: count }, (_, i) =>
      a.sync({ type: 'room/message', room, text: `${prefix} ${i}` }, undefined, 30_000)
    )
  )
  return a.added
    .filter(e => e.action.type === 'room/message' && e.action.text.startsWith(prefix + ' '))
    .map(e => e.meta.id)
}

/** Checks B's coalesced frames: more than one action in one, each acknowledged with synced. */
function assertCoalescedAndAcknowledged(frames, sent) {
  let multi = frames.filter(f => f.actions.length > 1)
  assert.ok(
    multi.length >= 1,
    `at least one sync frame held more than one action (sizes: ${frames.map(f => f.actions.length).join(', ')})`
  )
  for (let f of multi) {
    assert.ok(
      sent.some(m => m[0] === 'synced' && m[1] === f.added),
      `the client answered the ${f.actions.length}-action frame ["sync",${f.added},...] with synced`
    )
  }
  return multi
}

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      'coalesced frames: after a re-subscription with since, the unchanged client gets 300 missed actions in multi-action frames, each once and in order',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let channel = `room/${room}`
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        await b.subscribe(channel)
        await a.sync({ type: 'room/message', room, text: 'live 0' })
        await b.waitReceived('room/message', 1)

        b.connection.disconnect()
        await b.waitState('disconnected')
        await delay(200) // the server has seen the close before A sends
        let missed = await sendMany(a, room, 'missed', MISSED)
        assert.equal(missed.length, MISSED)

        let sent = recordSent(b)
        let from = b.incoming.length
        b.connection.connect()
        await b.waitState('synchronized')
        // The client re-subscribes by itself, with `since`.
        await b.waitReceived('room/message', 1 + MISSED, { timeout: 30_000 })
        await delay(500) // anything extra (duplicates) would arrive by now

        let got = b.received('room/message')
        assert.deepEqual(
          got.map(e => e.action.text),
          ['live 0', ...Array.from({ length: MISSED }, (_, i) => `missed ${i}`)],
          'every missed action once, in order, after the live one'
        )
        assert.deepEqual(got.slice(1).map(e => e.meta.id), missed, 'with A’s ids')
        let resubscribe = b.added.find(e => e.action.type === 'logux/subscribe' && e.meta.resubscribe)
        assert.ok(resubscribe?.action.since, 'B re-subscribed with since')
        let frames = syncFrames(b, 'room/message', from)
        let multi = assertCoalescedAndAcknowledged(frames, sent)
        t.diagnostic(
          `${frames.length} frames carried the missed actions; ${multi.length} held several (largest ${Math.max(...multi.map(f => f.actions.length))})`
        )
        assert.deepEqual(b.errors, [], 'the client reported no error')
      })
    )

    test(
      'coalesced frames: a new subscriber gets 300 actions of history in multi-action frames, each once and in order, then live ones',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let old = await sendMany(a, room, 'old', MISSED)

        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        let sent = recordSent(b)
        let from = b.incoming.length
        await b.subscribe(`room/${room}`)
        await b.waitReceived('room/message', MISSED, { timeout: 30_000 })
        await a.sync({ type: 'room/message', room, text: 'live' })
        await b.waitReceived('room/message', MISSED + 1)
        await delay(500)

        let got = b.received('room/message')
        assert.deepEqual(
          got.map(e => e.action.text),
          [...Array.from({ length: MISSED }, (_, i) => `old ${i}`), 'live'],
          'the history once, oldest first, then the live action'
        )
        assert.deepEqual(got.slice(0, MISSED).map(e => e.meta.id), old, 'with A’s ids')
        await until(() => b.client.state === 'synchronized', { what: 'B synchronized' })
        let frames = syncFrames(b, 'room/message', from)
        let multi = assertCoalescedAndAcknowledged(frames, sent)
        t.diagnostic(`${frames.length} frames carried the history; ${multi.length} held several`)
        assert.deepEqual(b.errors, [], 'the client reported no error')
      })
    )
  })
}
