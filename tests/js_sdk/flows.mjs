// The flows that @scalebox/sdk's README (and its dist/*.d.ts) document, run with the unchanged SDK against
// scalebox-local. Each flow prints one line: MARKER + JSON {flow, ok, ms, details, error?}. No line ever carries
// the API key or a sandbox's access token (checked before printing).
//
// Run by tests/test_js_sdk.py. Environment: SCALEBOX_JS_SDK_DIR (the folder where the SDK is installed),
// SCALEBOX_API_KEY, SCALEBOX_API_URL, NODE_EXTRA_CA_CERTS (scalebox-local's certificate). Optional arguments name
// the groups to run (default: all).

import assert from 'node:assert/strict'
import fs from 'node:fs'
import { createRequire } from 'node:module'
import os from 'node:os'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const MARKER = '@@FLOW@@'
const sdkEntry = createRequire(path.join(process.env.SCALEBOX_JS_SDK_DIR, 'package.json')).resolve('@scalebox/sdk')
const { Sandbox, CodeInterpreter, Session } = await import(pathToFileURL(sdkEntry).href)

const RUN = `js-${process.pid}-${Date.now()}`
const SECRETS = new Set([process.env.SCALEBOX_API_KEY].filter(Boolean))
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

// ---- reporting ---------------------------------------------------------------------------------------------------

function remember(sandbox) {
  if (sandbox?.envdAccessToken) SECRETS.add(sandbox.envdAccessToken)
  return sandbox
}

function describe(err) {
  const text = err instanceof Error ? `${err.name}: ${err.message}` : String(err)
  return text.length > 3000 ? text.slice(0, 3000) + '…' : text
}

function report(record) {
  let line = JSON.stringify(record, (_, value) => (typeof value === 'bigint' ? Number(value) : value))
  for (const secret of SECRETS) {
    if (line.includes(secret)) {
      line = JSON.stringify({ flow: record.flow, ok: false, ms: record.ms, error: 'a secret appeared in the report' })
    }
  }
  process.stdout.write(MARKER + line + '\n')
}

/** Run one flow with a deadline; `fn` fills `details` with what it saw and throws on a mismatch. */
async function flow(name, fn, timeoutMs = 60_000) {
  const details = {}
  const started = Date.now()
  let timer
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`flow did not finish within ${timeoutMs} ms`)), timeoutMs)
  })
  try {
    await Promise.race([fn(details), deadline])
    report({ flow: name, ok: true, ms: Date.now() - started, details })
  } catch (err) {
    report({ flow: name, ok: false, ms: Date.now() - started, details, error: describe(err) })
  } finally {
    clearTimeout(timer)
  }
}

function need(value, what) {
  if (!value) throw new Error(`skipped: ${what} is missing (an earlier flow failed)`)
  return value
}

