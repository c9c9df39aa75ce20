// What every browser scenario needs: Ferry (started by compat-tests/lib/server.mjs
// with a config naming the page's origin), a TCP proxy between the page and
// Ferry that the test can cut, the example's bundle served from two origins
// (two loopback ports: one listed in Ferry's config, one not), and headless
// Chromium from Debian's package, driven by puppeteer-core.
//
// Everything listens on 127.0.0.1 and everything started here is stopped in
// scenario()'s finally: Ferry by its pid, Chromium by browser.close() and then
// a SIGKILL of its pid, the proxy and the static servers by close().

import assert from 'node:assert/strict'
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises'
import http from 'node:http'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

import puppeteer from 'puppeteer-core'

import { startServer } from '../../compat-tests/lib/server.mjs'
import { serveStatic } from '../../examples/redux-chat/serve.mjs'

const HERE = path.dirname(fileURLToPath(import.meta.url))
export const OUTPUT = path.resolve(HERE, '../output')
export const HOST = '127.0.0.1'
export const API_SECRET = 'browser-tests-api-secret'
export const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium'

const TRANSPORTS = ['ws', 'long-poll']
let only = process.env.BROWSER_TRANSPORTS
export const transports = only ? TRANSPORTS.filter(t => only.split(',').includes(t)) : TRANSPORTS

export const WAIT_MS = 20_000
export const TEST_TIMEOUT_MS = 60_000

export function delay(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

/** Rejects after `ms` with `what` in the message. */
export function within(ms, what, promise) {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`${what}: no result within ${ms} ms`)), ms)
    })
  ]).finally(() => clearTimeout(timer))
}

/**
 * A loopback TCP proxy to 127.0.0.1:targetPort. cut() drops every open
 * connection and resets new ones until restore(): to the page, the network
 * is gone (a WebSocket closes, fetch fails), which browser offline emulation
 * does not reliably do to an open WebSocket.
 */
export async function startProxy(targetPort) {
  let sockets = new Set()
  let down = false
  let server = net.createServer(client => {
    if (down) {
      client.resetAndDestroy()
      return
    }
    let upstream = net.connect(targetPort, HOST)
    sockets.add(client)
    sockets.add(upstream)
    let drop = () => {
      client.destroy()
      upstream.destroy()
      sockets.delete(client)
      sockets.delete(upstream)
    }
    client.on('error', drop)
    upstream.on('error', drop)
    client.on('close', drop)
    upstream.on('close', drop)
    client.pipe(upstream)
    upstream.pipe(client)
  })
  await new Promise((resolve, reject) => {
    server.on('error', reject)
    server.listen(0, HOST, resolve)
  })
  return {
    port: server.address().port,
    url: `http://${HOST}:${server.address().port}`,
    cut() {
      down = true
      for (let s of sockets) s.destroy()
      sockets.clear()
    },
    restore() {
      down = false
    },
    close() {
      down = true
      for (let s of sockets) s.destroy()
      return new Promise(resolve => server.close(() => resolve()))
    }
  }
}

/** Ferry's configuration for the chat, with `origin` the only allowed browser origin. */
export function chatConfig(origin) {
  return `
env = "development"
subprotocol = 1
allowed_origins = ["${origin}"]

[auth]
any_user_token = "chat"

[backend]
# Only for the server API (reading back what was stored); no rule names a hook.
url = "http://127.0.0.1:9/unused"
secret = "${API_SECRET}"

[long_poll]
cors_origins = ["${origin}"]

[[channels]]
pattern = "room/:id"
access = "anyone"

[[types]]
type = "room/message"
access = "field:author"
resend = ["room/{room}"]

[[types]]
type = "room/topic"
access = "anyone"
resend = ["room/{room}"]

[[types]]
type = "room/clear"
access = "nobody"
`
}

