// Two tabs of one user (one browser context: shared localStorage and
// IndexedDB) with CrossTabClient: one tab leads and holds the only connection
// to Ferry (counted on /metrics), both tabs' Redux states are equal.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, connectionCounts, delay, reduxState, say, scenario, TEST_TIMEOUT_MS, transports, waitForStatus, waitForTexts } from '../lib/harness.mjs'

for (let transport of transports) {
  describe(transport, () => {
    test(
      'two tabs of one user share one connection and one state',
      { timeout: TEST_TIMEOUT_MS },
      scenario('two-tabs', transport, async ({ browser, open, ferry }) => {
        let context = await browser.createBrowserContext()
        let tab1 = await open(context, { user: 'alice' })
        await waitForStatus(tab1, 'synchronized')
        let tab2 = await open(context, { user: 'alice' })
        await waitForStatus(tab2, 'synchronized')

        await say(tab1, 'from tab 1')
        await say(tab2, 'from tab 2')
        await waitForTexts(tab1, ['from tab 1', 'from tab 2'])
        await waitForTexts(tab2, ['from tab 1', 'from tab 2'])
        await waitForStatus(tab1, 'synchronized')
        await waitForStatus(tab2, 'synchronized')

        let roles = [await tab1.evaluate(() => window.chat.client.role), await tab2.evaluate(() => window.chat.client.role)]
        assert.deepEqual(roles.sort(), ['follower', 'leader'], 'one leader tab')
        assert.deepEqual(await reduxState(tab1), await reduxState(tab2), 'both tabs have the same Redux state')

        // The count is stable: sample it a few times.
        for (let i = 0; i < 5; i++) {
          let counts = await connectionCounts(ferry.port)
          assert.equal(counts[transport], 1, `one ${transport} connection to Ferry: ${JSON.stringify(counts)}`)
          assert.equal((counts.ws ?? 0) + (counts['long-poll'] ?? 0), 1, JSON.stringify(counts))
          await delay(200)
        }
        await assertStoredOnce(ferry.port, 'r1', ['from tab 1', 'from tab 2'])
      })
    )
  })
}