/** Poll `probe` until it returns a truthy value (bounded). */
async function until(probe, what, timeoutMs = 10_000, everyMs = 100) {
  const end = Date.now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value) return value
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`)
    await sleep(everyMs)
  }
}

/** A background command's pid: the SDK fills it in when the start event arrives, after run() returned. */
const pidOf = (handle) =>
  until(() => {
    try {
      return handle.pid
    } catch {
      return undefined
    }
  }, 'the start event (pid)')

/** console.warn/error calls made while `fn` runs (the SDK warns there when a health check fails). */
async function warningsDuring(fn) {
  const seen = []
  const saved = [console.warn, console.error]
  console.warn = console.error = (...args) => seen.push(args.map(String).join(' ').slice(0, 300))
  try {
    return [await fn(), seen]
  } finally {
    ;[console.warn, console.error] = saved
  }
}

async function killQuietly(sandbox) {
  try {
    await sandbox?.kill()
  } catch {}
}

// ---- groups ------------------------------------------------------------------------------------------------------

async function lifecycle() {
  let sbx, second
  await flow('create_with_options', async (d) => {
    const started = Date.now()
    const [created, warnings] = await warningsDuring(() =>
      Sandbox.create('code-interpreter', {
        timeoutMs: 300_000,
        metadata: { suite: 'js-sdk', run: RUN, which: 'first' },
        envs: { FLOW_ENV: 'from-create' },
      }),
    )
    sbx = remember(created)
    d.ms = Date.now() - started
    d.warnings = warnings
    d.domain = sbx.sandboxDomain.replace(sbx.sandboxId, '<id>')
    assert.match(sbx.sandboxId, /^sbx-/)
    assert.deepEqual(warnings, [], 'the SDK warned while creating (its health check failed)')
    assert.ok(d.ms < 8000, `create took ${d.ms} ms`)
  })

  await flow('is_running', async (d) => {
    d.running = await need(sbx, 'sandbox').isRunning()
    assert.equal(d.running, true)
  })

  await flow('create_envs', async (d) => {
    const cmd = await need(sbx, 'sandbox').commands.run('echo "$FLOW_ENV"')
    d.command = cmd.stdout
    const code = await sbx.runCode('import os; print(os.environ.get("FLOW_ENV"))', { language: 'python' })
    d.code = code.stdout
    assert.equal(cmd.stdout, 'from-create\n')
    assert.equal(code.stdout, 'from-create\n')
  })

  await flow('get_info', async (d) => {
    const info = await need(sbx, 'sandbox').getInfo()
    d.info = {
      sandboxId: info.sandboxId,
      templateId: info.templateId,
      status: info.status,
      metadata: info.metadata,
      timeout: info.timeout,
      cpuCount: info.cpuCount,
      memoryMB: info.memoryMB,
      lifetimeS: Math.round((info.endAt - info.startedAt) / 1000),
    }
    assert.equal(info.sandboxId, sbx.sandboxId)
    assert.equal(info.templateId, 'code-interpreter')
    assert.equal(info.status, 'running')
    assert.deepEqual(info.metadata, { suite: 'js-sdk', run: RUN, which: 'first' })
    assert.equal(info.timeout, 300)
    assert.ok(Math.abs(d.info.lifetimeS - 300) <= 2, `endAt - startedAt = ${d.info.lifetimeS} s`)
    assert.ok(info.cpuCount >= 1 && info.memoryMB >= 64)
    assert.equal(info.envdAccessToken, undefined) // getInfo drops it, as the README says
  })

  await flow('list_paginator', async (d) => {
    need(sbx, 'sandbox')
    const paginator = Sandbox.list()
    const seen = []
    for (let pages = 0; paginator.hasNext && pages < 10; pages++) seen.push(...(await paginator.nextItems()))
    const mine = seen.find((s) => s.sandboxId === sbx.sandboxId)
    d.count = seen.length
    d.mine = mine && { status: mine.status, templateId: mine.templateId, metadata: mine.metadata }
    d.hasNext = paginator.hasNext
    assert.ok(mine, 'the new sandbox is not listed')
    assert.equal(mine.status, 'running')
    assert.equal(mine.templateId, 'code-interpreter')
    assert.deepEqual(mine.metadata, { suite: 'js-sdk', run: RUN, which: 'first' })
    assert.equal(paginator.hasNext, false)
  })

  await flow('list_filter_metadata', async (d) => {
    need(sbx, 'sandbox')
    second = remember(
      await Sandbox.create('code-interpreter', { metadata: { suite: 'js-sdk', run: RUN, which: 'second' } }),
    )
    const paginator = Sandbox.list({ query: { metadata: { which: 'first' } } })
    const seen = await paginator.nextItems()
    const ours = seen.filter((s) => s.metadata?.run === RUN).map((s) => s.metadata.which)
    d.listed = ours.sort()
    assert.deepEqual(d.listed, ['first'], 'the metadata filter was not applied')
  })
  await killQuietly(second)

  await flow('set_timeout', async (d) => {
    const before = await need(sbx, 'sandbox').getInfo()
    await sbx.setTimeout(600_000)
    const after = await sbx.getInfo()
    d.timeout = after.timeout
    d.endAtMovedS = Math.round((after.endAt - before.endAt) / 1000)
    d.remainingS = Math.round((after.endAt - Date.now()) / 1000)
    assert.equal(after.timeout, 600)
    assert.ok(Math.abs(d.remainingS - 600) <= 5, `the sandbox now ends in ${d.remainingS} s`)
    let refused
    try {
      await sbx.setTimeout(10_000)
    } catch (err) {
      refused = describe(err)
    }
    d.refused = refused
    assert.match(refused ?? '', /at least 60 seconds/) // the SDK's own check, before anything is sent
  })

  await flow('get_metrics', async (d) => {
    const metrics = await need(sbx, 'sandbox').getMetrics()
    d.metrics = metrics.map((m) => ({
      cpuCount: m.cpuCount,
      memUsed: m.memUsed,
      memTotal: m.memTotal,
      diskUsed: m.diskUsed,
    }))
    assert.equal(metrics.length, 1)
    assert.ok(metrics[0].memUsed > 0 && metrics[0].memTotal >= metrics[0].memUsed)
    assert.ok(metrics[0].diskUsed > 0 && metrics[0].cpuCount >= 1)
  })

  await flow('beta_pause_connect', async (d) => {
    need(sbx, 'sandbox')
    await sbx.files.write('/home/user/before-pause.txt', 'kept')
    const sleeper = await sbx.commands.run('sleep 300', { background: true, timeoutMs: 0 })
    const pid = await pidOf(sleeper)
    d.paused = await sbx.betaPause()
    d.statusPaused = (await sbx.getInfo()).status
    d.runningWhilePaused = await sbx.isRunning()
    const started = Date.now()
    const [same, warnings] = await warningsDuring(() => sbx.connect())
    d.connectMs = Date.now() - started
    d.warnings = warnings
    d.statusAfter = (await sbx.getInfo()).status
    d.runningAfter = await sbx.isRunning()
    d.file = await sbx.files.read('/home/user/before-pause.txt')
    d.processKept = (await sbx.commands.list()).some((p) => p.pid === pid)
    await sbx.commands.kill(pid)
    assert.equal(d.paused, true)
    assert.equal(d.statusPaused, 'paused')
    assert.equal(d.runningWhilePaused, false)
    assert.equal(same, sbx)
    assert.deepEqual(warnings, [])
    assert.ok(d.connectMs < 8000, `connect took ${d.connectMs} ms`)
    assert.equal(d.statusAfter, 'running')
    assert.equal(d.runningAfter, true)
    assert.equal(d.file, 'kept')
    assert.equal(d.processKept, true)
  })

  await flow('static_connect', async (d) => {
    const other = remember(await Sandbox.connect(need(sbx, 'sandbox').sandboxId))
    d.sameId = other.sandboxId === sbx.sandboxId
    d.read = (await other.commands.run('cat /home/user/before-pause.txt')).stdout
    assert.equal(d.sameId, true)
    assert.equal(d.read, 'kept')
  })

  await flow('kill', async (d) => {
    await need(sbx, 'sandbox').kill()
    d.runningAfterKill = await sbx.isRunning()
    d.listedAfterKill = (await Sandbox.list().nextItems()).some((s) => s.sandboxId === sbx.sandboxId)
    try {
      await sbx.getInfo()
      d.getInfoAfterKill = 'answered'
    } catch (err) {
      d.getInfoAfterKill = err.name
    }
    assert.equal(d.runningAfterKill, false)
    assert.equal(d.listedAfterKill, false)
    assert.equal(d.getInfoAfterKill, 'NotFoundError')
  })

  await flow('access_token_bearer', async (d) => {
    // With SCALEBOX_ACCESS_TOKEN and no API key the SDK sends `Authorization: Bearer <token>` to the control plane.
    const saved = { key: process.env.SCALEBOX_API_KEY, token: process.env.SCALEBOX_ACCESS_TOKEN }
    let viaToken
    try {
      delete process.env.SCALEBOX_API_KEY
      process.env.SCALEBOX_ACCESS_TOKEN = saved.key
      viaToken = remember(await Sandbox.create('code-interpreter', { metadata: { run: RUN } }))
      d.info = (await viaToken.getInfo()).status
      d.stdout = (await viaToken.commands.run('echo token')).stdout
      d.listed = (await Sandbox.list().nextItems()).some((s) => s.sandboxId === viaToken.sandboxId)
      await viaToken.kill()
      process.env.SCALEBOX_ACCESS_TOKEN = 'not-the-key'
      try {
        await Sandbox.create('code-interpreter')
        d.wrongToken = 'accepted'
      } catch (err) {
        d.wrongToken = describe(err)
      }
    } finally {
      if (d.stdout === undefined) await killQuietly(viaToken)
      process.env.SCALEBOX_API_KEY = saved.key
      if (saved.token === undefined) delete process.env.SCALEBOX_ACCESS_TOKEN
      else process.env.SCALEBOX_ACCESS_TOKEN = saved.token
    }
    assert.equal(d.info, 'running')
    assert.equal(d.stdout, 'token\n')
    assert.equal(d.listed, true)
    assert.match(d.wrongToken, /401|invalid|unauthori[sz]ed/i)
  })
}

async function files() {
  const sbx = remember(await Sandbox.create())
  const dir = '/home/user/notes'
  const bytes = Uint8Array.from({ length: 256 }, (_, i) => i)
  try {
    await flow('files_write_read_text', async (d) => {
      const info = await sbx.files.write(`${dir}/deeper/a.txt`, 'hello file\n') // the parents are made
      d.info = info
      d.read = await sbx.files.read(`${dir}/deeper/a.txt`)
      assert.equal(info.path, `${dir}/deeper/a.txt`)
      assert.equal(info.name, 'a.txt')
      assert.equal(d.read, 'hello file\n')
    })

    await flow('files_write_read_bytes', async (d) => {
      await sbx.files.write(`${dir}/bin.dat`, bytes.buffer)
      const b64 = await sbx.files.read(`${dir}/bin.dat`, { format: 'bytes' })
      const back = Buffer.from(b64, 'base64')
      d.length = back.length
      assert.deepEqual([...back], [...bytes])
    })

    await flow('files_list', async (d) => {
      const entries = await sbx.files.list(dir)
      d.entries = entries
        .map((e) => ({ name: e.name, type: e.type, path: e.path, size: e.size }))
        .sort((a, b) => a.name.localeCompare(b.name))
      assert.deepEqual(
        d.entries.map((e) => [e.name, e.type]),
        [
          ['bin.dat', 'file'],
          ['deeper', 'directory'],
        ],
      )
      assert.equal(d.entries[0].size, 256)
      assert.equal(d.entries[0].path, `${dir}/bin.dat`)
      const deep = await sbx.files.list(dir, { recursive: true })
      d.recursive = deep.map((e) => e.path).sort()
      assert.ok(d.recursive.includes(`${dir}/deeper/a.txt`), 'a recursive list misses the nested file')
    })

    await flow('files_exists', async (d) => {
      d.exists = [await sbx.files.exists(`${dir}/bin.dat`), await sbx.files.exists(`${dir}/nope.txt`)]
      assert.deepEqual(d.exists, [true, false])
    })

    await flow('files_stat', async (d) => {
      const st = await sbx.files.stat(`${dir}/bin.dat`)
      d.stat = {
        name: st.name,
        type: st.type,
        size: st.size,
        mode: st.mode,
        permissions: st.permissions,
        owner: st.owner,
      }
      d.ageS = Math.round((Date.now() - st.modifiedAt) / 1000)
      assert.equal(st.type, 'file')
      assert.equal(st.size, 256)
      assert.ok(Math.abs(d.ageS) < 120, `modified ${d.ageS} s ago`)
    })

    await flow('files_make_dir', async (d) => {
      const info = await sbx.files.makeDir('/home/user/newdir')
      d.info = info
      d.exists = await sbx.files.exists('/home/user/newdir')
      assert.equal(info.name, 'newdir')
      assert.equal(info.type, 'directory')
      assert.equal(info.path, '/home/user/newdir')
      assert.equal(d.exists, true)
    })

    await flow('files_rename', async (d) => {
      const info = await sbx.files.move(`${dir}/deeper/a.txt`, `${dir}/b.txt`)
      d.info = info
      d.old = await sbx.files.exists(`${dir}/deeper/a.txt`)
      d.read = await sbx.files.read(`${dir}/b.txt`)
      assert.equal(info.path, `${dir}/b.txt`)
      assert.equal(d.old, false)
      assert.equal(d.read, 'hello file\n')
    })

    await flow('files_remove', async (d) => {
      await sbx.files.remove(`${dir}/b.txt`)
      await sbx.files.remove(`${dir}/deeper`)
      d.left = (await sbx.files.list(dir)).map((e) => e.name)
      assert.deepEqual(d.left, ['bin.dat'])
    })

    await flow('files_watch_dir', async (d) => {
      const watched = '/home/user/watched'
      await sbx.files.makeDir(watched)
      const events = sbx.files.watchDir(watched)[Symbol.asyncIterator]()
      const first = events.next() // opens the stream
      let writes = 0
      let event, failure
      first.then(
        (e) => (event = e),
        (err) => (failure = err),
      )
      await until(
        async () => {
          if (failure) throw failure
          if (event) return true
          await sbx.files.write(`${watched}/w${writes++}.txt`, 'x')
          return false
        },
        'a watch event',
        10_000,
        300,
      )
      await events.return()
      d.event = event.value
      d.writes = writes
      assert.ok(['create', 'write'].includes(event.value.type), `event ${event.value.type}`)
      assert.match(event.value.name, /^w\d+\.txt$/)
      assert.equal(event.value.path, `${watched}/${event.value.name}`)
    })

    await flow('files_watcher_polling', async (d) => {
      const watched = '/home/user/polled'
      await sbx.files.makeDir(watched)
      const watcher = await sbx.files.createWatcher(watched)
      await sbx.files.write(`${watched}/p.txt`, 'x')
      const events = await until(
        async () => {
          const got = await watcher.getEvents()
          return got.length ? got : undefined
        },
        'watcher events',
        10_000,
        200,
      )
      await watcher.remove()
      d.events = events
      assert.ok(
        events.some((e) => e.name === 'p.txt' && e.type === 'create'),
        'no create event for p.txt',
      )
    })

    await flow('files_upload_download_local', async (d) => {
      const local = fs.mkdtempSync(path.join(os.tmpdir(), 'js-sdk-'))
      try {
        fs.writeFileSync(path.join(local, 'up.bin'), bytes)
        await sbx.uploadFile(path.join(local, 'up.bin'), '/home/user/up.bin')
        const got = await sbx.downloadFile('/home/user/up.bin', path.join(local, 'down.bin'))
        d.size = got.size
        assert.deepEqual([...fs.readFileSync(path.join(local, 'down.bin'))], [...bytes])
      } finally {
        fs.rmSync(local, { recursive: true, force: true })
      }
    })

    await flow('files_signed_urls', async (d) => {
      await sbx.files.write('/home/user/signed.txt', 'signed')
      const url = new URL(await sbx.downloadUrl('/home/user/signed.txt'))
      d.path = url.pathname.replace(sbx.sandboxId, '<id>')
      d.query = [...url.searchParams.keys()].sort()
      const prefix = new URL(`https://${sbx.sandboxDomain}`).pathname
      assert.ok(url.pathname.startsWith(prefix + '/'), `the URL lost the sandbox's path prefix: ${d.path}`)
      const response = await fetch(url)
      d.status = response.status
      assert.equal(await response.text(), 'signed')
    })
  } finally {
    await killQuietly(sbx)
  }
}