function httpGet(port, pathname, headers = {}) {
  return new Promise((resolve, reject) => {
    let req = http.get({ host: HOST, port, path: pathname, headers, timeout: 5000, agent: false }, res => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', c => (body += c))
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }))
    })
    req.on('timeout', () => req.destroy(new Error(`GET ${pathname} timed out`)))
    req.on('error', reject)
  })
}

/** The sum of Ferry's ferry_connections gauges by transport ({ws: n, 'long-poll': m}). */
export async function connectionCounts(ferryPort) {
  let res = await httpGet(ferryPort, '/metrics')
  assert.equal(res.status, 200, 'GET /metrics')
  let counts = {}
  for (let line of res.body.split('\n')) {
    let m = line.match(/^ferry_connections\{([^}]*)\} (\d+)/)
    if (!m) continue
    let transport = m[1].match(/transport="([^"]+)"/)?.[1]
    counts[transport] = (counts[transport] ?? 0) + Number(m[2])
  }
  return counts
}

/** The value of ferry_rejections_total{reason="<reason>"} (0 when absent). */
export async function rejections(ferryPort, reason) {
  let res = await httpGet(ferryPort, '/metrics')
  let total = 0
  for (let line of res.body.split('\n')) {
    let m = line.match(/^ferry_rejections_total\{([^}]*)\} (\d+)/)
    if (m && m[1].includes(`reason="${reason}"`)) total += Number(m[2])
  }
  return total
}

/** Every action stored in `channel`, read through the server API (GET /api/v1/channel). */
export async function storedActions(ferryPort, channel) {
  let all = []
  let since = 0
  for (;;) {
    let res = await httpGet(
      ferryPort,
      `/api/v1/channel?name=${encodeURIComponent(channel)}&since=${since}&limit=500`,
      { Authorization: `Bearer ${API_SECRET}` }
    )
    assert.equal(res.status, 200, `GET /api/v1/channel: ${res.status} ${res.body}`)
    let page = JSON.parse(res.body)
    all.push(...page.actions)
    if (page.actions.length === 0 || page.next === since) return all
    since = page.next
  }
}

/** Asserts every text is stored exactly once in the room's channel. */
export async function assertStoredOnce(ferryPort, room, texts) {
  let stored = (await storedActions(ferryPort, 'room/' + room))
    .map(e => e.action)
    .filter(a => a.type === 'room/message')
  for (let text of texts) {
    let n = stored.filter(a => a.text === text).length
    assert.equal(n, 1, `"${text}" stored ${n} times in room/${room} (stored: ${JSON.stringify(stored.map(a => a.text))})`)
  }
  let ids = stored.map(a => a.id)
  assert.equal(new Set(ids).size, ids.length, 'a message id stored twice')
  return stored
}

/**
 * Runs one browser scenario. `body(env)` gets:
 *   ferry (a ServerHandle), proxy, origin (the allowed page origin),
 *   otherOrigin (an origin Ferry does not list), browser, transport,
 *   open(context, opts) to open the chat page, pages (every page opened)
 * On failure every open page is screenshotted into output/.
 */
