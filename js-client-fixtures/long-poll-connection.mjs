// A Logux Connection over Ferry's HTTP long-poll transport, for clients that
// cannot open a WebSocket. It implements the Connection interface of
// @logux/core 0.10 (connected, connect(), disconnect(reason), send(message),
// on(event, listener), emitter), so unchanged clients use it as
//
//   new Client({ server: new Reconnect(new LongPollConnection(url)), ... })
//
// The HTTP contract it speaks is in Ferry's README ("Long-poll transport"):
//   POST {url}/lp/open                    → {session, hold_ms, expiry_ms}
//   POST {url}/lp/<id>/send {seq, messages} → {received}
//   GET  {url}/lp/<id>/poll?ack=N          → {first, messages, closed}
//   POST {url}/lp/<id>/close
//
// Guarantees: frames go out and come in in order, exactly once, whatever HTTP
// request or response is lost or repeated. Outgoing frames are numbered and
// kept until the server says it received them; a lost `send` is repeated with
// the same numbers and the server applies only the new ones. Incoming frames
// are numbered by the server and kept there until a later poll acknowledges
// them; a lost poll answer is simply asked for again. One send and one poll are
// in flight at a time; frames queued while a send is in flight go together in
// the next one.
//
// Failures and back-off: a request that fails (network error, timeout, 408,
// 429, 5xx) is repeated after 100 ms, 250 ms, 500 ms, 1 s, then every 2 s; after
// `giveUpMs` (10 s) of failures the connection emits `disconnect`, and
// Reconnect takes over. A 503 on `open` (the server is busy) keeps the
// connection in `connecting` for the `Retry-After` seconds before it emits
// `disconnect`, so Reconnect's own back-off comes on top of the server's wish
// (Reconnect's attempt counter is not reset, since `connect` never fired).
// 410 (the session expired or was closed) emits `disconnect` at once.
//
// No dependencies: it needs only the platform `fetch` (Node 20+, browsers).

const DEFAULT_OPTIONS = {
  // Pauses between repeats of a failed request; the last one repeats.
  retryDelaysMs: [100, 250, 500, 1000, 2000],
  // A request that keeps failing this long ends the connection.
  giveUpMs: 10_000,
  // Time allowed for `open`, `send` and `close`.
  requestTimeoutMs: 30_000,
  // Added to the server's hold time to get a poll's time limit.
  pollSlackMs: 10_000,
  // Frames are batched into one `send` up to about this many bytes (a larger
  // single frame goes alone).
  batchBytesMax: 1024 * 1024,
  // The longest Retry-After honoured.
  retryAfterMaxMs: 60_000
}

// Statuses after which the same request is repeated.
const RETRYABLE = new Set([408, 429, 500, 502, 503, 504])

// The same shape as nanoevents, which @logux/core uses.
function createEmitter() {
  return {
    events: {},
    emit(event, ...args) {
      let callbacks = this.events[event] || []
      for (let i = 0, length = callbacks.length; i < length; i++) callbacks[i](...args)
    },
    on(event, cb) {
      ;(this.events[event] ||= []).push(cb)
      return () => {
        this.events[event] = this.events[event]?.filter(i => cb !== i)
      }
    }
  }
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms, signal) {
  return new Promise(resolve => {
    if (signal.aborted) return resolve()
    let timer = setTimeout(done, ms)
    function done() {
      clearTimeout(timer)
      signal.removeEventListener('abort', done)
      resolve()
    }
    signal.addEventListener('abort', done)
  })
}

/** The Retry-After of an answer in ms (seconds or an HTTP date), or 0. */
function retryAfterMs(answer, max) {
  let value = answer.retryAfter
  if (!value) return 0
  let seconds = Number(value)
  let ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now()
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), max) : 0
}

class RequestFailed extends Error {}

export class LongPollConnection {
  /**
   * @param {string} url the server's base URL, like `http://127.0.0.1:31337`
   *   (endpoints are under `<url>/lp/`)
   * @param {object} [opts]
   * @param {typeof fetch} [opts.fetch] the fetch to use (tests inject faults here)
   * @param {RequestCredentials} [opts.credentials] fetch credentials mode;
   *   'include' sends cookies to another origin (the server must list it in
   *   `[long_poll] cors_origins`). Default 'same-origin'.
   * @param {Record<string,string>} [opts.headers] extra request headers
   * Other options: see DEFAULT_OPTIONS.
   */
  constructor(url, opts = {}) {
    let { fetch: fetchImpl, credentials = 'same-origin', headers = {}, ...rest } = opts
    this.url = url
    this.base = String(url).replace(/\/+$/, '') + '/lp'
    this.fetchImpl = fetchImpl ?? ((...args) => globalThis.fetch(...args))
    this.credentials = credentials
    this.extraHeaders = headers
    this.options = { ...DEFAULT_OPTIONS, ...rest }
    this.connected = false
    this.emitter = createEmitter()
    // The current attempt: {controller, aborted}; null when disconnected.
    this.attempt = null
    // The open session: see open(); null when not connected.
    this.session = null
    this.opening = null
  }