async function commands() {
  const sbx = remember(await Sandbox.create())
  try {
    await flow('commands_foreground', async (d) => {
      const result = await sbx.commands.run('echo out; echo err >&2')
      d.result = {
        exitCode: result.exitCode,
        stdout: result.stdout,
        stderr: result.stderr,
        error: result.error && describe(result.error),
      }
      assert.deepEqual(d.result, { exitCode: 0, stdout: 'out\n', stderr: 'err\n', error: undefined })
    })

    await flow('commands_exit_code', async (d) => {
      const result = await sbx.commands.run('echo before; exit 3')
      d.result = { exitCode: result.exitCode, stdout: result.stdout }
      assert.deepEqual(d.result, { exitCode: 3, stdout: 'before\n' }) // the JS SDK does not throw on non-zero
    })

    await flow('commands_envs_cwd_callbacks', async (d) => {
      const out = []
      const err = []
      const result = await sbx.commands.run('echo "$A-$B"; pwd; echo oops >&2', {
        envs: { A: 'one', B: 'two' },
        cwd: '/tmp',
        onStdout: (chunk) => out.push(chunk),
        onStderr: (chunk) => err.push(chunk),
      })
      d.stdout = result.stdout
      d.callbacks = { stdout: out.join(''), stderr: err.join('') }
      assert.equal(result.stdout, 'one-two\n/tmp\n')
      assert.deepEqual(d.callbacks, { stdout: 'one-two\n/tmp\n', stderr: 'oops\n' })
    })

    await flow('commands_background', async (d) => {
      const started = Date.now()
      const handle = await sbx.commands.run('sleep 1; echo bg', { background: true })
      d.returnedMs = Date.now() - started
      const result = await handle.wait()
      d.totalMs = Date.now() - started
      d.result = { exitCode: result.exitCode, stdout: result.stdout }
      assert.ok(d.returnedMs < 900, `run({background: true}) returned after ${d.returnedMs} ms`)
      assert.ok(d.totalMs >= 1000)
      assert.deepEqual(d.result, { exitCode: 0, stdout: 'bg\n' })
    })

    await flow('commands_kill', async (d) => {
      const handle = await sbx.commands.run('sleep 60', { background: true })
      const pid = await pidOf(handle)
      d.listedBefore = (await sbx.commands.list()).some((p) => p.pid === pid)
      const started = Date.now()
      d.killed = await handle.kill()
      const result = await handle.wait()
      d.waitMs = Date.now() - started
      d.result = { exitCode: result.exitCode, error: result.error && describe(result.error) }
      d.listedAfter = (await sbx.commands.list()).some((p) => p.pid === pid)
      d.killAgain = await sbx.commands.kill(pid)
      assert.equal(d.listedBefore, true)
      assert.equal(d.killed, true)
      assert.ok(d.waitMs < 5000, `the killed command ended after ${d.waitMs} ms`)
      assert.notEqual(result.exitCode, 0)
      assert.equal(d.listedAfter, false)
      assert.equal(d.killAgain, false)
    })

    await flow('commands_stdin', async (d) => {
      const handle = await sbx.commands.run('read line; echo "got:$line"', { background: true })
      const pid = await pidOf(handle)
      await sbx.commands.sendStdin(pid, 'hello\n')
      const result = await handle.wait()
      d.stdout = result.stdout
      assert.equal(result.stdout, 'got:hello\n')
    })

    await flow('commands_connect', async (d) => {
      const handle = await sbx.commands.run('sleep 1; echo later', { background: true })
      const pid = await pidOf(handle)
      const again = await sbx.commands.connect(pid)
      const result = await again.wait()
      d.result = { exitCode: result.exitCode, stdout: result.stdout }
      assert.deepEqual(d.result, { exitCode: 0, stdout: 'later\n' })
      await handle.wait()
    })
  } finally {
    await killQuietly(sbx)
  }
}

