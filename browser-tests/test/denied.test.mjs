// A denied action is undone: "Clear room" (room/clear, access "nobody") empties
// the room at once, Ferry answers logux/undo reason "denied", @logux/redux
// takes the action back (the messages return) and the page shows the undo
// (its note and the @logux/client badge).
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, say, scenario, storedActions, TEST_TIMEOUT_MS, texts, transports, WAIT_MS, waitForStatus, waitForTexts } from '../lib/harness.mjs'

for (let transport of transports) {
  describe(transport, () => {
    test(
      'a denied action is undone in the Redux state and the UI',
      { timeout: TEST_TIMEOUT_MS },
      scenario('denied', transport, async ({ browser, open, ferry }) => {
        let alice = await open(await browser.createBrowserContext(), { user: 'alice' })
        await waitForStatus(alice, 'synchronized')
        await say(alice, 'keep me')
        await waitForTexts(alice, ['keep me'])
        await waitForStatus(alice, 'synchronized')

        // Record every message count the Redux store goes through.
        await alice.evaluate(() => {
          window.counts = []
          window.chat.store.subscribe(() => window.counts.push(window.chat.store.getState().messages.length))
        })
        await alice.click('#clear')
        await alice.waitForFunction(() => window.chat.undos.length > 0, { timeout: WAIT_MS })
        await waitForTexts(alice, ['keep me'])

        let undos = await alice.evaluate(() => window.chat.undos)
        assert.deepEqual(undos.map(u => [u.reason, u.type]), [['denied', 'room/clear']])
        let counts = await alice.evaluate(() => window.counts)
        assert.equal(counts[0], 0, `the clear was applied at once (counts ${counts})`)
        assert.equal(counts.at(-1), 1, `then taken back (counts ${counts})`)
        assert.deepEqual(await texts(alice), ['keep me'])

        let note = await alice.$eval('#undo', el => (el.hidden ? '' : el.textContent))
        assert.match(note, /denied/)
        assert.equal(await alice.evaluate(() => window.chat.status), 'denied', 'status() reports denied')
        let badge = await alice.$eval('[role="alert"]', el => ({ text: el.textContent, shown: el.style.display }))
        assert.equal(badge.shown, 'block')
        assert.match(badge.text, /no access/)
        let li = await alice.$$eval('#messages li', lis => lis.map(l => l.textContent))
        assert.deepEqual(li, ['alice: keep me'])

        let stored = await storedActions(ferry.port, 'room/r1')
        assert.ok(!stored.some(e => e.action.type === 'room/clear'), 'room/clear was not stored in the room')
        await assertStoredOnce(ferry.port, 'r1', ['keep me'])
      })
    )
  })
}
