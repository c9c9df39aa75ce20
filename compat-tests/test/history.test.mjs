// Scenario 12 and history replay: Ferry keeps channel history on disk and
// replays it to new subscribers; a SIGKILL loses nothing that was `synced`.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { connectedClient, rawPeer } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { delay, FERRY_ONLY, uniq } from '../lib/util.mjs'

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      'history: a new subscriber without since gets the room’s earlier actions, oldest first',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        for (let i = 0; i < 3; i++) await a.sync({ type: 'room/message', room, text: `old ${i}` })
        let ids = a.added.filter(e => e.action.type === 'room/message').map(e => e.meta.id)

        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        await b.subscribe(`room/${room}`)
        await b.waitReceived('room/message', 3)
        await a.sync({ type: 'room/message', room, text: 'live' })
        await b.waitReceived('room/message', 4)
        await delay(300)
        let got = b.received('room/message')
        assert.deepEqual(got.map(e => e.action.text), ['old 0', 'old 1', 'old 2', 'live'])
        assert.deepEqual(got.slice(0, 3).map(e => e.meta.id), ids)
      })
    )

    test(
      '12 restart: 5 processed actions survive SIGKILL and are replayed to a new subscriber with the same ids',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        for (let i = 0; i < 5; i++) await a.sync({ type: 'room/message', room, text: `before ${i}` })
        let ids = a.added.filter(e => e.action.type === 'room/message').map(e => e.meta.id)
        a.destroy()

        let killed = await srv.kill()
        assert.equal(killed.signal, 'SIGKILL')
        await srv.restart()

        let c = await connectedClient(t, transport, srv.port, { userId: '20' })
        await c.subscribe(`room/${room}`)
        await c.waitReceived('room/message', 5)
        await delay(300)
        let got = c.received('room/message')
        assert.deepEqual(got.map(e => e.action.text), [0, 1, 2, 3, 4].map(i => `before ${i}`))
        assert.deepEqual(got.map(e => e.meta.id), ids)
      })
    )

    test(
      '12 restart: every action answered with synced survives a SIGKILL right after the synced',
      FERRY_ONLY,
      withServer(async (t, srv) => {
        let room = uniq('r')
        let peer = await rawPeer(t, transport, srv.port)
        await peer.handshake({ userId: '10' })
        // 20 actions pipelined, one `sync` each; kill as soon as the last is synced.
        for (let i = 1; i <= 20; i++) {
          peer.send(['sync', i, { type: 'room/message', room, text: `n${i}` }, { id: i, time: i }])
        }
        await peer.waitFor(m => m[0] === 'synced' && m[1] === 20, { what: '["synced",20]' })
        await srv.kill()
        let ids = Array.from({ length: 20 }, (_, i) => peer.ownId(i + 1))
        await srv.restart()

        let c = await connectedClient(t, transport, srv.port, { userId: '20' })
        await c.subscribe(`room/${room}`)
        await c.waitReceived('room/message', 20)
        await delay(300)
        let got = c.received('room/message')
        assert.deepEqual(got.map(e => e.meta.id), ids)
      })
    )
  })
}