/** The 35 s silent commands: started first, awaited last, so they overlap the other groups. */
function keepalive() {
  return (async () => {
    const sbx = remember(await Sandbox.create())
    try {
      await Promise.all([
        flow(
          'command_silent_35s',
          async (d) => {
            const started = Date.now()
            const result = await sbx.commands.run('sleep 35; echo done', { timeoutMs: 120_000 })
            d.seconds = (Date.now() - started) / 1000
            d.result = { exitCode: result.exitCode, stdout: result.stdout }
            assert.deepEqual(d.result, { exitCode: 0, stdout: 'done\n' })
            assert.ok(d.seconds >= 35)
          },
          110_000,
        ),
        flow(
          'process_keepalives_35s',
          async (d) => {
            const kinds = {}
            const events = sbx.processes.start(
              { cmd: '/bin/bash', args: ['-c', 'sleep 35; echo done'] },
              { requestTimeoutMs: 120_000 },
            )
            let stdout = ''
            for await (const event of events) {
              kinds[event.type] = (kinds[event.type] ?? 0) + 1
              if (event.type === 'data' && event.data.stdout) stdout += new TextDecoder().decode(event.data.stdout)
            }
            d.events = kinds
            d.stdout = stdout
            assert.equal(stdout, 'done\n')
            assert.ok((kinds.keepalive ?? 0) >= 2, 'fewer than 2 keepalive events in 35 silent seconds')
          },
          110_000,
        ),
      ])
    } finally {
      await killQuietly(sbx)
    }
  })()
}

