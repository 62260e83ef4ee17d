// Renders tests/data/chat/cases.txt with the models' own chat templates
// (@huggingface/jinja, as installed with the oracle) into NAME.expected:
// one line per case, "NAME<TAB>escaped text".  Run from this directory:
//   NODE_PATH=/tmp/oracle/node_modules node mkref.mjs
import fs from 'fs';
import { createRequire } from 'module';
const require = createRequire(process.env.NODE_PATH ? process.env.NODE_PATH + '/' : import.meta.url);
const { Template } = require('@huggingface/jinja');
const unesc = (s) => s.replace(/\\(.)/g, (_, c) => (c === 'n' ? '\n' : c === 't' ? '\t' : c));
const esc = (s) => s.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/\t/g, '\\t');
const cases = [];
let cur = null;
for (const line of fs.readFileSync('cases.txt', 'utf8').split('\n')) {
	if (line.startsWith('#') || line === '') continue;
	const sp = line.indexOf(' ');
	const key = sp < 0 ? line : line.slice(0, sp);
	const rest = sp < 0 ? '' : line.slice(sp + 1);
	if (key === 'case') {
		const [name, gen, think] = rest.split(' ');
		cur = { name, gen: gen === '1', think: Number(think), messages: [] };
	} else if (key === 'end') {
		cases.push(cur);
	} else if (key === 'reasoning') {
		cur.messages[cur.messages.length - 1].reasoning_content = unesc(rest);
	} else {
		cur.messages.push({ role: key, content: unesc(rest) });
	}
}
for (const name of ['deepseek_v3', 'qwen3']) {
	const t = new Template(fs.readFileSync(name + '.jinja', 'utf8'));
	let out = '';
	for (const c of cases) {
		const ctx = { messages: c.messages, add_generation_prompt: c.gen, bos_token: '' };
		if (c.think >= 0) ctx.enable_thinking = c.think === 1;
		out += c.name + '\t' + esc(t.render(ctx)) + '\n';
	}
	fs.writeFileSync(name + '.expected', out);
}
