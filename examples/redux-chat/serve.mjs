// A static file server for index.html and dist/ on 127.0.0.1 (PORT, default 8080).
// `node serve.mjs` runs it; the browser tests import serveStatic().
import { readFile } from 'node:fs/promises'
import http from 'node:http'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const HERE = path.dirname(fileURLToPath(import.meta.url))
const TYPES = { '.html': 'text/html', '.js': 'text/javascript', '.map': 'application/json' }

/** Serves `dir` on 127.0.0.1:`port` (0: a free one); resolves with the http.Server. */
export function serveStatic(port = 0, dir = HERE) {
  let server = http.createServer(async (req, res) => {
    let url = new URL(req.url, 'http://x')
    let rel = url.pathname === '/' ? 'index.html' : url.pathname.slice(1)
    let file = path.resolve(dir, rel)
    if (!file.startsWith(dir + path.sep) || !(rel === 'index.html' || rel.startsWith('dist/'))) {
      res.writeHead(404).end()
      return
    }
    try {
      let body = await readFile(file)
      res.writeHead(200, { 'Content-Type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'Cache-Control': 'no-store' })
      res.end(body)
    } catch {
      res.writeHead(404).end()
    }
  })
  return new Promise((resolve, reject) => {
    server.on('error', reject)
    server.listen(port, '127.0.0.1', () => resolve(server))
  })
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  let port = Number(process.env.PORT || 8080)
  await serveStatic(port)
  console.log(`Redux chat on http://127.0.0.1:${port}/?transport=ws (or ?transport=long-poll); Ferry expected on http://127.0.0.1:31337`)
}
