// Two browser contexts (two users, separate storage) in one room: each sees
// the other's messages in its Redux state, and each message is stored once.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, say, scenario, TEST_TIMEOUT_MS, texts, transports, waitForStatus, waitForTexts } from '../lib/harness.mjs'

for (let transport of transports) {
  describe(transport, () => {
    test(
      'two users in one room see each other',
      { timeout: TEST_TIMEOUT_MS },
      scenario('two-users', transport, async ({ browser, open, ferry }) => {
        let alice = await open(await browser.createBrowserContext(), { user: 'alice' })
        let bob = await open(await browser.createBrowserContext(), { user: 'bob' })
        await waitForStatus(alice, 'synchronized')
        await waitForStatus(bob, 'synchronized')

        await say(alice, 'hi from alice')
        await say(bob, 'hi from bob')
        await waitForTexts(alice, ['hi from alice', 'hi from bob'])
        await waitForTexts(bob, ['hi from alice', 'hi from bob'])
        await waitForStatus(alice, 'synchronized')
        await waitForStatus(bob, 'synchronized')

        let a = await alice.evaluate(() => window.chat.store.getState())
        let b = await bob.evaluate(() => window.chat.store.getState())
        assert.deepEqual(a, b, 'both users have the same Redux state')
        assert.deepEqual(await texts(alice), (await texts(bob)))
        // The UI renders the state.
        let shown = await bob.$$eval('#messages li', lis => lis.map(li => li.textContent))
        assert.deepEqual(shown.sort(), ['alice: hi from alice', 'bob: hi from bob'])
        await assertStoredOnce(ferry.port, 'r1', ['hi from alice', 'hi from bob'])
      })
    )
  })
}
