// An E2B program for Node.js, unchanged, against a Hutch daemon (the README's "E2B SDK"
// JavaScript example). Configured only by E2B's own environment variables: E2B_API_URL and
// E2B_SANDBOX_URL (the daemon's --listen-e2b address) and E2B_API_KEY (a hutch token).
// Run as an ES module from the directory `e2b` is installed in (`node --input-type=module
// --eval`), which is where its imports resolve.

import assert from 'node:assert/strict'
import { readFileSync } from 'node:fs'

// README:begin
import { Sandbox } from 'e2b'

const sandbox = await Sandbox.create({ metadata: { suite: 'e2b-npm' }, timeoutMs: 300_000 })

const result = await sandbox.commands.run('echo hi')
assert.deepEqual([result.stdout, result.exitCode], ['hi\n', 0])
// README:end
import { AuthenticationError, CommandExitError } from 'e2b'

// A background command whose output streams while it runs.
const seen = []
const handle = await sandbox.commands.run('echo one; sleep 2; echo two', {
  background: true,
  onStdout: (out) => seen.push([performance.now(), out]),
})
const ended = await handle.wait()
const done = performance.now()
assert.equal(seen.map(([, out]) => out).join(''), 'one\ntwo\n')
assert.ok(seen[0][1] === 'one\n' && done - seen[0][0] > 1500, `not streamed: ${JSON.stringify(seen)}`)
assert.equal(ended.exitCode, 0)

// A failing command, and one killed by its pid.
await assert.rejects(sandbox.commands.run('echo oops >&2; exit 3'), (e) => {
  assert.ok(e instanceof CommandExitError, e)
  assert.deepEqual([e.exitCode, e.stderr], [3, 'oops\n'])
  return true
})
const sleeper = await sandbox.commands.run('sleep 600', { background: true })
assert.equal(await sandbox.commands.kill(sleeper.pid), true)
await assert.rejects(sleeper.wait(), CommandExitError)

await sandbox.files.write('/tmp/e2b/hello.txt', 'hello from e2b\n')
assert.equal(await sandbox.files.read('/tmp/e2b/hello.txt'), 'hello from e2b\n')
assert.deepEqual((await sandbox.files.list('/tmp/e2b')).map((e) => e.name), ['hello.txt'])
assert.equal(await sandbox.files.exists('/tmp/e2b/nothing'), false)

await sandbox.setTimeout(60_000)
const info = await sandbox.getInfo()
const left = (info.endAt.getTime() - Date.now()) / 1000
assert.ok(left > 40 && left <= 60, `setTimeout did not take: ${info.endAt}`)
assert.deepEqual(info.metadata, { suite: 'e2b-npm' })
const listed = await Sandbox.list({ query: { metadata: { suite: 'e2b-npm' } } }).nextItems()
assert.deepEqual(listed.map((s) => s.sandboxId), [sandbox.sandboxId])

assert.equal(await sandbox.kill(), true)
assert.equal(await Sandbox.kill(sandbox.sandboxId), false)

await assert.rejects(Sandbox.create({ apiKey: 'not-a-hutch-token' }), AuthenticationError)

const { version } = JSON.parse(readFileSync('node_modules/e2b/package.json', 'utf8'))
console.log(`e2b npm ${version}: ok`)
