// Cross-origin: every page here comes from another origin than Ferry (another
// port). With allowed_origins and [long_poll] cors_origins naming the page's
// origin it works; a page from an unlisted origin is refused: its WebSocket
// upgrade gets 403, its long-poll answers are hidden by CORS, and nothing it
// writes is stored.
import assert from 'node:assert/strict'
import { describe, test } from 'node:test'

import { assertStoredOnce, delay, rejections, say, scenario, storedActions, TEST_TIMEOUT_MS, transports, waitForStatus, waitForTexts } from '../lib/harness.mjs'

/** Records the page's network events that tell a refusal (CDP Network domain). */
async function watchNetwork(page, into) {
  let cdp = await page.createCDPSession()
  await cdp.send('Network.enable')
  cdp.on('Network.webSocketHandshakeResponseReceived', e => into.wsStatus.push(e.response.status))
  cdp.on('Network.webSocketCreated', e => into.wsCreated.push(e.url))
  cdp.on('Network.responseReceived', e => {
    if (e.response.url.includes('/lp/')) into.lpResponses.push({ url: e.response.url, status: e.response.status })
  })
  cdp.on('Network.loadingFailed', e => into.failed.push({ error: e.errorText, cors: e.corsErrorStatus?.corsError }))
  page.on('console', m => into.console.push(m.text()))
}

for (let transport of transports) {
  describe(transport, () => {
    test(
      'a listed origin works, an unlisted one is refused',
      { timeout: TEST_TIMEOUT_MS },
      scenario('cross-origin', transport, async ({ browser, open, ferry, origin, otherOrigin, t }) => {
        let alice = await open(await browser.createBrowserContext(), { user: 'alice' })
        assert.notEqual(new URL(origin).port, String(ferry.port), 'the page is served from another origin than Ferry')
        await waitForStatus(alice, 'synchronized')
        await say(alice, 'from the listed origin')

        let net = { wsStatus: [], wsCreated: [], lpResponses: [], failed: [], console: [] }
        let before = await rejections(ferry.port, 'origin')
        let mallory = await open(await browser.createBrowserContext(), {
          user: 'mallory',
          origin: otherOrigin,
          beforeGoto: page => watchNetwork(page, net)
        })
        await say(mallory, 'from the unlisted origin')
        await delay(4000)

        assert.notEqual(await mallory.evaluate(() => window.chat.status), 'synchronized')
        assert.equal(await mallory.evaluate(() => window.chat.client.connected), false)
        t.diagnostic(`refused page saw: ws statuses ${JSON.stringify(net.wsStatus)}, CORS errors ${JSON.stringify(net.failed.map(f => f.cors).filter(Boolean))}`)
        if (transport === 'ws') {
          let refused403 = net.wsStatus.includes(403) || net.console.some(t => /Unexpected response code: 403/.test(t))
          assert.ok(refused403, `the WebSocket upgrade got 403: ${JSON.stringify(net)}`)
          assert.ok(!net.wsStatus.includes(101), 'no WebSocket was opened')
          assert.ok((await rejections(ferry.port, 'origin')) > before, 'Ferry counted the origin rejection')
        } else {
          // Ferry answers, but without Access-Control-Allow-Origin for this
          // origin, so Chromium hides the answer from the page.
          let corsBlocked = net.failed.some(f => f.cors) || net.console.some(t => /blocked by CORS policy/.test(t))
          assert.ok(corsBlocked, `the long-poll answers were hidden by CORS: ${JSON.stringify(net)}`)
        }

        await waitForTexts(alice, ['from the listed origin'])
        let stored = await assertStoredOnce(ferry.port, 'r1', ['from the listed origin'])
        assert.ok(!stored.some(a => a.text === 'from the unlisted origin'), 'nothing from the refused page is stored')
        assert.equal((await storedActions(ferry.port, 'room/r1')).length, 1)
        assert.ok(!(await alice.evaluate(() => window.chat.store.getState().messages.map(m => m.text))).includes('from the unlisted origin'))
      })
    )
  })
}