  on(event, listener) {
    return this.emitter.on(event, listener)
  }

  connect() {
    if (this.attempt) return this.opening ?? Promise.resolve()
    let attempt = { controller: new AbortController(), aborted: false }
    this.attempt = attempt
    this.emitter.emit('connecting')
    let opening = this.open(attempt)
    this.opening = opening
    opening.finally(() => {
      if (this.opening === opening) this.opening = null
    })
    return opening
  }

  disconnect(reason) {
    let attempt = this.attempt
    if (!attempt) return
    let session = this.session
    this.stop(attempt)
    // Frames sent right before disconnecting (a wrong-format error, say) still
    // reach the server, then the session is closed.
    if (session) this.finish(session)
    this.emitter.emit('disconnect', reason)
  }

  /** Sends a Logux message (an array). */
  send(message) {
    this.sendText(JSON.stringify(message))
  }

  /** Sends one frame's exact text, even one that is not JSON (for tests). */
  sendText(text) {
    let s = this.session
    if (!s) {
      this.emitter.emit('error', new Error('Long-poll connection was closed'))
      return
    }
    s.queue.push({ n: s.nextSeq++, text })
    if (!s.sending) {
      s.sending = true
      // Frames sent in the same tick go in one request.
      queueMicrotask(() => this.sendLoop(s))
    }
  }

  // Internals.

  stop(attempt) {
    attempt.aborted = true
    attempt.controller.abort()
    if (this.attempt === attempt) this.attempt = null
    this.session = null
    this.connected = false
  }

  async open(attempt) {
    let answer
    try {
      answer = await this.request(attempt.controller.signal, 'POST', '/open', undefined, this.options.requestTimeoutMs)
    } catch {
      return this.failOpen(attempt, 0)
    }
    if (answer.status !== 200 || typeof answer.json?.session !== 'string') {
      let busy = answer.status === 503 || answer.status === 429
      return this.failOpen(attempt, busy ? retryAfterMs(answer, this.options.retryAfterMaxMs) : 0)
    }
    let id = answer.json.session
    if (attempt.aborted) {
      this.closeSession(id)
      return
    }
    this.session = {
      id,
      attempt,
      holdMs: Number(answer.json.hold_ms) || 25_000,
      // Outgoing: the next frame's number, frames not acknowledged yet.
      nextSeq: 1,
      acked: 0,
      queue: [],
      sending: false,
      // Incoming: the number of the last frame delivered.
      received: 0
    }
    this.connected = true
    this.emitter.emit('connect')
    this.pollLoop(this.session)
  }

  async failOpen(attempt, waitMs) {
    if (waitMs > 0) await sleep(waitMs, attempt.controller.signal)
    // A disconnect() during the wait has emitted `disconnect` already.
    if (attempt.aborted) return
    this.stop(attempt)
    this.emitter.emit('disconnect')
  }

  /** The server ended the session (or it cannot go on): disconnect without sending more. */
  end(s, { close }) {
    if (this.session !== s) return
    this.stop(s.attempt)
    if (close) this.closeSession(s.id)
    this.emitter.emit('disconnect')
  }

  async sendLoop(s) {
    try {
      while (this.session === s && s.queue.length > 0) {
        let batch = []
        let bytes = 0
        for (let frame of s.queue) {
          if (batch.length > 0 && bytes + frame.text.length > this.options.batchBytesMax) break
          batch.push(frame)
          bytes += frame.text.length
        }
        let body = JSON.stringify({ seq: batch[0].n, messages: batch.map(frame => frame.text) })
        let answer
        try {
          answer = await this.retrying(s, () =>
            this.request(s.attempt.controller.signal, 'POST', `/${s.id}/send`, body, this.options.requestTimeoutMs)
          )
        } catch {
          return this.end(s, { close: true })
        }
        if (this.session !== s) return
        if (answer.status === 410) return this.end(s, { close: false })
        if (answer.status !== 200 || typeof answer.json?.received !== 'number') {
          // 400, 409 (a gap, which this client never makes) or 413: this session
          // cannot deliver its frames. Logux resends unsynced actions after
          // reconnecting.
          return this.end(s, { close: true })
        }
        s.acked = Math.max(s.acked, answer.json.received)
        let done = 0
        while (done < s.queue.length && s.queue[done].n <= s.acked) done++
        s.queue.splice(0, done)
      }
    } finally {
      s.sending = false
    }
  }

