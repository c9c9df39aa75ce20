// A real NATS JetStream cluster on loopback (nats-server child processes), for the
// cluster-mode tests. The same cluster as tests/support/nats.rs on the Rust side.
//
// The binary is $NATS_SERVER_BIN, else nats-server on PATH, else /usr/sbin/nats-server
// (Debian's package; scripts/test.sh installs it). Node i is named n<i> (its JetStream
// server_name, which is also what stream info reports as a leader); every node binds
// 127.0.0.1 only and has its own config, store directory and log file in one temporary
// directory, removed by stop().
//
//   let nats = await startNatsCluster({ nodes: 3 })
//   t.after(() => nats.stop())
//   nats.urls            // ['nats://127.0.0.1:<port>', ...] of every node
//   await nats.kill(0)   // SIGKILL, as in a crash; keeps the store for restart()
//   await nats.restart(0)

import { spawn } from 'node:child_process'
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import net from 'node:net'
import os from 'node:os'
import path from 'node:path'

const HOST = '127.0.0.1'
const HEALTH_TIMEOUT_MS = 30_000
const POLL_MS = 100
const REQUEST_TIMEOUT_MS = 2_000
const START_ATTEMPTS = 3
const LOG_TAIL_CHARS = 4_000

/** The nats-server binary the tests run. */
export function natsServerBin() {
  if (process.env.NATS_SERVER_BIN) return process.env.NATS_SERVER_BIN
  for (let dir of (process.env.PATH || '').split(path.delimiter)) {
    let candidate = path.join(dir || '.', 'nats-server')
    if (existsSync(candidate)) return candidate
  }
  return '/usr/sbin/nats-server'
}

/**
 * `count` distinct free TCP ports on 127.0.0.1: all bound to port 0 at once (so they
 * differ), then released for nats-server to bind. Another process could take one in
 * between; that node then fails to start and startNatsCluster tries again.
 */
async function freePorts(count) {
  let servers = []
  try {
    for (let i = 0; i < count; i++) {
      let srv = net.createServer()
      servers.push(srv)
      await new Promise((resolve, reject) => {
        srv.once('error', reject)
        srv.listen(0, HOST, resolve)
      })
    }
    return servers.map(srv => srv.address().port)
  } finally {
    await Promise.all(servers.map(srv => new Promise(resolve => srv.close(() => resolve()))))
  }
}

function delay(ms) {
  return new Promise(resolve => setTimeout(resolve, ms))
}

/** GET http://127.0.0.1:<port><path>: { status, body }, or status 0 on a network error. */
async function httpGet(port, urlPath) {
  try {
    let res = await fetch(`http://${HOST}:${port}${urlPath}`, {
      signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS)
    })
    return { status: res.status, body: await res.text() }
  } catch {
    return { status: 0, body: '' }
  }
}

const running = new Set()
process.on('exit', () => {
  // Last resort: never leave a nats-server behind if a test forgot stop().
  for (let child of running) {
    try {
      child.kill('SIGKILL')
    } catch {}
  }
})

class NatsNode {
  constructor({ name, clientPort, monitorPort, config, log }) {
    this.name = name
    this.clientPort = clientPort
    this.monitorPort = monitorPort
    this.config = config
    this.log = log
    this.child = null
    this.exited = null
  }

  get url() {
    return `nats://${HOST}:${this.clientPort}`
  }

  /** True while the process runs. */
  get alive() {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null
  }

  spawn() {
    // stdout/stderr (a Go panic, a bad config) go to the same file as the log (-l).
    let fd = openSync(this.log, 'a')
    let child
    try {
      child = spawn(natsServerBin(), ['-c', this.config, '-l', this.log], {
        stdio: ['ignore', fd, fd]
      })
    } finally {
      closeSync(fd)
    }
    this.child = child
    running.add(child)
    this.exited = new Promise(resolve => {
      child.on('exit', (code, signal) => {
        running.delete(child)
        resolve({ code, signal })
      })
      child.on('error', error => {
        running.delete(child)
        this.mark(`spawn error: ${error.message}`)
        resolve({ code: null, signal: null, error })
      })
    })
  }

  /** SIGKILL by pid and wait until the process is gone. */
  async kill() {
    if (!this.child) return null
    if (this.alive) this.child.kill('SIGKILL')
    let result = await this.exited
    this.child = null
    return result
  }

  mark(line) {
    try {
      writeFileSync(this.log, `=== ferry test harness: ${line} ===\n`, { flag: 'a' })
    } catch {}
  }

  tail(chars = LOG_TAIL_CHARS) {
    let text
    try {
      text = readFileSync(this.log, 'utf8')
    } catch (e) {
      text = `(no log: ${e.message})`
    }
    if (text.length > chars) text = '…' + text.slice(-chars)
    return `--- ${this.name} (${this.log}) log tail ---\n${text}\n--- end of ${this.name} log ---`
  }

  async healthy() {
    return (await httpGet(this.monitorPort, '/healthz')).status === 200
  }

  /** This node's /jsz?streams=true as an object, or null. */
  async jsz() {
    let { status, body } = await httpGet(this.monitorPort, '/jsz?streams=true')
    if (status !== 200) return null
    try {
      return JSON.parse(body)
    } catch {
      return null
    }
  }
}

class NatsCluster {
  constructor(dir, nodes) {
    /** The temporary directory with the configs, stores and logs. */
    this.dir = dir
    this.nodes = nodes
  }

  /** The client URL of every node, killed ones included. */
  get urls() {
    return this.nodes.map(node => node.url)
  }

