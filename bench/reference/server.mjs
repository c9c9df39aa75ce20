// The reference app for ferry-bench: @logux/server 0.14 with the same rules as
// bench/ferry-bench.toml, so the two servers can be compared under the same load.
//
//   npm ci
//   PORT=31338 node server.mjs                  # production mode (default)
//   PORT=31338 ENV=development node server.mjs  # development mode (headers + debug messages)
//   PORT=31338 LOGGER=human node server.mjs     # full @logux/server log on stderr (costs CPU)
//
// It listens on 127.0.0.1 only.

import { Server } from '@logux/server'

const port = Number.parseInt(process.env.PORT ?? '31338', 10)
const env = process.env.ENV ?? 'production'
if (env !== 'production' && env !== 'development') {
  throw new Error(`ENV must be production or development, not ${env}`)
}

// Logging costs the server CPU on every action, and a benchmark measures the
// server, not its logger. By default only warnings and errors are printed
// (`LOGGER=human` or `LOGGER=json` turns the normal log back on). The reporter
// still builds every record before the logger drops it; that cost is the same
// for every action and small next to the JSON work.
function quietLogger() {
  let noop = () => {}
  let print = level => (details, msg) => {
    if (typeof details === 'string') {
      msg = details
      details = {}
    }
    process.stderr.write(`${level}: ${msg} ${JSON.stringify(details)}\n`)
  }
  let logger = {
    debug: noop,
    error: print('error'),
    fatal: print('fatal'),
    info: noop,
    trace: noop,
    warn: noop
  }
  // The reporter calls `logger.child` for nothing here, but pino-like loggers have it.
  logger.child = () => logger
  return logger
}

const logger = process.env.LOGGER ? process.env.LOGGER : quietLogger()

const server = new Server({
  env,
  host: '127.0.0.1',
  logger,
  minSubprotocol: 1,
  port,
  subprotocol: 1
})

// Any user id, one shared token: the same as `any_user_token = "secret"` in ferry-bench.toml.
server.auth(({ token }) => token === 'secret')

server.channel('room/:id', {
  access() {
    return true
  }
})

server.type('room/message', {
  access() {
    return true
  },
  resend(ctx, action) {
    return `room/${action.room}`
  },
  async process() {}
})

await server.listen()
process.stderr.write(`reference @logux/server listening on 127.0.0.1:${port} (${env}), pid ${process.pid}\n`)
