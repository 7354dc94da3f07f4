// Processes the bench starts, and what /proc says about them (who owns a listening socket, CPU time, memory).

import { spawn } from 'node:child_process';
import { appendFileSync, readdirSync, readFileSync, readlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';

const CLOCK_TICKS_PER_S = 100;

/**
 * Kills every registered pid if this Node process dies without cleaning up (even by SIGKILL): a detached `sh`
 * holds a pipe from us, and the pipe's EOF is its signal. Detached, so a Ctrl-C to our process group does not
 * kill it before it has done its job.
 */
export class Watchdog {
  /** `scratchDirs` are removed too: the bench's temporary state. */
  constructor(pidFile, scratchDirs = []) {
    this.pidFile = pidFile;
    writeFileSync(pidFile, '');
    const script = 'cat >/dev/null; for p in $(cat "$1"); do kill -KILL "$p" 2>/dev/null; done; shift; for d in "$@"; do rm -rf "$d"; done';
    this.child = spawn('sh', ['-c', script, 'sh', pidFile, ...scratchDirs], {
      stdio: ['pipe', 'ignore', 'ignore'],
      detached: true,
    });
    this.child.unref();
  }

  track(pid) {
    if (pid) appendFileSync(this.pidFile, `${pid}\n`);
  }

  /** Normal shutdown: the processes are already gone, so nothing is left to kill (and no pid can be reused). */
  release() {
    if (this.released) return;
    this.released = true;
    writeFileSync(this.pidFile, '');
    this.child.stdin.end();
  }
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function listeningInodes(port) {
  const inodes = new Set();
  for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text;
    try {
      text = readFileSync(table, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f.length < 10) continue;
      const localPort = parseInt(f[1].split(':')[1], 16);
      if (localPort === port && f[3] === '0A') inodes.add(f[9]);
    }
  }
  return inodes;
}

/** The processes holding the socket that listens on `port` (scans /proc/<pid>/fd). */
export function listenerPids(port) {
  const inodes = listeningInodes(port);
  const owners = [];
  if (inodes.size === 0) return owners;
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    let fds;
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let target;
      try {
        target = readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      const m = /^socket:\[(\d+)\]$/.exec(target);
      if (m && inodes.has(m[1])) {
        owners.push(Number(pid));
        break;
      }
    }
  }
  return owners;
}

export function processInfo(pid) {
  const read = (f) => {
    try {
      return readFileSync(`/proc/${pid}/${f}`, 'utf8');
    } catch {
      return null;
    }
  };
  let exe = null;
  try {
    exe = readlinkSync(`/proc/${pid}/exe`);
  } catch {}
  const status = read('status') ?? '';
  const ppid = Number(/^PPid:\s+(\d+)/m.exec(status)?.[1] ?? 0);
  return { pid, comm: read('comm')?.trim() ?? null, exe, ppid, cmdline: (read('cmdline') ?? '').split('\0').filter(Boolean) };
}

/** user + system CPU seconds of a process (all its threads). */
export function cpuSeconds(pid) {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / CLOCK_TICKS_PER_S;
  } catch {
    return null;
  }
}

/** VmRSS and VmHWM in bytes. */
export function memory(pid) {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const kb = (name) => Number(new RegExp(`^${name}:\\s+(\\d+) kB`, 'm').exec(status)?.[1] ?? NaN) * 1024;
    return { rss: kb('VmRSS'), hwm: kb('VmHWM') };
  } catch {
    return { rss: NaN, hwm: NaN };
  }
}

/**
 * Samples a process's VmRSS every `intervalMs`. `stop()` returns the peak, the final RSS and VmHWM, and the
 * series (milliseconds since start, bytes) so growth within a run can be told from a one-off step.
 */
export function sampleRss(pid, intervalMs = 100) {
  const t0 = performance.now();
  const series = [[0, memory(pid).rss]];
  const timer = setInterval(() => series.push([Math.round(performance.now() - t0), memory(pid).rss]), intervalMs);
  return {
    stop() {
      clearInterval(timer);
      const { rss, hwm } = memory(pid);
      series.push([Math.round(performance.now() - t0), rss]);
      const peak = Math.max(...series.map(([, v]) => v).filter(Number.isFinite));
      return { peak_rss: peak, end_rss: rss, hwm, samples: series.length, series };
    },
  };
}

/** Busy CPU seconds of the whole machine (all cores), from /proc/stat. */
export function machineBusySeconds() {
  try {
    const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
    const [user, nice, system, , , irq, softirq, steal] = f;
    return (user + nice + system + irq + softirq + (steal || 0)) / CLOCK_TICKS_PER_S;
  } catch {
    return null;
  }
}

/**
 * CPU use of several processes over an interval, as a fraction of one core, plus `machine`: the whole machine's
 * busy cores over the same interval (so what other processes took can be told apart).
 */
export function cpuMeter(pids) {
  const start = performance.now();
  const machineBefore = machineBusySeconds();
  const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSeconds(pid)]));
  return {
    stop() {
      const seconds = (performance.now() - start) / 1000;
      const machineAfter = machineBusySeconds();
      const used = Object.fromEntries(
        Object.entries(pids).map(([k, pid]) => {
          const after = cpuSeconds(pid);
          return [k, after === null || before[k] === null ? null : round((after - before[k]) / seconds, 2)];
        }),
      );
      used.machine = machineAfter === null || machineBefore === null ? null : round((machineAfter - machineBefore) / seconds, 2);
      return used;
    },
  };
}

/** Whether `path` is on a tmpfs (the mount with the longest matching mount point in /proc/mounts). */
export function isTmpfs(path) {
  let best = { point: '', type: null };
  try {
    for (const line of readFileSync('/proc/mounts', 'utf8').split('\n')) {
      const [, point, type] = line.split(' ');
      if (!point || !type) continue;
      const inside = path === point || path.startsWith(point.endsWith('/') ? point : `${point}/`);
      if (inside && point.length >= best.point.length) best = { point, type };
    }
  } catch {
    return false;
  }
  return best.type === 'tmpfs';
}

export function round(x, digits = 1) {
  if (x === null || x === undefined || Number.isNaN(x)) return null;
  const f = 10 ** digits;
  return Math.round(x * f) / f;
}
