// Scenarios 8, 9, 13, 14: the offline queue, access rules, a raw
// @logux/core ClientNode, and duplicate actions.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { ClientNode, Log, MemoryStore, parseId, Reconnect } from '@logux/core'

import { connectedClient, FAST_RECONNECT, rawPeer, testClient } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, FERRY_ONLY, settle, uniq, until, withTimeout } from '../lib/util.mjs'

async function assertUndo(promise, reason) {
  let result = await settle(promise)
  assert.equal(result.status, 'rejected', `expected logux/undo ${reason}, got logux/processed`)
  assert.equal(result.reason.name, 'LoguxUndoError', `expected a LoguxUndoError, got ${result.reason.stack}`)
  assert.equal(result.reason.action.reason, reason)
  return result.reason
}

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      '8 offline queue: 10 actions made while the server is down are all processed and delivered',
      withServer(
        async (t, srv) => {
          let room = uniq('r')
          // Nothing listens on srv.port yet. attempts:1 makes the client give up
          // after its first failed attempt, so that it connects only when the
          // test says so (after the subscriber is ready).
          let a = testClient(t, transport, srv.port, {
            userId: '10',
            reconnect: { ...FAST_RECONNECT, attempts: 1 }
          })
          await until(() => a.attempts >= 1 && a.client.state === 'disconnected' && !a.connection.connecting, {
            what: 'the first connection attempt to fail',
            describe: () => a.explain()
          })
          let results = []
          let promises = []
          for (let i = 0; i < 10; i++) {
            let p = a.client.sync({ type: 'room/message', room, text: `offline ${i}` })
            promises.push(p)
            p.then(() => results.push(i), () => results.push(-1 - i))
          }
          await delay(200)
          assert.deepEqual(results, [], 'nothing is processed while offline')

          await srv.start()
          let b = await connectedClient(t, transport, srv.port, { userId: '20' })
          await b.subscribe(`room/${room}`)

          a.connection.connect()
          let metas = await withTimeout(Promise.all(promises), 15_000, '10 logux/processed')
          assert.equal(metas.length, 10)
          assert.equal(new Set(results).size, 10)
          assert.ok(results.every(i => i >= 0), 'no action was undone')

          let got = await b.waitReceived('room/message', 10, { filter: x => x.room === room })
          await delay(300)
          got = b.received('room/message')
          assert.deepEqual(
            got.map(e => e.action.text),
            Array.from({ length: 10 }, (_, i) => `offline ${i}`),
            'the subscriber gets all 10, once each, in order'
          )
          let ids = a.added.filter(e => e.action.type === 'room/message').map(e => e.meta.id)
          assert.deepEqual(got.map(e => e.meta.id), ids, 'with the ids the author gave them')
        },
        { start: false }
      )
    )

    test(
      '9 access: foo/bar → unknownType, room/denied → denied, user/rename of user 20 by 10 → denied',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10' })
        await assertUndo(c.client.sync({ type: 'foo/bar' }), 'unknownType')
        await assertUndo(c.client.sync({ type: 'room/denied' }), 'denied')
        await assertUndo(c.client.sync({ type: 'user/rename', userId: '20', name: 'x' }), 'denied')
        // The allowed variants on the same connection.
        await c.sync({ type: 'user/rename', userId: '10', name: 'Alice' })
        await c.sync({ type: 'room/message', room: '1', text: 'after the undos' })
        assert.equal(c.client.state, 'synchronized')
      })
    )

    test(
      '9 access: user/rename of user 10 reaches a subscriber of users/10 (resend)',
      withServer(async (t, srv) => {
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let a2 = await connectedClient(t, transport, srv.port, { userId: '10' })
        await a2.subscribe('users/10')
        await a.sync({ type: 'user/rename', userId: '10', name: 'Bob' })
        let [got] = await a2.waitReceived('user/rename', 1)
        assert.deepEqual(got.action, { type: 'user/rename', userId: '10', name: 'Bob' })
      })
    )

    test(
      '9 access: an undone action does not cancel the next one in the same sync',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        await peer.handshake({ userId: '10' })
        peer.send([
          'sync',
          2,
          { type: 'room/denied' },
          { id: 1, time: 1 },
          { type: 'room/message', room: uniq('r'), text: 'independent' },
          { id: 2, time: 2 }
        ])
        await peer.waitFor(m => m[0] === 'synced' && m[1] === 2, { what: '["synced",2]' })
        await assert.rejects(peer.waitProcessed(peer.ownId(1)), /"reason":"denied"/)
        await peer.waitProcessed(peer.ownId(2))
      })
    )

    test(
      '13 raw @logux/core 0.10 ClientNode + Reconnect gets logux/processed',
      withServer(async (t, srv) => {
        let nodeId = `10:${uniq()}:raw`
        let log = new Log({ nodeId, store: new MemoryStore() })
        let connection = new Reconnect(transport.connection(transport.url(srv.port)), FAST_RECONNECT)
        let node = new ClientNode(nodeId, log, connection, {
          subprotocol: 2,
          token: 'good-10',
          // Send only our own actions, and only the meta keys a server accepts.
          onSend: async (action, meta) =>
            parseId(meta.id).nodeId === nodeId ? [action, { id: meta.id, time: meta.time }] : false
        })
        let errors = []
        node.catch(e => errors.push(e))
        t.after(() => node.destroy())
        let added = []
        log.on('add', (action, meta) => added.push({ action, meta }))

        connection.connect()
        await until(() => node.state === 'synchronized', {
          what: 'the ClientNode to be synchronized',
          describe: () => `state=${node.state} errors=${errors.map(e => e.message)}`
        })
        let room = uniq('r')
        let meta = await log.add({ type: 'room/message', room, text: 'raw' }, { reasons: ['syncing'] })
        let ack = await until(
          () => added.find(e => ['logux/processed', 'logux/undo'].includes(e.action.type) && e.action.id === meta.id),
          { what: 'logux/processed', describe: () => JSON.stringify(added) }
        )
        assert.equal(ack.action.type, 'logux/processed', JSON.stringify(ack.action))
        assert.deepEqual(errors, [])
        assert.equal(node.remoteProtocol, 5)
      })
    )

    test(
      '14 duplicate: the same action id sent twice is synced twice, processed, and delivered once',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        await b.subscribe(`room/${room}`)

        let peer = await rawPeer(t, transport, srv.port)
        await peer.handshake({ userId: '10' })
        let action = { type: 'room/message', room, text: 'twice' }
        peer.send(['sync', 1, action, { id: 1, time: 1 }])
        await peer.waitFor(m => m[0] === 'synced' && m[1] === 1, { what: '["synced",1]' })
        await peer.waitProcessed(peer.ownId(1))
        await b.waitReceived('room/message', 1)

        let from = peer.messages.length
        peer.send(['sync', 2, action, { id: 1, time: 1 }])
        await peer.waitFor(m => m[0] === 'synced' && m[1] === 2, { from, what: '["synced",2]' })
        await delay(500)
        let undo = peer.actions().find(e => e.action.type === 'logux/undo')
        assert.equal(undo, undefined, `no undo for a duplicate: ${JSON.stringify(undo?.action)}`)
        let got = b.received('room/message')
        assert.equal(got.length, 1, 'the subscriber got the action exactly once')
        assert.equal(got[0].meta.id, peer.ownId(1))
        assert.equal(peer.isClosed, false)
      })
    )
  })
}
