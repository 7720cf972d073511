// Reads an MCAP run log with @mcap/core (the TypeScript MCAP library Foxglove uses) and reports, as JSON:
// message counts per topic, channel encodings / schema names, metadata record names, and every integer
// in a JSON message that JavaScript cannot hold exactly (above 2^53). Usage: node mcap_node_reader.mjs FILE
import { McapIndexedReader } from "@mcap/core";
import { decompress } from "fzstd";
import { open } from "node:fs/promises";

const path = process.argv[2];
const fh = await open(path, "r");
const size = (await fh.stat()).size;
const readable = {
  size: async () => BigInt(size),
  read: async (offset, length) => {
    const buf = new Uint8Array(Number(length));
    await fh.read(buf, 0, Number(length), Number(offset));
    return buf;
  },
};
const reader = await McapIndexedReader.Initialize({
  readable,
  decompressHandlers: { zstd: (data, decompressedSize) => decompress(data, new Uint8Array(Number(decompressedSize))) },
});

const channels = {};
for (const ch of reader.channelsById.values()) {
  const schema = reader.schemasById.get(ch.schemaId);
  channels[ch.topic] = { messageEncoding: ch.messageEncoding, schemaName: schema?.name, schemaEncoding: schema?.encoding };
  if (schema?.encoding === "jsonschema") {
    JSON.parse(new TextDecoder().decode(schema.data)); // the schema itself is valid JSON
  }
}

const counts = {};
const unsafe = [];
let jsonMessages = 0;
const text = new TextDecoder();
function walk(value, where) {
  if (typeof value === "number" && Number.isInteger(value) && !Number.isSafeInteger(value)) {
    unsafe.push(`${where} = ${value}`);
  } else if (Array.isArray(value)) {
    value.forEach((v, i) => walk(v, `${where}[${i}]`));
  } else if (value !== null && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) walk(v, `${where}.${k}`);
  }
}
for await (const msg of reader.readMessages()) {
  const ch = reader.channelsById.get(msg.channelId);
  counts[ch.topic] = (counts[ch.topic] ?? 0) + 1;
  if (ch.messageEncoding === "json") {
    walk(JSON.parse(text.decode(msg.data)), ch.topic);
    jsonMessages += 1;
  }
}
const metadata = [];
for (const idx of reader.metadataIndexes) metadata.push(idx.name);
await fh.close();
console.log(JSON.stringify({ counts, channels, metadata, jsonMessages, unsafe: unsafe.slice(0, 10), nUnsafe: unsafe.length }));
