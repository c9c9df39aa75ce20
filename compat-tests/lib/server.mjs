// Starts and stops the server under test.
//
// By default this runs the Ferry binary:
//   $FERRY_BIN serve --config <file> --listen 127.0.0.1:<port> --data-dir <dir>
// FERRY_BIN defaults to ../target/release/ferry relative to compat-tests/.
//
// COMPAT_SERVER_CMD replaces the binary with any shell command (for example a
// reference @logux/server app, to check the tests themselves). The command gets
// PORT, HOST, FERRY_CONFIG and FERRY_DATA_DIR in its environment and must serve
// GET /health with 200 on that port.
//
// Every server binds 127.0.0.1 only.

import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises'
import http from 'node:http'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
/** The compat-tests/ folder. */
export const ROOT = path.resolve(HERE, '..')
export const DEFAULT_CONFIG = path.join(ROOT, 'ferry-test.toml')
export const HOST = '127.0.0.1'

const HEALTH_TIMEOUT_MS = 15_000
const HEALTH_POLL_MS = 50
const STOP_GRACE_MS = 5_000
const OUTPUT_LIMIT_CHARS = 200_000
const OUTPUT_TAIL_CHARS = 8_000

/** True when the suite runs against something other than the Ferry binary. */
export const EXTERNAL_SERVER = Boolean(process.env.COMPAT_SERVER_CMD)

/** Where the Ferry binary is expected. */
export function ferryBin() {
  let bin = process.env.FERRY_BIN || '../target/release/ferry'
  return path.resolve(ROOT, bin)
}

/** Finds a free TCP port on 127.0.0.1 (bind port 0, read it, close). */
export function freePort() {
  return new Promise((resolve, reject) => {
    let srv = net.createServer()
    srv.unref()
    srv.on('error', reject)
    srv.listen(0, HOST, () => {
      let { port } = srv.address()
      srv.close(() => resolve(port))
    })
  })
}

