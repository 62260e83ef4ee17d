#!/usr/bin/env node
// iq_blocks: writes tests/data/iq-blocks.bin, blocks of the grid types with
// the values the oracle's own decoder (lib/quant_iq.mjs, an independent
// JavaScript port of GGML's dequantize_row_iq*) gives them.  test_kern_iq
// checks that kern_dequant_row_ref reproduces them bit for bit.
//
//   ORACLE_DIR=../shared/oracle node tools/iq_blocks.mjs [out]
//
// Per type two blocks: one of random bytes (with a finite f16 d of random
// sign) and one the oracle's encoder made from normal values.
//
// File format (little-endian): "IQBLK001", then records until the end:
//   u32 type id (GGML's), u32 n_blocks, u32 block_bytes,
//   n_blocks * block_bytes bytes of blocks, n_blocks * 256 f32 values.
import fs from "node:fs";
import path from "node:path";
import {pathToFileURL} from "node:url";

const oracle = process.env.ORACLE_DIR || "../shared/oracle";
const lib = (f) => pathToFileURL(path.resolve(oracle, "lib", f)).href;
const {IQ_TYPES, quantizeIQ, dequantizeIQ} = await import(lib("quant_iq.mjs"));
const {f32ToF16Bits} = await import(lib("f16.mjs"));

// xorshift32, fixed seed: the same file every run
let st = 0x2545f491;
function u32() {
	st ^= st << 13;
	st >>>= 0;
	st ^= st >>> 17;
	st ^= st << 5;
	st >>>= 0;
	return st;
}
function normal() {
	const a = (u32() + 1) / 4294967297, b = u32() / 4294967296;
	return Math.sqrt(-2 * Math.log(a)) * Math.cos(2 * Math.PI * b);
}

const order = ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"];
const parts = [Buffer.from("IQBLK001", "latin1")];
for (const name of order) {
	const {id, size} = IQ_TYPES[name];
	const nb = 2;
	const blocks = new Uint8Array(nb * size);
	for (let i = 0; i < size; i++) blocks[i] = u32() & 0xff;
	// a finite d (|d| in [2^-8, 2)) of random sign
	const d = f32ToF16Bits((u32() & 1 ? -1 : 1) * Math.pow(2, -8 + 9 * (u32() / 4294967296)));
	if (name === "IQ1_M") {
		for (let k = 0; k < 4; k++) {
			const p = 48 + 2 * k + 1;
			blocks[p] = (blocks[p] & 0x0f) | (((d >> (4 * k)) & 15) << 4);
		}
	} else {
		blocks[0] = d & 0xff;
		blocks[1] = d >> 8;
	}
	const src = Float32Array.from({length: 256}, normal);
	const enc = new Uint8Array(size);
	quantizeIQ(name, src, enc, 0);
	blocks.set(enc, size);
	const vals = new Float32Array(nb * 256);
	dequantizeIQ(name, blocks, vals, nb);
	const head = Buffer.alloc(12);
	head.writeUInt32LE(id, 0);
	head.writeUInt32LE(nb, 4);
	head.writeUInt32LE(size, 8);
	parts.push(head, Buffer.from(blocks), Buffer.from(vals.buffer));
}
const out = process.argv[2] || "tests/data/iq-blocks.bin";
fs.writeFileSync(out, Buffer.concat(parts));
console.log(`${out}: ${order.length} types`);
