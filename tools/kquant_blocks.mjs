// kquant_blocks: writes tests/data/kq-blocks.bin, a few blocks of each K-quant
// type (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) with the floats the oracle's
// independent JS decoder (lib/quant.mjs) gives for them, so tests/test_kern_kq.c
// can check kern_dequant_row_ref against a second implementation.
//
// Usage: node tools/kquant_blocks.mjs [ORACLE_DIR] [OUT]
//   ORACLE_DIR: the oracle checkout (default $ORACLE_DIR, else ../shared/oracle
//   relative to the repository); OUT: default tests/data/kq-blocks.bin.
//
// File format (little-endian):
//   "KQB1", u32 record count, then per record:
//   u32 GGML type id, u32 number of blocks nb, the nb blocks' bytes,
//   then nb * 256 f32 decoded values.
// Per type: one block encoded by the oracle's own quantiser from random
// values of both signs and mixed magnitudes, and one of random bytes (scale
// and code bit patterns of every kind) whose f16 fields are set to finite
// values of assorted signs and sizes.
import fs from "node:fs";
import path from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const oracleDir = path.resolve(
    process.argv[2] || process.env.ORACLE_DIR || path.join(here, "..", "..", "shared", "oracle"));
const out = process.argv[3] || path.join(here, "..", "tests", "data", "kq-blocks.bin");
const quant = await import(pathToFileURL(path.join(oracleDir, "lib", "quant.mjs")).href);

// xorshift32, fixed seed: the file is reproducible
let seed = 0x2545f491;
function rnd() {
    seed ^= seed << 13; seed >>>= 0;
    seed ^= seed >>> 17;
    seed ^= seed << 5; seed >>>= 0;
    return seed / 4294967296;
}

// byte offsets of the f16 fields of each type's block
const F16_FIELDS = {Q2_K: [80, 82], Q3_K: [108], Q4_K: [0, 2], Q5_K: [0, 2], Q6_K: [208], IQ4_XS: [0]};
const F16_VALUES = [0.0123, -0.5, 3.75, -0.000061, 1e-7, 2.0, -17.25, 0.25];

const records = [];
for (const name of Object.keys(F16_FIELDS)) {
    const type = quant.typeByName(name);
    const src = new Float32Array(256);
    for (let i = 0; i < 256; i++) src[i] = (rnd() - 0.5) * Math.pow(10, 3 * rnd() - 2);
    const enc = quant.encode(type, src);
    const raw = new Uint8Array(type.size);
    for (let i = 0; i < raw.length; i++) raw[i] = Math.floor(rnd() * 256);
    for (const off of F16_FIELDS[name]) {
        const h = quant.f32ToF16Bits(F16_VALUES[Math.floor(rnd() * F16_VALUES.length)]);
        raw[off] = h & 255;
        raw[off + 1] = h >> 8;
    }
    const bytes = new Uint8Array(enc.length + raw.length);
    bytes.set(enc, 0);
    bytes.set(raw, enc.length);
    const nb = bytes.length / type.size;
    records.push({id: type.id, nb, bytes, vals: quant.decode(type, bytes, nb * 256)});
}

let size = 8;
for (const r of records) size += 8 + r.bytes.length + 4 * r.vals.length;
const buf = Buffer.alloc(size);
buf.write("KQB1", 0, "latin1");
buf.writeUInt32LE(records.length, 4);
let o = 8;
for (const r of records) {
    buf.writeUInt32LE(r.id, o);
    buf.writeUInt32LE(r.nb, o + 4);
    o += 8;
    buf.set(r.bytes, o);
    o += r.bytes.length;
    for (const v of r.vals) { buf.writeFloatLE(v, o); o += 4; }
}
fs.writeFileSync(out, buf);
console.log(`${out}: ${records.length} records, ${size} bytes`);
