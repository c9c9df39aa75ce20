// Offline: the test cuts the network between the pages and Ferry (the TCP
// proxy), both users write, alice reloads her page while still offline (her
// edits come back from IndexedDB), the network returns, both converge and
// every edit is stored once.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, reduxState, say, scenario, texts, transports, waitForStatus, waitForTexts } from '../lib/harness.mjs'

for (let transport of transports) {
  describe(transport, () => {
    test(
      'offline edits survive a reload and sync once',
      { timeout: 90_000 },
      scenario('offline-reload', transport, async ({ browser, open, ferry, proxy }) => {
        let alice = await open(await browser.createBrowserContext(), { user: 'alice' })
        let bob = await open(await browser.createBrowserContext(), { user: 'bob' })
        await waitForStatus(alice, 'synchronized')
        await waitForStatus(bob, 'synchronized')
        await say(alice, 'online 1')
        await waitForTexts(bob, ['online 1'])

        proxy.cut()
        // WebSocket closes at once; long-poll gives up after its retries (10 s).
        await waitForStatus(alice, ['disconnected', 'wait'], 20_000)
        await waitForStatus(bob, ['disconnected', 'wait'], 20_000)
        await say(alice, 'alice offline 1')
        await say(alice, 'alice offline 2')
        await say(bob, 'bob offline 1')
        await waitForStatus(alice, 'wait')
        await waitForTexts(alice, ['online 1', 'alice offline 1', 'alice offline 2'])

        await alice.reload({ waitUntil: 'load' })
        await alice.waitForSelector('body[data-ready="true"]', { timeout: 20_000 })
        // Back from IndexedDB, still offline.
        await waitForTexts(alice, ['online 1', 'alice offline 1', 'alice offline 2'])
        assert.notEqual(await alice.evaluate(() => window.chat.status), 'synchronized')
        assert.ok(!(await texts(alice)).includes('bob offline 1'), 'bob\'s offline edit cannot have arrived')

        proxy.restore()
        let all = ['online 1', 'alice offline 1', 'alice offline 2', 'bob offline 1']
        await waitForTexts(alice, all, 30_000)
        await waitForTexts(bob, all, 30_000)
        await waitForStatus(alice, ['synchronized', 'synchronizedAfterWait'], 20_000)
        await waitForStatus(bob, ['synchronized', 'synchronizedAfterWait'], 20_000)
        assert.deepEqual((await reduxState(alice)).messages, (await reduxState(bob)).messages, 'both users converge')
        assert.deepEqual((await texts(alice)).sort(), [...all].sort(), 'no message twice in the Redux state')
        let stored = await assertStoredOnce(ferry.port, 'r1', all)
        assert.equal(stored.length, all.length, 'nothing else stored')
      })
    )
  })
}
