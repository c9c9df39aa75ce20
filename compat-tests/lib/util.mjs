// Small helpers shared by the scenarios.

import { randomBytes } from 'node:crypto'

export function delay(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

/** A short random string, for room names and node ids that no other test uses. */
export function uniq(prefix = '') {
  return prefix + randomBytes(5).toString('hex')
}

/**
 * Polls `check` (sync or async) every 10 ms until it returns a truthy value,
 * which is returned. Throws with `what` and the optional `describe()` text
 * after `timeout` ms.
 */
export async function until(check, { timeout = 5000, what = 'condition', describe } = {}) {
  let deadline = Date.now() + timeout
  while (true) {
    let value = await check()
    if (value) return value
    if (Date.now() > deadline) {
      let extra = describe ? `\n${describe()}` : ''
      throw new Error(`timed out after ${timeout} ms waiting for ${what}${extra}`)
    }
    await delay(10)
  }
}

/** Resolves with the promise's value, or rejects after `ms` with `what`. */
export function withTimeout(promise, ms, what = 'promise') {
  let timer
  return Promise.race([
    promise,
    new Promise((resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    })
  ]).finally(() => clearTimeout(timer))
}

/** Waits for a promise to settle and returns {status, value|reason}. */
export function settle(promise) {
  return promise.then(
    value => ({ status: 'fulfilled', value }),
    reason => ({ status: 'rejected', reason })
  )
}

/**
 * Test options for scenarios that check Ferry's own behaviour, which the
 * reference @logux/server does not have (exact resync on re-subscribe, history
 * replay, de-duplication, restart durability, independent undo).
 * COMPAT_SKIP_FERRY_ONLY=1 skips them, for runs against the reference server.
 */
export const FERRY_ONLY = process.env.COMPAT_SKIP_FERRY_ONLY
  ? { skip: 'Ferry-only behaviour (COMPAT_SKIP_FERRY_ONLY is set)' }
  : {}
