// The transports every scenario runs over. A scenario is written once as
//   for (const transport of transports) describe(transport.name, () => { ... })
// and uses only these fields, so adding a transport here runs every scenario
// over it too.
//
// Fields:
//   name                 shown in the test names
//   url(port)            the URL of a server listening on 127.0.0.1:<port>
//   connection(url)      a new @logux/core Connection (connect/disconnect/send/on)
//   sendText(conn, text) optional: send one raw, possibly invalid, frame on a
//                        connected Connection (wire-level tests skip the
//                        non-JSON checks on transports without it)
//
// COMPAT_TRANSPORTS=ws,long-poll limits the run to the named transports.

import { WsConnection } from '@logux/core'
import WebSocket from 'ws'

import { LongPollConnection } from '../../js-client-fixtures/long-poll-connection.mjs'

// Node 20 has no global WebSocket; @logux/client's WsConnection looks for one.
globalThis.WebSocket ??= WebSocket

const all = [
  {
    name: 'ws',
    url: port => 'ws://127.0.0.1:' + port + '/',
    connection: url => new WsConnection(url, WebSocket),
    sendText: (conn, text) => conn.ws.send(text)
  },
  {
    name: 'long-poll',
    url: port => 'http://127.0.0.1:' + port,
    connection: url => new LongPollConnection(url),
    // The send body carries each frame's exact text, so raw non-JSON frames work too.
    sendText: (conn, text) => conn.sendText(text)
  }
]

let only = process.env.COMPAT_TRANSPORTS
export const transports = only
  ? all.filter(t => only.split(',').map(s => s.trim()).includes(t.name))
  : all

if (transports.length === 0) {
  throw new Error(`COMPAT_TRANSPORTS=${only} matches no transport (known: ${all.map(t => t.name).join(', ')})`)
}
