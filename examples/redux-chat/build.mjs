// Bundles src/app.js into dist/app.js with esbuild (from npm, no other download).
import { build } from 'esbuild'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

const HERE = path.dirname(fileURLToPath(import.meta.url))

await build({
  entryPoints: [path.join(HERE, 'src/app.js')],
  outfile: path.join(HERE, 'dist/app.js'),
  bundle: true,
  format: 'iife',
  target: 'es2020',
  sourcemap: true,
  loader: { '.svg': 'dataurl' },
  logLevel: 'warning'
})
console.log('built', path.relative(process.cwd(), path.join(HERE, 'dist/app.js')))
