// The TypeScript client of the HAM API against a live stack: the types are generated from the
// stack's /openapi.json by openapi-typescript (`npm run generate`, into generated/, unmodified),
// the calls made by openapi-fetch. Run by tests/e2e/test_typescript_client.py, which starts the
// stack and sets HAM_API_URL, HAM_API_KEY and HAM_TEST_DATA (a folder of small PNGs).
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { test } from "node:test";

import createClient from "openapi-fetch";

const baseUrl = process.env.HAM_API_URL;
const data = process.env.HAM_TEST_DATA;
const QUICK = { steps: 2, size: 64 };
const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

/** @type {import("openapi-fetch").Client<import("../generated/schema").paths>} */
const client = createClient({ baseUrl, headers: { Authorization: `Bearer ${process.env.HAM_API_KEY}` } });

// A multipart body: openapi-fetch sends JSON unless told otherwise; arrays are repeated fields.
function formData(body) {
  const form = new FormData();
  for (const [name, value] of Object.entries(body)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item instanceof Blob) form.append(name, item, `${name}.png`);
      else form.append(name, String(item));
    }
  }
  return form;
}
const multipart = { bodySerializer: formData };
const png = async (name) => new Blob([await readFile(`${data}/${name}`)], { type: "image/png" });
const dataUri = async (name) => `data:image/png;base64,${(await readFile(`${data}/${name}`)).toString("base64")}`;

// Follow GET /v1/transfers/{id}/events: each event is a TransferEvent (event, id, data: the job as JSON).
async function follow(jobId) {
  const { response } = await client.GET("/v1/transfers/{job_id}/events", {
    params: { path: { job_id: jobId } },
    parseAs: "stream",
  });
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type"), /^text\/event-stream/);
  const events = [];
  let buffer = "";
  for await (const chunk of response.body.pipeThrough(new TextDecoderStream())) {
    buffer += chunk.replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = {};
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue; // keep-alive comment
        const at = line.indexOf(":");
        event[line.slice(0, at)] = line.slice(at + 1).replace(/^ /, "");
      }
      if (event.data === undefined) continue;
      events.push({ ...event, job: JSON.parse(event.data) });
      if (TERMINAL.has(event.event)) return events;
    }
  }
  return events;
}

// A result URL is signed: GET /v1/files/{key} with its expires and sig.
async function download(url) {
  const parsed = new URL(url, baseUrl);
  const { data: bytes, response } = await client.GET("/v1/files/{key}", {
    params: {
      path: { key: parsed.pathname.replace(/^\/v1\/files\//, "") },
      query: { expires: Number(parsed.searchParams.get("expires")), sig: parsed.searchParams.get("sig") },
    },
    parseAs: "arrayBuffer",
  });
  assert.equal(response.status, 200);
  return { type: response.headers.get("content-type"), bytes: new Uint8Array(bytes) };
}

test("a multipart job: submit, follow its events, download", async () => {
  const { data: job, response } = await client.POST("/v1/transfers", {
    body: { content: await png("content0.png"), style: [await png("style0.png")], sini: false, ...QUICK },
    ...multipart,
  });
  assert.equal(response.status, 202, JSON.stringify(job));
  assert.equal(response.headers.get("location"), `/v1/transfers/${job.id}`);
  assert.deepEqual(job.urls, {
    self: `/v1/transfers/${job.id}`, cancel: `/v1/transfers/${job.id}/cancel`, events: `/v1/transfers/${job.id}/events`,
  });
  const events = await follow(job.id);
  const last = events.at(-1);
  assert.equal(last.event, "succeeded");
  assert.equal(last.job.status, "succeeded");
  assert.equal(last.job.params.sini, false);
  assert.ok(events.every((e, i) => i === 0 || Number(e.id) > Number(events[i - 1].id)), "ids grow");
  assert.ok(last.job.result_expires_at);
  const result = await download(last.job.result_url);
  assert.equal(result.type, "image/png");
  assert.deepEqual([...result.bytes.slice(1, 4)], [0x50, 0x4e, 0x47]); // "PNG"
  // Resuming after the terminal event: 204, nothing more.
  const { response: resumed } = await client.GET("/v1/transfers/{job_id}/events", {
    params: { path: { job_id: job.id }, header: { "Last-Event-ID": last.id } },
    parseAs: "stream",
  });
  assert.equal(resumed.status, 204);
});

test("a library style, used by style_id in a form and in a 3-style JSON job by data URI", async () => {
  const { data: style, response } = await client.POST("/v1/styles", {
    body: { image: await png("style1.png"), name: "ts house" },
    ...multipart,
  });
  assert.equal(response.status, 201, JSON.stringify(style));
  assert.equal(style.name, "ts house");

  const { data: byId } = await client.POST("/v1/transfers", {
    body: { content: await png("content1.png"), style_id: [style.id], ...QUICK },
    ...multipart,
  });
  assert.deepEqual(byId.style_ids, [style.id]);

  const { data: three, response: accepted } = await client.POST("/v1/transfers", {
    body: {
      content_url: await dataUri("content0.png"),
      style_url: [await dataUri("style0.png"), await dataUri("style2.png")],
      style_id: style.id,
      ...QUICK,
    },
  });
  assert.equal(accepted.status, 202, JSON.stringify(three));
  assert.equal(three.style_count, 3);
  const done = (await follow(three.id)).at(-1).job;
  assert.equal(done.status, "succeeded");
  assert.equal(done.result_urls.length, 3);
  for (const url of done.result_urls) assert.equal((await download(url)).type, "image/png");
  const byIdDone = (await follow(byId.id)).at(-1).job;
  assert.equal(byIdDone.status, "succeeded");

  const { response: deleted } = await client.DELETE("/v1/styles/{style_id}", {
    params: { path: { style_id: style.id } },
  });
  assert.equal(deleted.status, 204);
  const { error, response: missing } = await client.GET("/v1/styles/{style_id}", {
    params: { path: { style_id: style.id } },
  });
  assert.equal(missing.status, 404);
  assert.equal(error.error.code, "not_found");
});

test("the same Idempotency-Key with another request is a 409 naming the key", async () => {
  const key = `ts-${Date.now()}`;
  const send = async (steps) =>
    client.POST("/v1/transfers", {
      body: { content_url: await dataUri("content0.png"), style_prompt: "ink", size: 64, steps },
      params: { header: { "Idempotency-Key": key } },
    });
  const first = await send(2);
  const again = await send(2);
  const other = await send(3);
  assert.deepEqual([first.response.status, again.response.status, other.response.status], [202, 200, 409]);
  assert.equal(again.data.id, first.data.id);
  assert.equal(other.error.error.code, "idempotency_key_reused");
  assert.match(other.error.error.message, new RegExp(key));
  await client.POST("/v1/transfers/{job_id}/cancel", { params: { path: { job_id: first.data.id } } });
});
