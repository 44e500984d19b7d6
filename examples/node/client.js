'use strict';
// A Node.js client for ingest-buffer: rows are batched per table in the application and each batch
// is one unary Write carrying a resend key (producer, sequence), resent with the same key when the
// outcome is unknown or the buffer is full. Usage: node client.js TARGET TABLE N [--resend-once]
const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = process.env.INGEST_BUFFER_PROTO ||
  path.join(__dirname, '..', '..', 'proto', 'ingestbuffer', 'v1', 'ingest.proto');
const RESEND = new Set([grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED, grpc.status.RESOURCE_EXHAUSTED]);
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class BatchingClient {
  constructor(target, { batchRows = 500, lingerMs = 50, callTimeoutMs = 30000, retryForMs = 60000,
    ackLevel = 'ACK_LEVEL_BUFFERED', resendOnce = false } = {}) {
    const options = { keepCase: true, longs: String, enums: String, defaults: true };
    const { IngestService } = grpc.loadPackageDefinition(protoLoader.loadSync(PROTO, options)).ingestbuffer.v1;
    this.stub = new IngestService(target, grpc.credentials.createInsecure());
    Object.assign(this, { batchRows, lingerMs, callTimeoutMs, retryForMs, ackLevel, resendOnce });
    this.producer = crypto.randomBytes(16).toString('hex');
    this.sequence = 0n;
    this.open = new Map(); // table -> the batch being filled
    this.unacknowledged = new Set(); // promises of the batches sent and not yet settled
    this.stats = { written: 0, acknowledged: 0, batches: 0, duplicates: 0 };
  }

  // Appends one row to its table's batch; returns the promise of that batch's acknowledgement.
  write(table, row) {
    let batch = this.open.get(table);
    if (!batch) {
      batch = { lines: [], timer: setTimeout(() => this.send(table), this.lingerMs) };
      batch.promise = new Promise((resolve, reject) => Object.assign(batch, { resolve, reject }));
      this.open.set(table, batch);
    }
    batch.lines.push(JSON.stringify(row) + '\n');
    this.stats.written += 1;
    if (batch.lines.length >= this.batchRows) this.send(table);
    return batch.promise;
  }

  send(table) {
    const batch = this.open.get(table);
    this.open.delete(table);
    clearTimeout(batch.timer);
    this.sequence += 1n;
    this.stats.batches += 1;
    const request = { table, format: 'FORMAT_JSON_EACH_ROW', rows: Buffer.from(batch.lines.join('')),
      ack_level: this.ackLevel, producer: this.producer, sequence: this.sequence.toString() };
    let reply = this.call(request, Date.now() + this.retryForMs);
    if (this.resendOnce) { // demonstrates the key: the same request again is answered as a duplicate
      this.resendOnce = false;
      reply = reply.then(() => this.call(request, Date.now() + this.retryForMs));
    }
    reply.then((ack) => { this.stats.acknowledged += batch.lines.length; batch.resolve(ack); }, batch.reject);
    const settled = () => this.unacknowledged.delete(batch.promise);
    this.unacknowledged.add(batch.promise);
    batch.promise.then(settled, settled); // also marks a failure as handled: flush() reports it
  }

  // One Write, resent with the same key while the status says the outcome is unknown or the buffer is full.
  async call(request, giveUpAt) {
    for (let attempt = 0; ; attempt += 1) {
      try {
        const ack = await new Promise((resolve, reject) => this.stub.Write(request,
          { deadline: Date.now() + this.callTimeoutMs }, (err, res) => (err ? reject(err) : resolve(res))));
        if (ack.duplicate) this.stats.duplicates += 1;
        return ack;
      } catch (err) {
        if (!RESEND.has(err.code) || Date.now() >= giveUpAt) throw err;
        const hint = err.code === grpc.status.RESOURCE_EXHAUSTED && err.metadata?.get('retry-after-ms')[0];
        await sleep(Number(hint) || Math.min(100 * 2 ** attempt, 2000));
      }
    }
  }

  // Sends the open batches; resolves once everything written before it was acknowledged.
  async flush() {
    for (const table of [...this.open.keys()]) this.send(table);
    await Promise.all([...this.unacknowledged]);
  }

  async close() {
    try { await this.flush(); } finally { this.stub.close(); }
  }
}

async function main(argv) {
  const [target, table, count] = argv.filter((a) => !a.startsWith('--'));
  const n = Number(count);
  if (!target || !table || !Number.isInteger(n) || n < 0) {
    throw new Error('usage: node client.js TARGET TABLE N [--resend-once]');
  }
  const client = new BatchingClient(target, { resendOnce: argv.includes('--resend-once') });
  for (let i = 0; i < n; i += 1) client.write(table, { id: i, s: 'node ' + i });
  await client.flush();
  await client.close();
  process.stdout.write(JSON.stringify(client.stats) + '\n');
}

if (require.main === module) {
  main(process.argv.slice(2)).catch((err) => {
    const code = typeof err.code === 'number' ? `${grpc.status[err.code]}: ` : '';
    process.stderr.write(`client.js: ${code}${err.details || err.message}\n`);
    process.exit(1);
  });
}

module.exports = { BatchingClient };