  async pollLoop(s) {
    while (this.session === s) {
      let answer
      try {
        answer = await this.retrying(s, () =>
          this.request(
            s.attempt.controller.signal,
            'GET',
            `/${s.id}/poll?ack=${s.received}`,
            undefined,
            s.holdMs + this.options.pollSlackMs
          )
        )
      } catch {
        return this.end(s, { close: true })
      }
      if (this.session !== s) return
      if (answer.status === 410) return this.end(s, { close: false })
      let body = answer.json
      if (answer.status !== 200 || !body || !Array.isArray(body.messages) || typeof body.first !== 'number') {
        return this.end(s, { close: true })
      }
      if (!this.deliver(s, body)) return
      if (body.closed) return this.end(s, { close: true })
    }
  }

  /** Emits the frames not delivered yet; false when the session ended meanwhile. */
  deliver(s, body) {
    let n = body.first
    if (n > s.received + 1) {
      // Frames were dropped before this client had them: never with a correct server.
      this.end(s, { close: true })
      return false
    }
    for (let text of body.messages) {
      if (n > s.received) {
        s.received = n
        let message
        try {
          message = JSON.parse(text)
        } catch {
          let err = new Error('Wrong message format')
          err.received = text
          this.emitter.emit('error', err)
        }
        if (message !== undefined) this.emitter.emit('message', message)
        // A listener may have disconnected.
        if (this.session !== s) return false
      }
      n++
    }
    return true
  }

  /** Repeats `makeRequest` while it fails in a way worth repeating. */
  async retrying(s, makeRequest) {
    let started = Date.now()
    for (let i = 0; ; i++) {
      let waitMs
      try {
        let answer = await makeRequest()
        if (!RETRYABLE.has(answer.status)) return answer
        waitMs = retryAfterMs(answer, this.options.retryAfterMaxMs)
      } catch (e) {
        if (this.session !== s) throw e
      }
      let delays = this.options.retryDelaysMs
      waitMs ||= delays[Math.min(i, delays.length - 1)]
      if (Date.now() - started + waitMs > this.options.giveUpMs) {
        throw new RequestFailed('the server did not answer in time')
      }
      await sleep(waitMs, s.attempt.controller.signal)
      if (this.session !== s) throw new RequestFailed('disconnected')
    }
  }

  /**
   * One HTTP request; resolves with {status, retryAfter, json} once the whole
   * body is read, so that a response cut in the middle counts as lost.
   */
  async request(signal, method, path, body, timeoutMs, { keepalive = false } = {}) {
    let controller = new AbortController()
    let abort = () => controller.abort()
    signal?.addEventListener('abort', abort)
    if (signal?.aborted) controller.abort()
    let timer = setTimeout(abort, timeoutMs)
    try {
      let headers = { ...this.extraHeaders }
      if (body !== undefined) headers['Content-Type'] = 'application/json'
      let response = await this.fetchImpl(this.base + path, {
        method,
        body,
        headers,
        credentials: this.credentials,
        cache: 'no-store',
        keepalive,
        signal: controller.signal
      })
      let text = await response.text()
      let json = null
      if (text) {
        try {
          json = JSON.parse(text)
        } catch {
          if (response.status === 200) throw new RequestFailed('a cut or garbled answer')
        }
      }
      return { status: response.status, retryAfter: response.headers.get('retry-after'), json }
    } finally {
      clearTimeout(timer)
      signal?.removeEventListener('abort', abort)
    }
  }

  /** Sends what the server has not acknowledged yet, then closes the session. */
  async finish(s) {
    if (s.queue.length > 0) {
      let body = JSON.stringify({ seq: s.queue[0].n, messages: s.queue.map(frame => frame.text) })
      try {
        await this.request(null, 'POST', `/${s.id}/send`, body, this.options.requestTimeoutMs)
      } catch {}
    }
    this.closeSession(s.id)
  }

  closeSession(id) {
    // keepalive lets the close go out even while a browser page unloads.
    this.request(null, 'POST', `/${id}/close`, undefined, this.options.requestTimeoutMs, {
      keepalive: true
    }).catch(() => {})
  }
}
