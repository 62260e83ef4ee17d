// legacy_blocks.mjs: writes tests/data/legacy-blocks.bin, blocks of the 32-value
// types Q4_1, Q5_0, Q5_1 and IQ4_NL with the values the oracle's own decoder
// (lib/quant.mjs, independent of kernels/) gives them; tests/test_kern_legacy.c
// checks that kern_dequant_row_ref reproduces them bit for bit.
//
//   node tools/legacy_blocks.mjs [OUT]        (a development tool)
// ORACLE_DIR: the oracle (default ../shared/oracle from the repository root).
// The output is deterministic (fixed seed).
//
// Format, little-endian:
//   "LGB1", u32 n_rows, then n_rows rows of
//   u32 type (GGML id), u32 n (values, a multiple of 32),
//   the row's blocks (n / 32 * block bytes), n float32 (the decoded values).
// Each type has a row encoded by the oracle's quantiser from random floats and
// a row of raw random bytes whose f16 scale and minimum are drawn from edge
// values (zero, negative zero, subnormal, huge, negative).
import fs from "node:fs";
import path from "node:path";
import {fileURLToPath, pathToFileURL} from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const oracle = process.env.ORACLE_DIR || path.join(root, "..", "shared", "oracle");
const {typeByName, encode, decode} = await import(pathToFileURL(path.join(oracle, "lib", "quant.mjs")));
const out = process.argv[2] || path.join(root, "tests", "data", "legacy-blocks.bin");

let state = 0x2545f491n;
function rnd32() { // xorshift64*, high 32 bits
    state ^= state >> 12n;
    state ^= (state << 25n) & 0xffffffffffffffffn;
    state ^= state >> 27n;
    return Number(((state * 0x2545f4914f6cdd1dn) & 0xffffffffffffffffn) >> 32n);
}
const rndf = () => rnd32() / 2147483648 - 1; // [-1, 1)

// f16 bits: 0, -0, smallest subnormal, a negative subnormal, largest normal,
// its negative, 1, -0.5, and two ordinary scales
const EDGE_F16 = [0x0000, 0x8000, 0x0001, 0x83ff, 0x7bff, 0xfbff, 0x3c00, 0xb800, 0x2a3d, 0x1c80];
const TYPES = ["Q4_1", "Q5_0", "Q5_1", "IQ4_NL"];
const NB = 4; // blocks per row

const rows = [];
for (const name of TYPES) {
    const type = typeByName(name);
    const hasM = name === "Q4_1" || name === "Q5_1";
    // 1. the oracle's quantiser on floats of a few magnitudes
    const src = new Float32Array(NB * 32);
    for (let i = 0; i < src.length; i++) src[i] = rndf() * [0.01, 1, 30, 0.2][i >> 5] + (hasM ? 0.3 : 0);
    rows.push({type, bytes: encode(type, src)});
    // 2. raw random bytes with edge-value scales (every code and high bit)
    const raw = new Uint8Array(NB * type.size);
    for (let i = 0; i < raw.length; i++) raw[i] = rnd32() & 255;
    for (let b = 0; b < NB; b++) {
        const o = b * type.size;
        const d = EDGE_F16[rnd32() % EDGE_F16.length], m = EDGE_F16[rnd32() % EDGE_F16.length];
        raw[o] = d & 255;
        raw[o + 1] = d >> 8;
        if (hasM) {
            raw[o + 2] = m & 255;
            raw[o + 3] = m >> 8;
        }
    }
    rows.push({type, bytes: raw});
}

const parts = [Buffer.from("LGB1"), u32(rows.length)];
for (const {type, bytes} of rows) {
    const n = (bytes.length / type.size) * 32;
    const vals = decode(type, bytes, n);
    parts.push(u32(type.id), u32(n), Buffer.from(bytes), Buffer.from(new Float32Array(vals).buffer));
}
fs.writeFileSync(out, Buffer.concat(parts));
console.log(`${out}: ${rows.length} rows, ${fs.statSync(out).size} bytes`);

function u32(v) {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v);
    return b;
}