async function pty() {
  const sbx = remember(await Sandbox.create())
  try {
    await flow('pty_interactive', async (d) => {
      const chunks = []
      const handle = await sbx.pty.start({
        size: { cols: 100, rows: 30 },
        cwd: '/tmp',
        envs: { PTY_VAR: 'pty-env' },
        onData: (data) => chunks.push(Buffer.from(data).toString()),
      })
      const pid = await pidOf(handle)
      await handle.send('stty size; echo "var=$PTY_VAR"; pwd\n')
      await until(
        () => /30 100/.test(handle.data) && /var=pty-env/.test(handle.data) && /\r?\n\/tmp\r?\n/.test(handle.data),
        'the first output',
        10_000,
      )
      await sbx.pty.resize(pid, { cols: 120, rows: 40 })
      await handle.send('stty size\n')
      await until(() => /40 120/.test(handle.data), 'the resized size', 10_000)
      await handle.send('exit 3\n')
      await handle.wait()
      d.exitCode = handle['exitCode'] // kept by PtyHandle (TypeScript-private), no public getter
      d.onDataMatches = chunks.join('') === handle.data
      assert.equal(d.exitCode, 3)
      assert.equal(d.onDataMatches, true)
    })

    await flow('pty_kill', async (d) => {
      const handle = await sbx.pty.start({ cwd: '/home/user', envs: { PATH: '/usr/bin:/bin' } }) // the README's
      const pid = await pidOf(handle)
      await handle.send('echo "Hello from PTY"\n')
      await until(() => /[\r\n]Hello from PTY\r\n/.test(handle.data), 'the echo', 10_000)
      d.killed = await handle.kill()
      try {
        await handle.wait()
        d.wait = 'resolved'
      } catch (err) {
        d.wait = describe(err)
      }
      d.listedAfter = (await sbx.commands.list()).some((p) => p.pid === pid)
      assert.equal(d.killed, true)
      assert.equal(d.listedAfter, false)
    })
  } finally {
    await killQuietly(sbx)
  }
}

// The README's multi-language examples, verbatim, each on `Sandbox.create()` and `runCode(code, {language})`.
const LANGUAGE_EXAMPLES = [
  ['python', "print('Hello from Python!')\nx = 40 + 2\nprint(f'x={x}')", 'Hello from Python!\nx=42\n'],
  [
    'nodejs',
    'console.log("Hello from Node.js!");\nconst x = 1 + 2; console.log(`x=${x}`);\n',
    'Hello from Node.js!\nx=3\n',
  ],
  [
    'r',
    'print("Hello from R!")\nx <- mean(c(1,2,3,4,5))\nprint(paste("mean:", x))\n',
    '[1] "Hello from R!"\n[1] "mean: 3"\n',
  ],
  [
    'typescript',
    'console.log("Hello from Deno/TypeScript!")\nconst nums: number[] = [1,2,3]\nconsole.log(nums.reduce((a,b)=>a+b, 0))\n',
    'Hello from Deno/TypeScript!\n6\n',
  ],
  [
    'java',
    'System.out.println("Hello from IJAVA!");\nint a = 10, b = 20; System.out.println(a + b);\n',
    'Hello from IJAVA!\n30\n',
  ],
  ['bash', "echo 'Hello from Bash'", 'Hello from Bash\n'],
  // The other names of the Language union (and the README's).
  ['javascript', 'console.log([1, 2, 3].map((n) => n * 2).join(","))', '2,4,6\n'],
  ['deno', 'const s: string = "deno"; console.log(s.toUpperCase())', 'DENO\n'],
  ['node', 'console.log(typeof process.version)', 'string\n'],
  ['ijava', 'System.out.println(String.join("-", "a", "b"));', 'a-b\n'], // the README's other Java name
]

async function languages() {
  // Two sandboxes so that no one of them holds all nine kernels (runCode without a context makes one per call).
  const boxes = [remember(await Sandbox.create()), remember(await Sandbox.create())]
  try {
    for (const [i, [language, code, expected]] of LANGUAGE_EXAMPLES.entries()) {
      await flow(`run_code_${language}`, async (d) => {
        const result = await boxes[i % 2].runCode(code, { language })
        d.stdout = result.stdout
        d.error = result.error && `${result.error.name}: ${result.error.value}`
        assert.equal(d.error, undefined)
        assert.equal(result.stdout, expected)
      })
    }
  } finally {
    await Promise.all(boxes.map(killQuietly))
  }
}

const PNG_1PX = 'iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=='

