// A Redux chat room synced through Ferry.
//
// Query parameters:
//   transport  "ws" (default) or "long-poll"
//   server     Ferry's base URL, default http://127.0.0.1:31337
//   user       user id (default "alice"), token (default "chat"), room (default "lobby")
import { badge, badgeEn, CrossTabClient, IndexedStore, status } from '@logux/client'
import { badgeStyles } from '@logux/client/badge/styles'
import { Reconnect } from '@logux/core'
import { createStoreCreator } from '@logux/redux'

import { LongPollConnection } from '../../../js-client-fixtures/long-poll-connection.mjs'
import { reducer } from './reducer.js'

let params = new URLSearchParams(location.search)
let transport = params.get('transport') || 'ws'
let base = (params.get('server') || 'http://127.0.0.1:31337').replace(/\/+$/, '')
let userId = params.get('user') || 'alice'
let token = params.get('token') || 'chat'
let room = params.get('room') || 'lobby'

// WebSocket: @logux/client makes its own Reconnect(WsConnection) from a URL.
// Long-poll: Ferry's LongPollConnection, wrapped in Reconnect the same way.
let server =
  transport === 'long-poll'
    ? new Reconnect(new LongPollConnection(base, { credentials: 'include' }))
    : base.replace(/^http/, 'ws') + '/'

// CrossTabClient: one tab (the leader) holds the connection, the others use
// it through localStorage. IndexedStore keeps the log, offline edits
// included, across reloads.
let client = new CrossTabClient({
  server,
  subprotocol: 1,
  userId,
  token,
  store: new IndexedStore('ferry-chat-' + userId)
})

// @logux/redux gives every action a time-travel reason, so the room's
// actions stay in the IndexedDB log and come back into the state on reload.
let createStore = createStoreCreator(client)
let store = createStore(reducer)

let undos = []
client.on('add', action => {
  if (action.type === 'logux/undo') {
    undos.push({ id: action.id, reason: action.reason, type: action.action?.type })
    let note = document.getElementById('undo')
    note.textContent = `Undone by the server (${action.reason}): ${action.action?.type ?? ''}`
    note.hidden = false
  }
})

let lastStatus = 'disconnected'
status(client, state => {
  lastStatus = state
  document.getElementById('status').textContent = state
  document.body.dataset.status = state
})
badge(client, { messages: badgeEn, styles: badgeStyles, position: 'top-right' })

function render() {
  let { messages, topic } = store.getState()
  document.getElementById('topic').textContent = topic || '(no topic)'
  let list = document.getElementById('messages')
  list.replaceChildren(
    ...messages.map(m => {
      let li = document.createElement('li')
      li.textContent = `${m.author}: ${m.text}`
      li.dataset.id = m.id
      return li
    })
  )
}
store.subscribe(render)

function say(text) {
  return store.dispatch.sync({
    type: 'room/message',
    room,
    id: client.log.generateId(),
    text,
    author: userId
  })
}

document.getElementById('form').addEventListener('submit', e => {
  e.preventDefault()
  let input = document.getElementById('text')
  if (input.value) say(input.value)
  input.value = ''
})
document.getElementById('set-topic').addEventListener('click', () => {
  let input = document.getElementById('text')
  if (input.value) store.dispatch.sync({ type: 'room/topic', room, topic: input.value })
  input.value = ''
})
document.getElementById('clear').addEventListener('click', () => {
  store.dispatch.sync({ type: 'room/clear', room })
})
document.getElementById('room').textContent = room
document.getElementById('me').textContent = `${userId} over ${transport}`

store.initialize.then(() => {
  render()
  document.body.dataset.ready = 'true'
})
client.start()
// Not awaited: offline, it resolves once the server has processed it.
store.dispatch.sync({ type: 'logux/subscribe', channel: 'room/' + room })

// For the browser tests and the console.
window.chat = { store, client, say, undos, room, transport, get status() { return lastStatus } }
