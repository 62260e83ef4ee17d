#!/usr/bin/env node
// logits_kl: how far a candidate logits file is from a reference one.
// Both files: float32 little-endian, rows x n_vocab (moefleet logits --out).
// Prints one line: rows, mean and max KL(ref || cand) in nats over the
// softmax of each row, and the fraction of rows whose argmax agrees.
// usage: node bench/logits_kl.mjs REF.f32 CAND.f32 N_VOCAB
import { readFileSync } from 'node:fs';

const [refPath, candPath, nv] = process.argv.slice(2);
const V = Number(nv);
if (!refPath || !candPath || !Number.isInteger(V) || V < 1) {
	console.error('usage: node logits_kl.mjs REF.f32 CAND.f32 N_VOCAB');
	process.exit(2);
}
const load = (p) => {
	const b = readFileSync(p);
	if (b.length % (4 * V) !== 0) {
		console.error(`${p}: ${b.length} bytes is not a whole number of ${V}-float rows`);
		process.exit(1);
	}
	return new Float32Array(b.buffer, b.byteOffset, b.length / 4);
};
const ref = load(refPath), cand = load(candPath);
if (ref.length !== cand.length) {
	console.error(`${refPath} and ${candPath} differ in size`);
	process.exit(1);
}
const rows = ref.length / V;
// log-softmax of row r of x into out (double precision)
const logSoftmax = (x, r, out) => {
	let mx = -Infinity;
	for (let i = 0; i < V; i++) mx = Math.max(mx, x[r * V + i]);
	let s = 0;
	for (let i = 0; i < V; i++) s += Math.exp(x[r * V + i] - mx);
	const lse = mx + Math.log(s);
	for (let i = 0; i < V; i++) out[i] = x[r * V + i] - lse;
};
const lp = new Float64Array(V), lq = new Float64Array(V);
let sum = 0, max = 0, agree = 0;
for (let r = 0; r < rows; r++) {
	logSoftmax(ref, r, lp);
	logSoftmax(cand, r, lq);
	let kl = 0, ap = 0, aq = 0;
	for (let i = 0; i < V; i++) {
		kl += Math.exp(lp[i]) * (lp[i] - lq[i]);
		if (lp[i] > lp[ap]) ap = i;
		if (lq[i] > lq[aq]) aq = i;
	}
	kl = Math.max(kl, 0);
	sum += kl;
	max = Math.max(max, kl);
	agree += ap === aq ? 1 : 0;
}
console.log(`rows ${rows} kl_mean ${(sum / rows).toExponential(3)} kl_max ${max.toExponential(3)} ` +
	`top1_agree ${(agree / rows).toFixed(3)}`);