async function code() {
  const interpreter = await CodeInterpreter.create()
  remember(interpreter.getSandbox())
  try {
    await flow('contexts', async (d) => {
      const ctx = await interpreter.createCodeContext({ language: 'python', cwd: '/tmp' })
      await interpreter.runCode('counter = 0', { language: 'python', context: ctx })
      const counted = await interpreter.runCode('counter += 1; print(counter)', { language: 'python', context: ctx })
      const cwd = await interpreter.runCode('import os; print(os.getcwd())', { language: 'python', context: ctx })
      const other = await interpreter.createCodeContext({ language: 'python' })
      const isolated = await interpreter.runCode("print('counter' in dir())", { language: 'python', context: other })
      const js = await interpreter.createCodeContext({ language: 'nodejs' })
      await interpreter.runCode('let k = 5', { language: 'nodejs', context: js })
      const jsState = await interpreter.runCode('console.log(k * 2)', { language: 'nodejs', context: js })
      d.contexts = interpreter.getContexts().length
      await interpreter.destroyContext(ctx)
      d.afterDestroy = interpreter.getContexts().length
      const gone = await interpreter.runCode('print(counter)', { language: 'python', context: ctx })
      d.got = {
        counted: counted.stdout,
        cwd: cwd.stdout,
        isolated: isolated.stdout,
        js: jsState.stdout,
        ctxLanguage: ctx.language,
      }
      d.gone = gone.error && describe(gone.error.value)
      assert.deepEqual(d.got, { counted: '1\n', cwd: '/tmp\n', isolated: 'False\n', js: '10\n', ctxLanguage: 'python' })
      assert.equal(d.contexts, 3)
      assert.equal(d.afterDestroy, 2)
      assert.match(d.gone ?? '', /not found|unknown context/i)
    })

    const ctx = await interpreter.createCodeContext({ language: 'python' })
    const run = (source, opts = {}) => interpreter.runCode(source, { language: 'python', context: ctx, ...opts })

    await flow('callbacks', async (d) => {
      const calls = { stdout: [], stderr: [], result: [], error: [] }
      const handlers = {
        onStdout: (msg) => calls.stdout.push(msg.content),
        onStderr: (msg) => calls.stderr.push(msg.content),
        onResult: (res) => calls.result.push(res.text),
        onError: (err) => calls.error.push(`${err.name}: ${err.value}`),
      }
      await run("print('with callbacks')", handlers) // the README's example
      await run("import sys\nprint('to stderr', file=sys.stderr)\n6 * 7", handlers)
      await run("raise ValueError('bad value')", handlers)
      d.calls = calls
      assert.deepEqual(calls, {
        stdout: ['with callbacks\n'],
        stderr: ['to stderr\n'],
        result: ['42'],
        error: ['ValueError: bad value'],
      })
    })

    await flow('run_code_error', async (d) => {
      const result = await run('x = 1\n1 / 0')
      d.error = result.error && {
        name: result.error.name,
        value: result.error.value,
        traceback: /ZeroDivisionError/.test(result.error.traceback),
      }
      d.exitCode = result.exitCode
      d.success = result.success
      assert.deepEqual(d.error, { name: 'ZeroDivisionError', value: 'division by zero', traceback: true })
      assert.equal(result.exitCode, 1)
      assert.equal(result.success, false)
    })

    await flow('run_code_envs', async (d) => {
      const result = await run('import os; print(os.environ.get("RUN_ENV"), os.environ.get("RUN_ENV2"))', {
        envVars: { RUN_ENV: 'a' },
        envs: { RUN_ENV2: 'b' },
      })
      d.stdout = result.stdout
      assert.equal(result.stdout, 'a b\n')
    })

    await flow('result_formats', async (d) => {
      const jpeg = await run(
        'import io\nfrom PIL import Image as PILImage\n' +
          'buf = io.BytesIO(); PILImage.new("RGB", (2, 2), "red").save(buf, "jpeg")\n' +
          'JPEG = buf.getvalue(); len(JPEG) > 100',
      )
      assert.equal(jpeg.text, 'True', `making a JPEG failed: ${jpeg.error?.value}`)
      const cases = {
        text: ['1 + 1', (r) => r.text === '2' && r.isMainResult === true],
        html: ["from IPython.display import HTML\nHTML('<b>bold</b>')", (r) => r.html === '<b>bold</b>'],
        markdown: ["from IPython.display import Markdown\nMarkdown('# Title')", (r) => r.markdown === '# Title'],
        svg: [
          'from IPython.display import SVG\n' +
            'SVG(\'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>\')',
          (r) => /^<svg[^>]*>.*<rect/s.test(r.svg ?? ''),
        ],
        png: [
          `from IPython.display import Image\nimport base64\nImage(data=base64.b64decode('${PNG_1PX}'))`,
          (r) => r.png === PNG_1PX,
        ],
        jpeg: [
          'from IPython.display import Image\nImage(data=JPEG, format="jpeg")',
          (r) =>
            Buffer.from(r.jpeg ?? '', 'base64')
              .subarray(0, 2)
              .toString('hex') === 'ffd8',
        ],
        latex: ["from IPython.display import Latex\nLatex(r'$x^2$')", (r) => r.latex === '$x^2$'],
        json: [
          "from IPython.display import JSON\nJSON({'a': 1, 'b': [1, 2]})",
          (r) => JSON.stringify(JSON.parse(r.json ?? 'null')) === '{"a":1,"b":[1,2]}',
        ],
        javascript: [
          "from IPython.display import Javascript\nJavascript('console.log(1)')",
          (r) => r.javascript === 'console.log(1)',
        ],
        pdf: [
          "display({'application/pdf': 'JVBERi0xLjQK', 'text/plain': 'a pdf'}, raw=True)",
          (r) => r.pdf === 'JVBERi0xLjQK',
        ],
        extra: [
          "display({'application/vnd.custom+json': {'k': 1}, 'text/plain': 'custom'}, raw=True)",
          (r) => r.extra && Object.keys(r.extra).some((k) => k.includes('vnd.custom')),
        ],
      }
      d.failed = []
      d.fields = {}
      for (const [name, [source, check]] of Object.entries(cases)) {
        const result = await run(source)
        const first = result.results?.[0]
        d.fields[name] = first
          ? Object.keys(first)
              .filter((k) => first[k] && k !== 'extra')
              .concat(Object.keys(first.extra ?? {}).map((k) => `extra:${k}`))
          : result.error?.value
        if (!first || !check(first)) d.failed.push(name)
      }
      assert.deepEqual(d.failed, [])
    })

    await flow('result_chart', async (d) => {
      const result = await run(
        'import matplotlib.pyplot as plt\nplt.figure()\nplt.plot([1, 2, 3], [1, 4, 9], label="squares")\n' +
          'plt.title("Squares"); plt.xlabel("x"); plt.ylabel("y")\nplt.show()',
      )
      const shown = result.results?.find((r) => r.png)
      d.png = Boolean(shown)
      d.chart = shown?.chart && {
        type: shown.chart.type,
        title: shown.chart.title,
        xLabel: shown.chart.xLabel,
        yLabel: shown.chart.yLabel,
        elements: shown.chart.elements,
      }
      d.topLevelChart = Boolean(result.chart)
      assert.equal(d.png, true, 'no PNG for the figure')
      assert.ok(d.chart, 'the figure has no chart result')
      assert.equal(d.chart.type, 'line')
      assert.equal(d.chart.title, 'Squares')
      assert.equal(d.chart.xLabel, 'x')
      assert.equal(d.chart.yLabel, 'y')
      assert.equal(d.chart.elements.length, 1)
      assert.deepEqual(
        d.chart.elements[0].points
          .map((p) => (Array.isArray(p) ? p : [p.x, p.y]))
          .map(([x, y]) => [Number(x), Number(y)]),
        [
          [1, 1],
          [2, 4],
          [3, 9],
        ],
      )
    })

    await flow('result_formats_keys', async (d) => {
      // The README: onResult(res) { console.log("RESULT formats:", Object.keys(res.formats)) }
      let listed
      const result = await run("from IPython.display import HTML\nHTML('<i>x</i>')", {
        onResult: (res) => {
          listed = Object.keys(res.formats)
        },
      })
      d.html = result.results?.[0]?.html
      d.formats = listed
      assert.equal(d.html, '<i>x</i>')
      assert.ok(listed, 'Result has no `formats`: the README example throws in onResult')
    })
  } finally {
    try {
      await interpreter.close() // destroys its contexts and kills the sandbox
    } catch {}
  }
}