function delay(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

/** One GET /health; resolves with the status code, or 0 on a network error. */
function healthStatus(port, urlPath = '/health') {
  return new Promise(resolve => {
    let req = http.get(
      { host: HOST, port, path: urlPath, timeout: 1000, agent: false },
      res => {
        res.resume()
        resolve(res.statusCode)
      }
    )
    req.on('timeout', () => req.destroy())
    req.on('error', () => resolve(0))
  })
}

const running = new Set()
process.on('exit', () => {
  // Last resort: never leave a server behind if a test forgot to stop it.
  for (let child of running) {
    try {
      child.kill('SIGKILL')
    } catch {}
  }
})

export class ServerHandle {
  constructor({ port, config, dataDir, ownsDataDir, extraEnv, readyPath = '/health', configDir = null }) {
    /** The port the server listens on (kept across restarts). */
    this.port = port
    this.config = config
    /** The data directory (kept across restarts, removed by stop()). */
    this.dataDir = dataDir
    this.ownsDataDir = ownsDataDir
    this.extraEnv = extraEnv
    /** The path polled until it answers 200 (/health, or /ready for a cluster node). */
    this.readyPath = readyPath
    /** A temporary directory holding a generated config (extraToml), removed by stop(). */
    this.configDir = configDir
    this.child = null
    this.exited = null
    this.output = ''
    this.starts = 0
  }

  /** The command line, for messages. */
  get command() {
    if (EXTERNAL_SERVER) return process.env.COMPAT_SERVER_CMD
    return [
      ferryBin(),
      'serve',
      '--config',
      this.config,
      '--listen',
      `${HOST}:${this.port}`,
      '--data-dir',
      this.dataDir
    ].join(' ')
  }

  append(prefix, chunk) {
    this.output += chunk
      .toString()
      .split('\n')
      .map((line, i, all) => (i === all.length - 1 && line === '' ? '' : prefix + line))
      .join('\n')
    if (this.output.length > OUTPUT_LIMIT_CHARS) {
      this.output = this.output.slice(-OUTPUT_LIMIT_CHARS)
    }
  }

  /** The last part of the server's stdout/stderr. */
  tail(chars = OUTPUT_TAIL_CHARS) {
    let text = this.output.length > chars ? '…' + this.output.slice(-chars) : this.output
    return `--- server output (${this.command}) ---\n${text}\n--- end of server output ---`
  }

  /** An Error whose message ends with the server output (marked so that it is added once). */
  errorWithLog(message) {
    let err = new Error(`${message}\n${this.tail()}`)
    err.hasServerLog = true
    return err
  }

  spawnProcess() {
    this.starts += 1
    this.append('', `\n=== start #${this.starts} ===\n`)
    let env = {
      // Plain logs in failure messages (tracing-subscriber honours NO_COLOR).
      NO_COLOR: '1',
      ...process.env,
      ...this.extraEnv,
      PORT: String(this.port),
      HOST,
      FERRY_CONFIG: this.config,
      FERRY_DATA_DIR: this.dataDir
    }
    let child
    if (EXTERNAL_SERVER) {
      // `exec` so that signals reach the server itself, not the shell.
      child = spawn('sh', ['-c', 'exec ' + process.env.COMPAT_SERVER_CMD], {
        env,
        stdio: ['ignore', 'pipe', 'pipe']
      })
    } else {
      let bin = ferryBin()
      if (!existsSync(bin)) {
        throw new Error(
          `Ferry binary not found at ${bin}. Build it (cargo build --release) ` +
            'or set FERRY_BIN, or COMPAT_SERVER_CMD for another server.'
        )
      }
      child = spawn(
        bin,
        [
          'serve',
          '--config',
          this.config,
          '--listen',
          `${HOST}:${this.port}`,
          '--data-dir',
          this.dataDir
        ],
        { env, stdio: ['ignore', 'pipe', 'pipe'] }
      )
    }
    this.child = child
    running.add(child)
    child.stdout.on('data', chunk => this.append('[out] ', chunk))
    child.stderr.on('data', chunk => this.append('[err] ', chunk))
    this.exited = new Promise(resolve => {
      child.on('exit', (code, signal) => {
        running.delete(child)
        this.append('', `=== exited code=${code} signal=${signal} ===\n`)
        resolve({ code, signal })
      })
      child.on('error', err => {
        running.delete(child)
        this.append('', `=== spawn error: ${err.message} ===\n`)
        resolve({ code: null, signal: null, error: err })
      })
    })
  }

  /** True while the process runs. */
  get alive() {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null
  }

  async waitHealthy() {
    let deadline = Date.now() + HEALTH_TIMEOUT_MS
    let exitedEarly = false
    this.exited.then(() => {
      exitedEarly = true
    })
    while (Date.now() < deadline) {
      if (exitedEarly) {
        throw this.errorWithLog('server exited before it became healthy')
      }
      if ((await healthStatus(this.port, this.readyPath)) === 200) {
        // A server that failed to bind exits; the 200 then came from another
        // process that took the same port (only possible when several test
        // files run at once: run them with --test-concurrency=1).
        await delay(HEALTH_POLL_MS)
        if (exitedEarly || !this.alive) {
          throw this.errorWithLog('server exited right after /health answered (port taken by another process?)')
        }
        return
      }
      await delay(HEALTH_POLL_MS)
    }
    await this.kill()
    throw this.errorWithLog(`server did not answer GET ${this.readyPath} with 200 within ${HEALTH_TIMEOUT_MS} ms`)
  }

  async start() {
    this.spawnProcess()
    await this.waitHealthy()
    return this
  }

  async signalAndWait(signal, graceMs) {
    if (!this.alive) return this.exited
    this.child.kill(signal)
    if (graceMs === undefined) return this.exited
    let timer
    let result = await Promise.race([
      this.exited,
      new Promise(resolve => {
        timer = setTimeout(() => resolve('timeout'), graceMs)
      })
    ])
    clearTimeout(timer)
    if (result === 'timeout') {
      this.append('', `=== no exit ${graceMs} ms after ${signal}: SIGKILL ===\n`)
      if (this.alive) this.child.kill('SIGKILL')
      return this.exited
    }
    return result
  }

  /** Graceful stop of the process (SIGTERM, SIGKILL after 5 s); keeps the data dir. */
  async stopProcess() {
    if (!this.child) return null
    return this.signalAndWait('SIGTERM', STOP_GRACE_MS)
  }

  /** SIGKILL, as in a crash. Keeps the data dir so that restart() can reuse it. */
  async kill() {
    if (!this.child) return null
    return this.signalAndWait('SIGKILL')
  }

  /** Stops the process if it runs, then starts it again on the same port and data dir. */
  async restart() {
    await this.stopProcess()
    return this.start()
  }

  /** Final stop: SIGTERM (SIGKILL after 5 s) and removes the data dir it created. */
  async stop() {
    let result = await this.stopProcess()
    if (this.ownsDataDir) {
      await rm(this.dataDir, { recursive: true, force: true })
    }
    if (this.configDir) {
      await rm(this.configDir, { recursive: true, force: true })
    }
    return result
  }
}

/**
 * Writes `config` (a file) followed by `extraToml` (text, e.g. a `[cluster]` section) to a
 * new temporary directory; returns { dir, file }.
 */
async function configWithExtra(config, extraToml) {
  let dir = await mkdtemp(path.join(os.tmpdir(), 'ferry-compat-config-'))
  let file = path.join(dir, 'ferry.toml')
  let base = await readFile(config, 'utf8')
  await writeFile(file, `${base.replace(/\n*$/, '\n')}\n${extraToml}\n`)
  return { dir, file }
}

/**
 * Starts a server and waits for GET /health.
 * Options: port (default: a free one), config (default ferry-test.toml),
 * dataDir (default: a new temporary directory, removed by stop()), env,
 * extraToml (text appended to the config, e.g. a `[cluster]` section; written to a
 * temporary file removed by stop()), readyPath (default /health; a cluster node uses
 * /ready), start (default true; false returns the handle unstarted: call start()).
 */
export async function startServer(opts = {}) {
  let port = opts.port ?? (await freePort())
  let ownsDataDir = !opts.dataDir
  let dataDir = opts.dataDir ?? (await mkdtemp(path.join(os.tmpdir(), 'ferry-compat-')))
  let config = opts.config ?? DEFAULT_CONFIG
  let configDir = null
  if (opts.extraToml !== undefined) {
    let written = await configWithExtra(config, opts.extraToml)
    config = written.file
    configDir = written.dir
  }
  let handle = new ServerHandle({
    port,
    config,
    dataDir,
    ownsDataDir,
    extraEnv: opts.env ?? {},
    readyPath: opts.readyPath,
    configDir
  })
  if (opts.start === false) return handle
  try {
    await handle.start()
  } catch (e) {
    if (ownsDataDir) await rm(dataDir, { recursive: true, force: true })
    if (configDir) await rm(configDir, { recursive: true, force: true })
    throw e
  }
  return handle
}

/**
 * Starts a server for one test and stops it when the test ends:
 *   let srv = await serverForTest(t)
 */
export async function serverForTest(t, opts) {
  let srv = await startServer(opts)
  t.after(() => srv.stop())
  return srv
}

/**
 * Wraps a test body so that a failure carries the tail of the server output:
 *   test('x', withServer(async (t, srv) => { ... }))
 * The server is started before the body (unless opts.start is false: then
 * the body calls srv.start() itself) and stopped after it.
 */
export function withServer(body, opts) {
  return async t => {
    let srv = await serverForTest(t, opts)
    try {
      await body(t, srv)
    } catch (e) {
      if (e && typeof e === 'object' && !e.hasServerLog) {
        try {
          e.message = `${e.message}\n${srv.tail()}`
          e.hasServerLog = true
        } catch {}
      }
      throw e
    } finally {
      if (process.env.COMPAT_SHOW_SERVER_LOG) console.log(srv.tail(OUTPUT_LIMIT_CHARS))
    }
  }
}
