// `moefleet serve` through the official OpenAI client (npm "openai"):
// chat and completions, streamed and not, greedy results that agree with each
// other, errors surfacing as the client's typed exceptions.
//   node tests/serve_client.mjs BASE_URL API_KEY MODEL
// Exits 0 when every check passes (prints one line per check), 1 otherwise.
import OpenAI from 'openai';

const [baseURL, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 60000 });
let failed = 0;
function check(name, cond, info) {
	console.log(`${cond ? 'ok' : 'FAIL'} ${name}${cond ? '' : ': ' + JSON.stringify(info)}`);
	if (!cond) failed++;
}

const messages = [
	{ role: 'system', content: 'You are terse.' },
	{ role: 'user', content: 'Name a colour.' },
];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0 });
check('chat: one choice, assistant message', chat.choices.length === 1 && chat.choices[0].message.role === 'assistant', chat);
check('chat: usage', chat.usage.completion_tokens === 10 && chat.usage.total_tokens === chat.usage.prompt_tokens + 10, chat.usage);

const stream = await client.chat.completions.create({ model, messages, max_tokens: 10, temperature: 0, stream: true, stream_options: { include_usage: true } });
let text = '', finish = null, usage = null;
for await (const chunk of stream) {
	if (chunk.usage) usage = chunk.usage;
	for (const c of chunk.choices) {
		text += c.delta.content ?? '';
		if (c.finish_reason) finish = c.finish_reason;
	}
}
check('chat stream: same text as the whole response', text === chat.choices[0].message.content, { text, whole: chat.choices[0].message.content });
check('chat stream: finish reason and usage', finish === chat.choices[0].finish_reason && usage?.completion_tokens === 10, { finish, usage });

const comp = await client.completions.create({ model, prompt: 'The quick brown fox', max_tokens: 12, temperature: 0 });
check('completion: text and finish reason', typeof comp.choices[0].text === 'string' && comp.choices[0].finish_reason === 'length', comp);
const cstream = await client.completions.create({ model, prompt: 'The quick brown fox', max_tokens: 12, temperature: 0, stream: true });
let ctext = '';
for await (const chunk of cstream) ctext += chunk.choices[0]?.text ?? '';
check('completion stream: same text', ctext === comp.choices[0].text, { ctext, whole: comp.choices[0].text });

const lp = await client.chat.completions.create({ model, messages, max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 3 });
const content = lp.choices[0].logprobs?.content ?? [];
check('chat logprobs: one entry per token, 3 alternatives, the best first',
	content.length === 3 && content.every((e) => e.top_logprobs.length === 3 && e.logprob <= 0 && e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob && Math.abs(e.logprob - e.top_logprobs[0].logprob) < 1e-6), content);

const models = await client.models.list();
check('models: lists the served model', models.data.some((m) => m.id === model), models.data);

try {
	await client.chat.completions.create({ model: 'no-such-model', messages, max_tokens: 2 });
	check('unknown model raises NotFoundError', false, 'no error');
} catch (e) {
	check('unknown model raises NotFoundError', e instanceof OpenAI.NotFoundError && e.code === 'model_not_found', { status: e.status, code: e.code });
}
try {
	await client.chat.completions.create({ model, messages, max_tokens: -1 });
	check('negative max_tokens raises BadRequestError', false, 'no error');
} catch (e) {
	check('negative max_tokens raises BadRequestError', e instanceof OpenAI.BadRequestError && e.param === 'max_tokens', { status: e.status, param: e.param });
}
try {
	const bad = new OpenAI({ baseURL, apiKey: 'wrong', maxRetries: 0 });
	await bad.models.list();
	check('wrong key raises AuthenticationError', false, 'no error');
} catch (e) {
	check('wrong key raises AuthenticationError', e instanceof OpenAI.AuthenticationError, { status: e.status });
}

// cancelling a stream from the client side frees the request on the server
const ac = new AbortController();
const long = await client.completions.create({ model, prompt: 'go', max_tokens: 1500, stream: true }, { signal: ac.signal });
let got = 0;
try {
	for await (const chunk of long) {
		if (++got === 3) ac.abort();
	}
} catch (e) {
	/* the abort */
}
check('a stream can be aborted by the client', got >= 3, got);

process.exit(failed ? 1 : 0);