async function session() {
  const csv = 'name,score\nada,3\nbob,5\ncy,4\n'
  let first, sessionId
  await flow('session_run_simple', async (d) => {
    first = await Session.run({ code: 'print("Hello, Scalebox!")', language: 'python' })
    d.response = {
      text: first.text,
      stdout: first.stdout,
      stderr: first.stderr,
      error: first.error,
      sessionId: first.sessionId,
      totalMs: first.timing.totalMs,
    }
    assert.equal(first.text, 'Hello, Scalebox!\n')
    assert.equal(first.stdout, 'Hello, Scalebox!\n')
    assert.equal(first.error, undefined)
    assert.equal(first.sessionId, undefined) // no keepAlive, no session id
    assert.ok(first.timing.totalMs > 0)
  })

  await flow('session_success_print_only', async (d) => {
    d.success = need(first, 'the simple run').success
    d.error = first.error
    assert.equal(d.success, true, 'Session.run reported success=false for code that printed and raised nothing')
  })

  const progress = []
  await flow('session_packages_keep_alive', async (d) => {
    // The package is a wheel the test built (FLOWS_WHEEL), uploaded with `files` and installed from there: no index.
    const wheel = path.basename(need(process.env.FLOWS_WHEEL, 'FLOWS_WHEEL'))
    const step1 = await Session.run({
      code: 'import pandas as pd; import jssdkpkg\nprint(pd.__name__, jssdkpkg.VALUE)',
      files: { [wheel]: fs.readFileSync(process.env.FLOWS_WHEEL) },
      packages: [`./${wheel}`],
      keepAlive: true,
      onProgress: (p) => progress.push({ stage: p.stage, percent: p.percent, message: p.message, details: p.details }),
    })
    sessionId = step1.sessionId
    remember(step1.sandbox)
    d.step1 = {
      stdout: step1.stdout,
      error: step1.error && step1.error.value,
      hasSandbox: Boolean(step1.sandbox),
      sessionIsSandbox: step1.sessionId === step1.sandbox?.sandboxId,
    }
    const info = await Session.getSession(sessionId)
    d.session = {
      status: info.status,
      language: info.language,
      installedPackages: info.installedPackages,
      uploadedFiles: info.uploadedFiles,
      remainingS: Math.round(info.remainingTime / 1000),
    }
    assert.equal(step1.stdout, 'pandas hello from jssdkpkg 0.1\n')
    assert.equal(d.step1.sessionIsSandbox, true)
    assert.deepEqual(d.session.installedPackages, [`./${wheel}`])
    assert.deepEqual(d.session.uploadedFiles, [wheel])
    assert.equal(info.status, 'running')
    assert.ok(
      d.session.remainingS > 500 && d.session.remainingS <= 600,
      `the session ends in ${d.session.remainingS} s`,
    )
  })

  await flow('session_progress', async (d) => {
    need(progress.length, 'progress of the packages run')
    const stages = [...new Set(progress.map((p) => p.stage))]
    d.stages = stages
    d.installing = progress
      .filter((p) => p.stage === 'installing')
      .map((p) => `${p.percent}% ${p.message}`.slice(0, 80))
    assert.deepEqual(stages, ['initializing', 'connecting', 'uploading', 'installing', 'executing', 'completed'])
    for (const stage of stages) {
      const percents = progress.filter((p) => p.stage === stage).map((p) => p.percent)
      assert.ok(percents.includes(0) && percents.at(-1) === 100, `stage ${stage}: ${percents}`)
    }
    assert.ok(
      d.installing.some((m) => /Installed 1 packages/.test(m)),
      'no "Installed 1 packages" message',
    )
  })

  await flow('session_files', async (d) => {
    const seen = []
    const step2 = await Session.run({
      code: 'df = pd.read_csv("data.csv"); print(df.head())',
      sessionId: need(sessionId, 'session'),
      files: { 'data.csv': csv, '/tmp/raw.bin': Buffer.from([0, 1, 2, 255]) },
      onProgress: (p) => seen.push(p.stage),
    })
    const step3 = await Session.run({
      code: 'print(df["score"].mean())\nprint(open("/tmp/raw.bin", "rb").read())',
      sessionId,
    })
    const info = await Session.getSession(sessionId)
    d.step2 = {
      stdout: step2.stdout,
      error: step2.error && step2.error.value,
      stages: [...new Set(seen)],
      timing: Object.keys(step2.timing.stages),
    }
    d.step3 = { stdout: step3.stdout, error: step3.error && step3.error.value }
    d.uploadedFiles = info.uploadedFiles
    assert.match(step2.stdout, /name\s+score/)
    assert.match(step2.stdout, /ada\s+3/)
    assert.deepEqual(d.step2.stages, ['initializing', 'connecting', 'uploading', 'executing', 'completed'])
    assert.equal(step3.stdout, "4.0\nb'\\x00\\x01\\x02\\xff'\n")
    assert.deepEqual(info.uploadedFiles.slice(1).sort(), ['/tmp/raw.bin', 'data.csv'])
  })

  await flow('session_download_files', async (d) => {
    const result = await Session.run({
      code: 'df.to_csv("out.csv", index=False)\nopen("/tmp/bin.out", "wb").write(bytes(range(4)))',
      sessionId: need(sessionId, 'session'),
      downloadFiles: ['out.csv', '/tmp/bin.out'],
    })
    d.files = Object.fromEntries(Object.entries(result.files ?? {}).map(([k, v]) => [k, v.toString('base64')]))
    assert.equal(result.files?.['out.csv']?.toString(), csv)
    assert.deepEqual([...(result.files?.['/tmp/bin.out'] ?? [])], [0, 1, 2, 3])
  })

  await flow('session_keep_alive_renewal', async (d) => {
    const renewed = await Session.keepAlive(need(sessionId, 'session'), 900_000)
    d.newTimeout = renewed.newTimeout
    d.expiresInS = Math.round((renewed.expiresAt - Date.now()) / 1000)
    const listed = await Session.listSessions()
    d.listed = listed.some((s) => s.sessionId === sessionId)
    assert.equal(renewed.newTimeout, 900_000)
    assert.ok(Math.abs(d.expiresInS - 900) <= 5, `expires in ${d.expiresInS} s`)
    assert.equal(d.listed, true)
  })

  await flow('session_pause_resume', async (d) => {
    d.paused = await Session.pause(need(sessionId, 'session'))
    d.statusPaused = (await Session.getSession(sessionId)).status
    const progressed = []
    const result = await Session.run({
      code: 'print(df.shape)',
      sessionId,
      onProgress: (p) => progressed.push(p.message),
    })
    d.stdout = result.stdout
    d.resumed = progressed.includes('Session resumed')
    d.statusAfter = (await Session.getSession(sessionId)).status
    assert.equal(d.paused, true)
    assert.equal(d.statusPaused, 'paused')
    assert.equal(d.resumed, true)
    assert.equal(result.stdout, '(3, 2)\n') // the kernel's state survived the pause
    assert.equal(d.statusAfter, 'running')
  })

  await flow('session_close', async (d) => {
    const sandbox = need(sessionId && (await Session.getSession(sessionId)).sandbox, 'session')
    try {
      await Session.close(sessionId) // the README's last step
    } catch (err) {
      d.closeError = describe(err).split(sessionId).join('<id>')
    }
    d.listed = (await Session.listSessions()).some((s) => s.sessionId === sessionId)
    d.running = await sandbox.isRunning()
    d.sandboxListed = (await Sandbox.list().nextItems()).some((s) => s.sandboxId === sessionId)
    assert.deepEqual([d.listed, d.running, d.sandboxListed], [false, false, false])
    assert.equal(d.closeError, undefined, 'Session.close threw')
  })

  // Session.run without keepAlive leaves its sandbox running (PROTOCOL.md §6.2): close what is left.
  for (const left of await Session.listSessions()) {
    remember((await Session.getSession(left.sessionId).catch(() => undefined))?.sandbox)
    await Session.close(left.sessionId).catch(() => {})
  }
}

