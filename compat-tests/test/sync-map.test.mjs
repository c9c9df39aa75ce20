// SyncMap: the unchanged @logux/client SyncMap API (syncMapTemplate, createSyncMap,
// changeSyncMap, deleteSyncMap, loadValue) against Ferry's [[sync_maps]] from two clients,
// online and offline, with concurrent edits.

import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import {
  changeSyncMapById,
  createSyncMap,
  deleteSyncMapById,
  loadValue,
  syncMapTemplate
} from '@logux/client'

import { connectedClient } from '../lib/clients.mjs'
import { withServer } from '../lib/server.mjs'
import { transports } from '../lib/transports.mjs'
import { settle, uniq, until } from '../lib/util.mjs'

const Task = syncMapTemplate('tasks')

/**
 * The value of a task as `client` loads it (`undefined` when the server answers notFound),
 * without cached stores of other tests.
 */
async function load(client, id) {
  let store = Task(id, client)
  let unbind = store.listen(() => {})
  try {
    let value = await loadValue(store)
    return value && { ...value }
  } finally {
    unbind()
    delete Task.cache[id]
  }
}

for (const transport of transports) {
  describe(transport.name, () => {
    test(
      'sync map: one client creates and changes, another loads the value',
      withServer(async (t, srv) => {
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        let id = uniq('task')
        await createSyncMap(a.client, Task, { id, title: 'buy milk', done: false })
        await changeSyncMapById(a.client, Task, id, { done: true })
        let value = await load(b.client, id)
        assert.equal(value.title, 'buy milk')
        assert.equal(value.done, true)
        assert.equal(value.isLoading, false)
      })
    )

    test(
      'sync map: a missing task loads as undefined (notFound)',
      withServer(async (t, srv) => {
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        assert.equal(await load(b.client, uniq('missing')), undefined)
      })
    )

    test(
      'sync map: a subscriber sees live changes of another client',
      withServer(async (t, srv) => {
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        let id = uniq('task')
        await createSyncMap(a.client, Task, { id, title: 'v1' })
        let store = Task(id, b.client)
        let unbind = store.listen(() => {})
        t.after(() => {
          unbind()
          delete Task.cache[id]
        })
        await loadValue(store)
        await changeSyncMapById(a.client, Task, id, { title: 'v2' })
        await until(() => store.get().title === 'v2', { what: 'the live change' })
      })
    )

    test(
      'sync map: concurrent offline edits of different fields both survive, deletes win',
      withServer(async (t, srv) => {
        let a = await connectedClient(t, transport, srv.port, { userId: '10' })
        let b = await connectedClient(t, transport, srv.port, { userId: '20' })
        let id = uniq('task')
        await createSyncMap(a.client, Task, { id, title: 'start', done: false })
        // Both go offline and edit different fields of the same task.
        a.client.node.connection.disconnect()
        b.client.node.connection.disconnect()
        let editA = changeSyncMapById(a.client, Task, id, { title: 'from a' })
        let editB = changeSyncMapById(b.client, Task, id, { done: true })
        a.client.node.connection.connect()
        b.client.node.connection.connect()
        await Promise.all([editA, editB])
        let c = await connectedClient(t, transport, srv.port, { userId: '30' })
        let merged = await load(c.client, id)
        assert.equal(merged.title, 'from a')
        assert.equal(merged.done, true)

        await deleteSyncMapById(a.client, Task, id)
        let late = await settle(changeSyncMapById(b.client, Task, id, { title: 'too late' }))
        assert.equal(late.status, 'rejected', 'a change after the delete is undone')
        assert.equal(await load(c.client, id), undefined, 'the deleted task is notFound')
      })
    )
  })
}
