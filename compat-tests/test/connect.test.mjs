// Scenarios 1–4 and 11: the handshake, authentication, protocol checks, ping.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { connectedClient, rawPeer, testClient } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, until } from '../lib/util.mjs'

/** The messages the server sent, without the informational `headers`/`debug` ones. */
function significant(peer) {
  return peer.messages.filter(m => m[0] !== 'headers' && m[0] !== 'debug')
}

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      '1 connect: Client (user 10, token good-10, subprotocol 2) reaches synchronized',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '10', token: 'good-10' })
        assert.equal(c.client.state, 'synchronized')
        assert.deepEqual(c.errors, [])
        // A development server must say so before `connected`, or clients
        // given a ws:// URL destroy themselves.
        assert.equal(c.client.node.remoteHeaders.env, 'development')
        assert.equal(c.client.node.remoteSubprotocol, 2)
        assert.match(c.client.node.remoteNodeId, /^[^ ]+$/)
      })
    )

    test(
      '1 connect: the wire handshake answers connected with protocol 5 and [start, end] times',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        let before = Date.now()
        let connected = await peer.handshake({ userId: '10', token: 'good-10' })
        assert.equal(connected[0], 'connected')
        assert.equal(connected[1], 5)
        assert.equal(typeof connected[2], 'string')
        assert.ok(!connected[2].includes(' '), 'server node id has no spaces')
        let [start, end] = connected[3]
        assert.ok(Number.isInteger(start) && Number.isInteger(end), 'integer times')
        assert.ok(start <= end, 'start <= end')
        assert.ok(Math.abs(end - before) < 60_000, 'times are in ms since the epoch')
        assert.equal(connected[4]?.subprotocol, 2, 'connected announces subprotocol 2')
        let headers = peer.messages.findIndex(m => m[0] === 'headers')
        let connectedAt = peer.messages.findIndex(m => m[0] === 'connected')
        assert.ok(headers >= 0 && headers < connectedAt, '`headers` comes before `connected`')
        assert.equal(peer.messages[headers][1]?.env, 'development')
      })
    )

    test(
      '1 connect: any_user_token lets any user in (user 30, token secret)',
      withServer(async (t, srv) => {
        let c = await connectedClient(t, transport, srv.port, { userId: '30', token: 'secret' })
        assert.equal(c.client.state, 'synchronized')
      })
    )

    test(
      '2 bad token: Client gets wrong-credentials and stops reconnecting',
      withServer(async (t, srv) => {
        let c = testClient(t, transport, srv.port, { userId: '10', token: 'bad' })
        await until(() => c.errors.some(e => e.type === 'wrong-credentials'), {
          what: 'a wrong-credentials error',
          describe: () => c.explain()
        })
        let err = c.errors.find(e => e.type === 'wrong-credentials')
        assert.equal(err.received, true, 'the error came from the server')
        await c.waitState('disconnected')
        // Reconnect delays are 100–300 ms here, so a client that kept trying
        // would have made more attempts by now.
        await delay(1500)
        assert.equal(c.attempts, 1, 'exactly one connection attempt')
        assert.equal(c.connection.reconnecting, false)
        assert.equal(c.client.state, 'disconnected')
      })
    )

    test(
      '2 bad token: the wire answer is ["error","wrong-credentials"] and a close',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.send(['connect', 5, '10:badtok:t', 0, { token: 'bad', subprotocol: 2 }])
        await peer.waitClosed()
        assert.deepEqual(significant(peer), [['error', 'wrong-credentials']])
      })
    )

    test(
      "2 bad token: another user's token is wrong-credentials (user 10, token good-20)",
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.send(['connect', 5, '10:othertok:t', 0, { token: 'good-20', subprotocol: 2 }])
        await peer.waitClosed()
        assert.deepEqual(significant(peer), [['error', 'wrong-credentials']])
      })
    )

    test(
      '3 old protocol: connect version 4 gets wrong-protocol {supported:5, used:4} and a close',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.send(['connect', 4, '10:a:b', 0, { token: 'good-10', subprotocol: 2 }])
        await peer.waitClosed()
        assert.deepEqual(significant(peer), [['error', 'wrong-protocol', { supported: 5, used: 4 }]])
      })
    )

    test(
      '4 subprotocol too old: subprotocol 1 gets wrong-subprotocol {supported:2, used:1}',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.send(['connect', 5, '10:oldsub:t', 0, { token: 'good-10', subprotocol: 1 }])
        await peer.waitClosed()
        assert.deepEqual(significant(peer), [
          ['error', 'wrong-subprotocol', { supported: 2, used: 1 }]
        ])
      })
    )

    test(
      '4 subprotocol too old: a missing subprotocol counts as 0',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        peer.send(['connect', 5, '10:nosub:t', 0, { token: 'good-10' }])
        await peer.waitClosed()
        assert.deepEqual(significant(peer), [
          ['error', 'wrong-subprotocol', { supported: 2, used: 0 }]
        ])
      })
    )

    test(
      '4 subprotocol too old: Client with subprotocol 1 stops reconnecting',
      withServer(async (t, srv) => {
        let c = testClient(t, transport, srv.port, { userId: '10', subprotocol: 1 })
        await until(() => c.errors.some(e => e.type === 'wrong-subprotocol'), {
          what: 'a wrong-subprotocol error',
          describe: () => c.explain()
        })
        await c.waitState('disconnected')
        await delay(1000)
        assert.equal(c.attempts, 1)
      })
    )

    test(
      '11 ping/pong: ["ping",0] after connected is answered with ["pong",N]',
      withServer(async (t, srv) => {
        let peer = await rawPeer(t, transport, srv.port)
        await peer.handshake({ userId: '10' })
        let from = peer.messages.length
        peer.send(['ping', 0])
        let { msg } = await peer.waitFor(m => m[0] === 'pong', { from, what: '`pong`' })
        assert.equal(msg.length, 2)
        assert.equal(typeof msg[1], 'number')
        assert.ok(Number.isInteger(msg[1]) && msg[1] >= 0, 'pong carries a non-negative integer')
        assert.equal(peer.isClosed, false)
      })
    )
  })
}