export function scenario(name, transport, body) {
  return async t => {
    let dataDir = await mkdtemp(path.join(os.tmpdir(), 'ferry-browser-'))
    let stops = []
    let pages = []
    let browser = null
    let ferry = null
    try {
      let site = await serveStatic(0)
      stops.push(() => new Promise(resolve => site.close(() => resolve())))
      let other = await serveStatic(0)
      stops.push(() => new Promise(resolve => other.close(() => resolve())))
      let origin = `http://${HOST}:${site.address().port}`
      let otherOrigin = `http://${HOST}:${other.address().port}`
      stops.push(() => {
        site.closeAllConnections()
        other.closeAllConnections()
      })

      let config = path.join(dataDir, 'ferry.toml')
      await writeFile(config, chatConfig(origin))
      ferry = await startServer({ config, dataDir: path.join(dataDir, 'data') })
      let ferryRef = ferry
      stops.push(() => ferryRef.stop())
      let proxy = await startProxy(ferry.port)
      stops.push(() => proxy.close())

      browser = await within(
        20_000,
        'launching Chromium',
        puppeteer.launch({
          executablePath: CHROMIUM,
          headless: true,
          protocolTimeout: 20_000,
          args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', '--no-first-run']
        })
      )

      let open = async (context, opts = {}) => {
        let page = await context.newPage()
        pages.push(page)
        page.on('pageerror', e => console.log(`[page ${opts.user ?? 'alice'}] error: ${e.message}`))
        page.on('console', m => {
          if (process.env.BROWSER_SHOW_CONSOLE) {
            console.log(`[page ${opts.user ?? 'alice'}] ${m.type()}: ${m.text()}`)
          }
        })
        let q = new URLSearchParams({
          transport,
          server: opts.server ?? proxy.url,
          user: opts.user ?? 'alice',
          room: opts.room ?? 'r1'
        })
        if (opts.beforeGoto) await opts.beforeGoto(page)
        await page.goto(`${opts.origin ?? origin}/?${q}`, { waitUntil: 'load', timeout: WAIT_MS })
        await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS })
        return page
      }

      await body({ ferry, proxy, origin, otherOrigin, browser, transport, open, pages, t })
    } catch (e) {
      await mkdir(OUTPUT, { recursive: true })
      let slug = name.replace(/[^a-z0-9]+/gi, '-') + '-' + transport
      for (let [i, page] of pages.entries()) {
        try {
          if (page.isClosed()) continue
          let file = path.join(OUTPUT, `${slug}-page${i + 1}.png`)
          await within(5000, 'screenshot', page.screenshot({ path: file, fullPage: true }))
          console.log(`screenshot: ${file}`)
        } catch {}
      }
      if (ferry && e && typeof e === 'object') {
        try {
          e.message = `${e.message}\n${ferry.tail(4000)}`
        } catch {}
      }
      throw e
    } finally {
      if (browser) {
        let pid = browser.process()?.pid
        try {
          await within(5000, 'browser.close()', browser.close())
        } catch {}
        if (pid) {
          try {
            process.kill(pid, 'SIGKILL')
          } catch {}
        }
      }
      for (let stop of stops.reverse()) {
        try {
          await within(10_000, 'stopping', Promise.resolve(stop()))
        } catch {}
      }
      await rm(dataDir, { recursive: true, force: true })
    }
  }
}

// In-page helpers (run in the browser through page.evaluate / waitForFunction).

/** The Redux state of a page. */
export function reduxState(page) {
  return page.evaluate(() => window.chat.store.getState())
}

/** The message texts in a page's Redux state. */
export async function texts(page) {
  return (await reduxState(page)).messages.map(m => m.text)
}

/** Waits until the page's Redux state holds every one of `wanted`. */
export async function waitForTexts(page, wanted, timeout = WAIT_MS) {
  try {
    await page.waitForFunction(
      w => {
        let have = window.chat.store.getState().messages.map(m => m.text)
        return w.every(x => have.includes(x))
      },
      { timeout, polling: 100 },
      wanted
    )
  } catch (e) {
    throw new Error(`waiting for ${JSON.stringify(wanted)}; the page has ${JSON.stringify(await texts(page))}: ${e.message}`)
  }
}

/** Waits until the page's status helper says `state` (e.g. 'synchronized', 'disconnected'). */
export async function waitForStatus(page, states, timeout = WAIT_MS) {
  let list = [].concat(states)
  try {
    await page.waitForFunction(s => s.includes(window.chat.status), { timeout, polling: 100 }, list)
  } catch (e) {
    let now = await page.evaluate(() => window.chat.status)
    throw new Error(`waiting for status ${list.join('|')}; it is ${now}: ${e.message}`)
  }
}

/** Types `text` into the page's form and sends it (as a user does). */
export async function say(page, text) {
  // A background tab renders no frames, so clicks in it would wait forever.
  await page.bringToFront()
  await page.click('#text', { count: 3 })
  await page.type('#text', text)
  await page.click('#send')
}
