// Ferry is killed with SIGKILL and restarted (same port and data) while the
// pages are open: they reconnect by themselves, what was acknowledged before
// the kill is still there, and an edit made during the outage syncs once.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, reduxState, say, scenario, transports, waitForStatus, waitForTexts } from '../lib/harness.mjs'

for (let transport of transports) {
  describe(transport, () => {
    test(
      'SIGKILL and restart of Ferry: pages reconnect, nothing acknowledged is lost',
      { timeout: 90_000 },
      scenario('kill-restart', transport, async ({ browser, open, ferry }) => {
        let alice = await open(await browser.createBrowserContext(), { user: 'alice' })
        let bob = await open(await browser.createBrowserContext(), { user: 'bob' })
        await waitForStatus(alice, 'synchronized')
        await waitForStatus(bob, 'synchronized')
        await say(alice, 'acknowledged 1')
        await say(bob, 'acknowledged 2')
        await waitForTexts(alice, ['acknowledged 1', 'acknowledged 2'])
        await waitForTexts(bob, ['acknowledged 1', 'acknowledged 2'])
        // status() says synchronized once every logux/processed has arrived.
        await waitForStatus(alice, 'synchronized')
        await waitForStatus(bob, 'synchronized')

        let exit = await ferry.kill()
        assert.equal(exit.signal, 'SIGKILL')
        await waitForStatus(alice, ['disconnected', 'wait', 'connecting'], 20_000)
        await say(alice, 'during outage')
        await ferry.start()

        await waitForTexts(bob, ['acknowledged 1', 'acknowledged 2', 'during outage'], 30_000)
        await waitForStatus(alice, ['synchronized', 'synchronizedAfterWait'], 30_000)
        await waitForStatus(bob, ['synchronized', 'synchronizedAfterWait'], 30_000)
        assert.deepEqual((await reduxState(alice)).messages, (await reduxState(bob)).messages)

        // A new user after the restart gets the whole history from Ferry.
        let carol = await open(await browser.createBrowserContext(), { user: 'carol' })
        await waitForTexts(carol, ['acknowledged 1', 'acknowledged 2', 'during outage'])
        await assertStoredOnce(ferry.port, 'r1', ['acknowledged 1', 'acknowledged 2', 'during outage'])
      })
    )
  })
}