async function storage() {
  // A bucket of the test's moto server (FLOWS_S3_*), mounted with the SDK's documented objectStorage option.
  const url = process.env.FLOWS_S3_URL
  for (const secret of [process.env.FLOWS_S3_KEY, process.env.FLOWS_S3_SECRET]) if (secret) SECRETS.add(secret)
  let sbx
  await flow('create_object_storage', async (d) => {
    sbx = remember(
      await Sandbox.create('code-interpreter', {
        timeoutMs: 300_000,
        metadata: { suite: 'js-sdk', run: RUN, which: 'storage' },
        objectStorage: {
          uri: 's3://jsdata/in/',
          mountPoint: '/mnt/oss',
          accessKey: need(process.env.FLOWS_S3_KEY, 'FLOWS_S3_KEY'),
          secretKey: need(process.env.FLOWS_S3_SECRET, 'FLOWS_S3_SECRET'),
          region: 'us-east-1',
          endpoint: need(url, 'FLOWS_S3_URL'),
        },
      }),
    )
    d.read = (await sbx.commands.run('cat /mnt/oss/hello.txt')).stdout
    await sbx.files.write('/mnt/oss/from-js.txt', 'written by the JS SDK')
    d.listed = (await sbx.files.list('/mnt/oss')).map((e) => e.name).sort()
    assert.equal(d.read, 'hello from the bucket, JS\n')
    assert.deepEqual(d.listed, ['from-js.txt', 'hello.txt'])
  })

  await flow('object_storage_info', async (d) => {
    const info = await need(sbx, 'the storage sandbox').getInfo()
    d.objectStorage = info.objectStorage
    assert.equal(info.objectStorage?.uri, 's3://jsdata/in/', 'getInfo lost the mount: it reads object_storage as one object')
  })
  await killQuietly(sbx)
}

// ---- main --------------------------------------------------------------------------------------------------------

// A promise the SDK leaves unhandled would end node; report it as a flow of its own instead (the test fails on it).
process.on('unhandledRejection', (err) =>
  report({ flow: 'unhandled_rejection', ok: false, ms: 0, error: describe(err) }),
)

const GROUPS = { lifecycle, files, commands, pty, languages, code, session, storage }
const wanted = process.argv.slice(2)
const slow = wanted.length === 0 || wanted.includes('keepalive') ? keepalive() : Promise.resolve()
for (const [name, group] of Object.entries(GROUPS)) {
  if (wanted.length && !wanted.includes(name)) continue
  try {
    await group()
  } catch (err) {
    report({ flow: `group_${name}`, ok: false, ms: 0, error: describe(err) })
  }
}
await slow.catch((err) => report({ flow: 'group_keepalive', ok: false, ms: 0, error: describe(err) }))
process.exit(0) // aborted SDK streams may leave handles open
