// Scenarios 5–7: subscriptions, channel delivery, catch-up after a reconnect.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { connectedClient } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, FERRY_ONLY, settle, uniq } from '../lib/util.mjs'

/** Asserts that `promise` rejects with a LoguxUndoError whose reason is `reason`. */
async function assertUndo(promise, reason) {
  let result = await settle(promise)
  assert.equal(result.status, 'rejected', `expected logux/undo ${reason}, got logux/processed`)
  let err = result.reason
  assert.equal(err.name, 'LoguxUndoError', `expected a LoguxUndoError, got ${err.stack}`)
  assert.equal(err.action.type, 'logux/undo')
  assert.equal(err.action.reason, reason)
  return err
}

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      '5 subscribe: room/1 resolves with logux/processed',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        let meta = await c.sync({ type: 'logux/subscribe', channel: 'room/1' })
        assert.equal(typeof meta.id, 'string')
        let processed = c.received('logux/processed')
        assert.equal(processed.length, 1)
        assert.equal(processed[0].meta.id, meta.id)
      })
    )

    test(
      '5 subscribe: users/10 as user 10 is allowed (param:id)',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        await c.subscribe('users/10')
      })
    )

    test(
      '5 subscribe: users/20 as user 10 is undone with reason denied',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        let err = await assertUndo(c.client.sync({ type: 'logux/subscribe', channel: 'users/20' }), 'denied')
        assert.deepEqual(err.action.action, { type: 'logux/subscribe', channel: 'users/20' })
        // The client stays connected: an undo is not a connection error.
        assert.equal(c.client.state, 'synchronized')
        await c.subscribe('room/1')
      })
    )

    test(
      '5 subscribe: nope/1 (no matching channel) is undone with reason wrongChannel',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        await assertUndo(c.client.sync({ type: 'logux/subscribe', channel: 'nope/1' }), 'wrongChannel')
      })
    )

    test(
      '6 channel delivery: B gets A’s room/message with the same meta.id; A gets processed, not its own action',
      withServer(async (t, srv) => {
        let room = uniq('r')
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        await a.subscribe(`room/${room}`)
        await b.subscribe(`room/${room}`)

        let text = uniq('hello ')
        let action = { type: 'room/message', room, text }
        let processed = await a.sync(action)
        let sent = a.added.find(e => e.action.type === 'room/message' && e.action.text === text)
        assert.ok(sent, 'A logged its own action')
        assert.ok(sent.meta.id.includes(' ' + a.nodeId + ' '), 'A’s action has A’s node id')

        let [got] = await b.waitReceived('room/message', 1, { filter: x => x.text === text })
        assert.deepEqual(got.action, action)
        assert.equal(got.meta.id, sent.meta.id, 'B sees the same meta.id')

        // logux/processed names A's action.
        let ack = a.received('logux/processed').find(e => e.action.id === sent.meta.id)
        assert.ok(ack, 'A got logux/processed for its action')
        assert.equal(ack.meta.id, processed.id)

        // Give a wrong echo time to arrive, then check the wire of A.
        await delay(300)
        let echoes = a.incoming.filter(
          m => m[0] === 'sync' && m.slice(2).some(x => x && x.type === 'room/message')
        )
        assert.deepEqual(echoes, [], 'A must not get its own action back through the channel')
        assert.equal(b.received('room/message').length, 1, 'B got it exactly once')
      })
    )

    test(
      '7 catch-up: B misses 5 actions while offline and gets exactly those after reconnecting',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let channel = `room/${room}`
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        await b.subscribe(channel)

        // Two actions B gets live, before it goes offline.
        for (let i = 0; i < 2; i++) {
          await a.sync({ type: 'room/message', room, text: `live ${i}` })
        }
        await b.waitReceived('room/message', 2)

        b.connection.disconnect()
        await b.waitState('disconnected')
        // Let the server see the close before A sends: this test checks the
        // catch-up, not an action racing with the disconnect.
        await delay(200)
        let missed = []
        for (let i = 0; i < 5; i++) {
          await a.sync({ type: 'room/message', room, text: `missed ${i}` })
          missed.push(a.added.findLast(e => e.action.type === 'room/message').meta.id)
        }

        b.connection.connect()
        await b.waitState('synchronized')
        // The client re-subscribes by itself, with `since`.
        await b.waitReceived('room/message', 7)
        await delay(500) // anything extra (duplicates) would arrive by now
        let got = b.received('room/message')
        assert.deepEqual(
          got.map(e => e.action.text),
          ['live 0', 'live 1', 'missed 0', 'missed 1', 'missed 2', 'missed 3', 'missed 4'],
          'exactly the missed actions, in order, with no duplicates of the live ones'
        )
        assert.deepEqual(got.slice(2).map(e => e.meta.id), missed, 'the same ids as A’s actions')
        let resubscribe = b.added.find(e => e.action.type === 'logux/subscribe' && e.meta.resubscribe)
        assert.ok(resubscribe, 'B re-subscribed')
        assert.ok(resubscribe.action.since, 'the re-subscription carried since')
      })
    )
  })
}