  url(i) {
    return this.nodes[i].url
  }

  isRunning(i) {
    return this.nodes[i].alive
  }

  /** The last part of the logs of the given nodes (default: all), for failure messages. */
  logTails(indices = this.nodes.map((_, i) => i)) {
    return indices.map(i => this.nodes[i].tail()).join('\n')
  }

  /** Waits until the given nodes answer /healthz with 200 (a meta leader exists). */
  async waitHealthy(indices, timeoutMs = HEALTH_TIMEOUT_MS) {
    let deadline = Date.now() + timeoutMs
    let pending = [...indices]
    while (true) {
      let still = []
      for (let i of pending) {
        let node = this.nodes[i]
        if (!node.alive) {
          throw new Error(`${node.name} exited before it was healthy (port taken?)\n${this.logTails(indices)}`)
        }
        if (!(await node.healthy())) still.push(i)
      }
      if (still.length === 0) return
      if (Date.now() >= deadline) {
        let names = still.map(i => this.nodes[i].name).join(', ')
        throw new Error(`${names} did not answer /healthz with 200 within ${timeoutMs} ms\n${this.logTails(indices)}`)
      }
      pending = still
      await delay(POLL_MS)
    }
  }

  /** SIGKILL node i (a crash) and wait for it to be gone; its store stays for restart(). */
  async kill(i) {
    await this.nodes[i].kill()
    this.nodes[i].mark('killed (SIGKILL)')
  }

  /** Starts node i again (killing it first if it runs) on the same config, ports and store. */
  async restart(i) {
    let node = this.nodes[i]
    await node.kill()
    node.mark('restart')
    node.spawn()
    await this.waitHealthy([i])
  }

  /**
   * The node index that leads `stream`, by its own word: a running node whose
   * /jsz?streams=true lists the stream with cluster.leader equal to its name. null during
   * an election or when the stream does not exist.
   */
  async streamLeader(stream) {
    for (let [i, node] of this.nodes.entries()) {
      if (!node.alive) continue
      let jsz = await node.jsz()
      let detail = (jsz?.account_details || [])
        .flatMap(account => account.stream_detail || [])
        .find(s => s.name === stream)
      if (detail?.cluster?.leader === node.name) return i
    }
    return null
  }

  async waitForStreamLeader(stream, timeoutMs = HEALTH_TIMEOUT_MS) {
    let deadline = Date.now() + timeoutMs
    while (true) {
      let leader = await this.streamLeader(stream)
      if (leader !== null) return leader
      if (Date.now() >= deadline) {
        throw new Error(`stream ${stream} had no leader within ${timeoutMs} ms\n${this.logTails()}`)
      }
      await delay(POLL_MS)
    }
  }

  /** Kills every node by pid (SIGKILL) and removes the temporary directory. */
  async stop() {
    await Promise.all(this.nodes.map(node => node.kill()))
    await rm(this.dir, { recursive: true, force: true })
  }
}

async function tryStart(count) {
  let dir = await mkdtemp(path.join(os.tmpdir(), 'ferry-nats-'))
  let nodes = []
  try {
    // Three ports per node: client, monitoring (HTTP), cluster route.
    let ports = await freePorts(3 * count)
    let clients = ports.slice(0, count)
    let monitors = ports.slice(count, 2 * count)
    let routes = ports.slice(2 * count)
    for (let i = 0; i < count; i++) {
      let name = `n${i}`
      let lines = [
        `server_name: ${name}`,
        `listen: ${HOST}:${clients[i]}`,
        `http: ${HOST}:${monitors[i]}`,
        `jetstream { store_dir: ${JSON.stringify(path.join(dir, name))} }`
      ]
      if (count > 1) {
        let others = routes.filter((_, j) => j !== i).map(port => `nats-route://${HOST}:${port}`)
        lines.push(
          'cluster {',
          '  name: ferry-test',
          `  listen: ${HOST}:${routes[i]}`,
          `  routes: [${others.join(', ')}]`,
          '}'
        )
      }
      let config = path.join(dir, `${name}.conf`)
      await writeFile(config, lines.join('\n') + '\n')
      nodes.push(
        new NatsNode({
          name,
          clientPort: clients[i],
          monitorPort: monitors[i],
          config,
          log: path.join(dir, `${name}.log`)
        })
      )
    }
    let cluster = new NatsCluster(dir, nodes)
    for (let node of nodes) node.spawn()
    await cluster.waitHealthy(nodes.map((_, i) => i))
    return cluster
  } catch (e) {
    await Promise.all(nodes.map(node => node.kill()))
    // Keep the logs of a failed attempt in the error message only.
    await rm(dir, { recursive: true, force: true })
    throw e
  }
}

/**
 * Starts `nodes` nats-server processes with JetStream (3 for a cluster; 1 is a standalone
 * server without a cluster block) and waits until every one answers /healthz with 200.
 * Tries three times with fresh ports, then throws with the nodes' log tails.
 * Returns { urls, url(i), kill(i), restart(i), isRunning(i), streamLeader(name),
 * waitForStreamLeader(name, ms), logTails(), stop() }.
 */
export async function startNatsCluster({ nodes = 3 } = {}) {
  if (!(nodes >= 1)) throw new Error('a NATS cluster needs at least one node')
  let failures = []
  for (let attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
    try {
      return await tryStart(nodes)
    } catch (e) {
      failures.push(e.message)
    }
  }
  throw new Error(
    `a ${nodes}-node NATS cluster (${natsServerBin()}) did not start in ${START_ATTEMPTS} attempts:\n` +
      failures.join('\n')
  )
}
