// Scenario 10: malformed frames get the right error and a close, and do not
// disturb other connections. Also: messages sent before `connect` are queued.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { connectedClient, rawPeer } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { uniq } from '../lib/util.mjs'

/** What a bad frame must get: [frame to send (string = raw text), expected error]. */
const BAD_FRAMES = [
  ['hello', ['error', 'wrong-format', 'hello']],
  ['{"a":1}', ['error', 'wrong-format', '{"a":1}']],
  [['foo', 1], ['error', 'unknown-message', 'foo']],
  [['ping'], ['error', 'wrong-format', '["ping"]']],
  [['headers', null], ['error', 'wrong-format', '["headers",null]']],
  [['sync', 1, { type: 'x' }], ['error', 'wrong-format', '["sync",1,{"type":"x"}]']],
  [['sync', 1, { type: 'x' }, { id: 'string-id', time: 1 }], ['error', 'wrong-format', '["sync",1,{"type":"x"},{"id":"string-id","time":1}]']]
]

for (const transport of transports) {
  describe(transport.name, () => {
    for (const [frame, expected] of BAD_FRAMES) {
      let label = typeof frame === 'string' ? frame : JSON.stringify(frame)
      test(
        `10 malformed: ${label} after connected → ${JSON.stringify(expected)} and a close`,
        { skip: typeof frame === 'string' && !transport.sendText ? 'no raw text frames on this transport' : false },
        withServer(async (t, srv) => {
          // A Client on another connection, which must not notice anything.
          let other = await connectedClient(t, transport, srv.port, { userId: '20' })

          let peer = await rawPeer(t, transport, srv.port)
          await peer.handshake({ userId: '10' })
          let from = peer.messages.length
          if (typeof frame === 'string') peer.sendText(frame)
          else peer.send(frame)
          await peer.waitClosed()
          let after = peer.messages.slice(from).filter(m => m[0] !== 'debug')
          assert.deepEqual(after, [expected])

          await other.sync({ type: 'room/message', room: uniq('r'), text: 'still fine' })
          assert.equal(other.client.state, 'synchronized')
          assert.deepEqual(other.errors, [])
        })
      )
    }

    test(
      '10 malformed: hello before connect → ["error","wrong-format","hello"] and a close',
      { skip: !transport.sendText ? 'no raw text frames on this transport' : false },
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.sendText('hello')
        await peer.waitClosed()
        assert.deepEqual(
          peer.messages.filter(m => m[0] !== 'debug'),
          [['error', 'wrong-format', 'hello']]
        )
      })
    )

    test(
      '10 malformed: a Client keeps syncing while other connections send every bad frame',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '20' })
        let room = uniq('r')
        await c.subscribe(`room/${room}`)
        for (const [frame] of BAD_FRAMES) {
          if (typeof frame === 'string' && !transport.sendText) continue
          let peer = await rawPeer(t, transport, srv.port)
          await peer.handshake({ userId: '10' })
          if (typeof frame === 'string') peer.sendText(frame)
          else peer.send(frame)
          await peer.waitClosed()
        }
        await c.sync({ type: 'room/message', room, text: 'after the bad frames' })
        assert.equal(c.client.state, 'synchronized')
        assert.deepEqual(c.errors, [])
        assert.equal(c.attempts, 1, 'the Client never reconnected')
      })
    )

    test(
      'queue before connect: a sync sent before connect is processed after authentication',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        let room = uniq('r')
        peer.nodeId = `10:${uniq()}:t`
        peer.send(['sync', 1, { type: 'room/message', room, text: 'early' }, { id: 1, time: 1 }])
        peer.send(['connect', 5, peer.nodeId, 0, { token: 'good-10', subprotocol: 2 }])
        let { msg } = await peer.waitFor(m => m[0] === 'connected' || m[0] === 'error', { what: '`connected`' })
        assert.equal(msg[0], 'connected', JSON.stringify(msg))
        peer.serverNodeId = msg[2]
        peer.baseTime = msg[3][1]
        await peer.waitFor(m => m[0] === 'synced' && m[1] === 1, { what: '["synced",1]' })
        // The id was relative to a baseTime the peer did not know yet; the server
        // decodes it with the baseTime it sent in `connected`.
        await peer.waitProcessed(peer.ownId(1))
      })
    )
  })
}
