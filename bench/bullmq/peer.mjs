// The BullMQ peer of Spillway's benchmark: N writes over K keys, added in bulks of
// 100 (16 bulks in flight), processed by one worker with concurrency 64 that
// increments a Redis hash field per job (HINCRBY), jobs removed on completion.
// Prints one JSON line: {"writes", "elapsed_ms", "checked"}.
// Usage: node peer.mjs <redis-url> <writes> <keys>
import { Queue, Worker } from "bullmq";
import IORedis from "ioredis";

const [url, writesArg, keysArg] = process.argv.slice(2);
const writes = Number(writesArg);
const keys = Number(keysArg);
const connection = new IORedis(url, { maxRetriesPerRequest: null });
const counters = new IORedis(url);
const name = `spillway-bench-${process.pid}`;
const queue = new Queue(name, { connection });
await counters.del(...Array.from({ length: Math.min(keys, 1000) }, (_, i) => `bench:peer:${i}`));

let done = 0;
let resolveDone;
const finished = new Promise((r) => (resolveDone = r));
const start = process.hrtime.bigint();
const worker = new Worker(
  name,
  async (job) => {
    await counters.hincrby(`bench:peer:${job.data.key}`, "n", 1);
  },
  { connection: connection.duplicate(), concurrency: 64, removeOnComplete: { count: 0 }, removeOnFail: { count: 0 } },
);
worker.on("completed", () => {
  done += 1;
  if (done === writes) resolveDone();
});

let next = 0;
async function producer() {
  while (next < writes) {
    const from = next;
    next += 100;
    const jobs = [];
    for (let i = from; i < Math.min(from + 100, writes); i++) {
      jobs.push({ name: "w", data: { key: i % keys }, opts: { removeOnComplete: true, removeOnFail: true } });
    }
    await queue.addBulk(jobs);
  }
}
await Promise.all(Array.from({ length: 16 }, producer));
await finished;
const elapsedMs = Number(process.hrtime.bigint() - start) / 1e6;

let checked = 0;
for (let i = 0; i < Math.min(keys, 1000); i++) {
  checked += Number((await counters.hget(`bench:peer:${i}`, "n")) || 0);
}
console.log(JSON.stringify({ writes, elapsed_ms: elapsedMs, checked: keys <= 1000 ? checked : null }));
// Closing BullMQ's blocking connections can wait on their timeouts; the result is out.
process.exit(0);
