// Load generator for `moefleet serve`: N concurrent clients, each sending
// streamed /v1/completions requests back to back for a fixed time (node >= 18,
// no dependencies).  Prints one JSON object: requests, errors (by status),
// generated tokens, throughput, and p50/p99 of time to first token, whole
// request latency and mean inter-token latency.
//   node bench/load.mjs URL KEY MODEL CLIENTS SECONDS
const [url, key, model, clients = '32', seconds = '120'] = process.argv.slice(2);
const words = 'the cluster routes every token to a few experts while attention stays on the coordinator and workers hold the rest of the weights'.split(' ');
let seed = 12345;
const rnd = (n) => ((seed = (seed * 1103515245 + 12345) % 2147483648) % n);
const stats = { requests: 0, ok: 0, errors: {}, tokens: 0, ttft: [], latency: [], itl: [] };
const t_end = Date.now() + Number(seconds) * 1000;

async function one() {
	const n_words = 8 + rnd(120);
	const prompt = Array.from({ length: n_words }, () => words[rnd(words.length)]).join(' ');
	const body = { model, prompt, max_tokens: 16 + rnd(112), temperature: 0.8, stream: true, stream_options: { include_usage: true } };
	const t0 = performance.now();
	let t_first = 0, tokens = 0;
	stats.requests++;
	try {
		const res = await fetch(url + '/v1/completions', {
			method: 'POST',
			headers: { 'Content-Type': 'application/json', Authorization: 'Bearer ' + key },
			body: JSON.stringify(body),
		});
		if (res.status !== 200) {
			stats.errors[res.status] = (stats.errors[res.status] ?? 0) + 1;
			await res.text();
			return;
		}
		const dec = new TextDecoder();
		let buf = '';
		for await (const part of res.body) {
			buf += dec.decode(part, { stream: true });
			let i;
			while ((i = buf.indexOf('\n\n')) >= 0) {
				const ev = buf.slice(0, i);
				buf = buf.slice(i + 2);
				if (!ev.startsWith('data: {')) continue;
				const j = JSON.parse(ev.slice(6));
				if (j.error) throw new Error(j.error.message);
				if (j.usage) tokens = j.usage.completion_tokens;
				if (!t_first && j.choices?.[0]?.text) t_first = performance.now();
			}
		}
		const t1 = performance.now();
		stats.ok++;
		stats.tokens += tokens;
		if (t_first) stats.ttft.push((t_first - t0) / 1000);
		stats.latency.push((t1 - t0) / 1000);
		if (t_first && tokens > 1) stats.itl.push((t1 - t_first) / 1000 / (tokens - 1));
	} catch (e) {
		stats.errors[e.message] = (stats.errors[e.message] ?? 0) + 1;
	}
}

async function client() {
	while (Date.now() < t_end) await one();
}

const t_start = performance.now();
await Promise.all(Array.from({ length: Number(clients) }, client));
const wall = (performance.now() - t_start) / 1000;
const pct = (a, p) => {
	if (!a.length) return null;
	const s = [...a].sort((x, y) => x - y);
	return Number(s[Math.min(s.length - 1, Math.floor(p * s.length))].toFixed(4));
};
console.log(JSON.stringify({
	clients: Number(clients), seconds: Number(wall.toFixed(1)), requests: stats.requests, ok: stats.ok,
	errors: stats.errors, tokens: stats.tokens, tokens_per_s: Number((stats.tokens / wall).toFixed(1)),
	requests_per_s: Number((stats.ok / wall).toFixed(2)),
	ttft_p50: pct(stats.ttft, 0.5), ttft_p99: pct(stats.ttft, 0.99),
	latency_p50: pct(stats.latency, 0.5), latency_p99: pct(stats.latency, 0.99),
	itl_p50: pct(stats.itl, 0.5), itl_p99: pct(stats.itl, 0.99),
}));
