// BullMQ side of `bench --scenario versus-bullmq` (issue 11): N delayed jobs whose due times fall
// in one window, one Worker on the same Redis; prints one JSON line with each job's
// start − due time. bullmq comes from the npm registry, installed by scripts/bench.sh into a cache
// directory (NODE_PATH), never committed.
//
//   node delayed.cjs --redis redis://127.0.0.1:6379 --prefix bench1.bull --n 10000 \
//        --window-ms 2000 --lead-ms 5000 --concurrency 100 --timeout-ms 60000
'use strict';
const { Queue, Worker } = require('bullmq');
const IORedis = require('ioredis');
const version = require('bullmq/package.json').version;

const args = {};
for (let i = 2; i < process.argv.length; i += 2) args[process.argv[i].replace(/^--/, '')] = process.argv[i + 1];
const n = Number(args.n || 1000);
const windowMs = Number(args['window-ms'] || 2000);
const leadMs = Number(args['lead-ms'] || 5000);
const concurrency = Number(args.concurrency || 100);
const timeoutMs = Number(args['timeout-ms'] || 60000);
const prefix = args.prefix || 'bench.bull';
const url = args.redis || 'redis://127.0.0.1:6379';

async function main() {
  const connection = () => new IORedis(url, { maxRetriesPerRequest: null });
  const name = `delayed-${n}-${Date.now()}`;
  const queue = new Queue(name, { connection: connection(), prefix });
  const lateness = [];
  let done;
  const allStarted = new Promise((resolve) => (done = resolve));
  const worker = new Worker(
    name,
    async (job) => {
      lateness.push(Date.now() - job.data.due);
      if (lateness.length >= n) done();
    },
    { connection: connection(), prefix, concurrency, removeOnComplete: { count: 0 } },
  );
  await worker.waitUntilReady();

  // Due times: first + window × i / n; each job's timestamp is the instant its delay is counted from.
  const first = Date.now() + leadMs;
  const t0 = Date.now();
  const chunk = 1000;
  for (let from = 0; from < n; from += chunk) {
    const jobs = [];
    for (let i = from; i < Math.min(n, from + chunk); i++) {
      const due = first + Math.floor((windowMs * i) / n);
      const ts = Date.now();
      jobs.push({ name: 'expire', data: { due }, opts: { delay: Math.max(0, due - ts), timestamp: ts, removeOnComplete: true } });
    }
    await queue.addBulk(jobs);
  }
  const writeMs = Date.now() - t0;
  const timer = new Promise((resolve) => setTimeout(resolve, leadMs + windowMs + timeoutMs));
  await Promise.race([allStarted, timer]);
  await worker.close();
  await queue.obliterate({ force: true }).catch(() => {});
  await queue.close();
  process.stdout.write(JSON.stringify({ version, jobs: n, started: lateness.length, write_ms: writeMs, lateness_ms: lateness }) + '\n');
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(e && e.stack ? e.stack : String(e));
    process.exit(1);
  },
);
