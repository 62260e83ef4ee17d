/* Chat formats against the models' own Jinja templates.
 *
 * tests/data/chat/cases.txt holds conversations; NAME.expected holds what the
 * chat template NAME.jinja (taken from the GGUF files of the real
 * vocabularies) renders for each, made by @huggingface/jinja (mkref.mjs
 * there).  Every case must match byte for byte.  Then the format choice from
 * template text and architecture, harmony's structure and bad roles. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../common/err.h"
#include "../common/log.h"
#include "../coordinator/serve/chat.h"

static const char *data_path(const char *file)
{
	static char buf[4096];
	const char *top = getenv("top_srcdir");
	snprintf(buf, sizeof(buf), "%s/tests/data/chat/%s", top && *top ? top : ".", file);
	return buf;
}

static char *read_file(const char *file)
{
	FILE *f = fopen(data_path(file), "rb");
	if (!f)
		return NULL;
	fseek(f, 0, SEEK_END);
	long n = ftell(f);
	fseek(f, 0, SEEK_SET);
	char *p = malloc((size_t)n + 1);
	if (p && fread(p, 1, (size_t)n, f) != (size_t)n) {
		free(p);
		p = NULL;
	}
	if (p)
		p[n] = 0;
	fclose(f);
	return p;
}

/* \n \t \\ */
static char *unescape(const char *s, size_t n)
{
	char *o = malloc(n + 1);
	size_t k = 0;
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '\\' && i + 1 < n) {
			char c = s[++i];
			o[k++] = c == 'n' ? '\n' : c == 't' ? '\t' : c;
		} else {
			o[k++] = s[i];
		}
	}
	o[k] = 0;
	return o;
}

#define MAX_MSG 16
struct chat_case {
	char name[64];
	int gen, think;
	int n;
	struct chat_message m[MAX_MSG];
	char *owned[2 * MAX_MSG];
	int n_owned;
};

static int load_cases(struct chat_case *cases, int cap)
{
	char *text = read_file("cases.txt");
	assert_non_null(text);
	int n = 0;
	struct chat_case *c = NULL;
	for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
		if (line[0] == '#')
			continue;
		char *sp = strchr(line, ' ');
		size_t kl = sp ? (size_t)(sp - line) : strlen(line);
		const char *rest = sp ? sp + 1 : "";
		if (!strncmp(line, "case", kl) && kl == 4) {
			assert_true(n < cap);
			c = &cases[n];
			memset(c, 0, sizeof(*c));
			assert_int_equal(sscanf(rest, "%63s %d %d", c->name, &c->gen, &c->think),
					 3);
		} else if (!strncmp(line, "end", kl) && kl == 3) {
			n++;
		} else if (!strncmp(line, "reasoning", kl) && kl == 9) {
			char *r = unescape(rest, strlen(rest));
			c->owned[c->n_owned++] = r;
			c->m[c->n - 1].reasoning = r;
		} else {
			assert_true(c->n < MAX_MSG);
			char *role = unescape(line, kl);
			char *content = unescape(rest, strlen(rest));
			c->owned[c->n_owned++] = role;
			c->owned[c->n_owned++] = content;
			c->m[c->n++] = (struct chat_message){role, content, NULL};
		}
	}
	free(text);
	return n;
}

static void free_cases(struct chat_case *cases, int n)
{
	for (int i = 0; i < n; i++)
		for (int k = 0; k < cases[i].n_owned; k++)
			free(cases[i].owned[k]);
}

static void check_template(const char *name, const char *arch, enum chat_format want)
{
	char file[128];
	snprintf(file, sizeof(file), "%s.jinja", name);
	char *tmpl = read_file(file);
	assert_non_null(tmpl);
	enum chat_format f;
	/* the template decides even when the architecture says otherwise */
	assert_int_equal(chat_pick_format(arch, tmpl, &f), 0);
	assert_int_equal(f, want);
	free(tmpl);
	snprintf(file, sizeof(file), "%s.expected", name);
	char *exp = read_file(file);
	assert_non_null(exp);
	static struct chat_case cases[64];
	int n = load_cases(cases, 64);
	assert_true(n >= 10);
	int checked = 0;
	for (char *line = strtok(exp, "\n"); line; line = strtok(NULL, "\n")) {
		char *tab = strchr(line, '\t');
		assert_non_null(tab);
		*tab = 0;
		struct chat_case *c = NULL;
		for (int i = 0; i < n; i++)
			if (!strcmp(cases[i].name, line))
				c = &cases[i];
		assert_non_null(c);
		char *want_text = unescape(tab + 1, strlen(tab + 1));
		struct chat_options o = {.add_generation_prompt = c->gen,
					 .enable_thinking = c->think};
		char *got = NULL;
		size_t len = 0;
		assert_int_equal(chat_render(f, c->m, c->n, &o, &got, &len, NULL, 0), 0);
		assert_int_equal(len, strlen(got));
		if (strcmp(got, want_text))
			print_message("%s / %s:\n got: %s\nwant: %s\n", name, c->name, got,
				      want_text);
		assert_string_equal(got, want_text);
		free(got);
		free(want_text);
		checked++;
	}
	assert_int_equal(checked, n);
	free_cases(cases, n);
	free(exp);
}

static void test_deepseek_template(void **state)
{
	(void)state;
	check_template("deepseek_v3", "qwen3moe", CHAT_FORMAT_DEEPSEEK);
}

static void test_qwen3_template(void **state)
{
	(void)state;
	check_template("qwen3", "deepseek2", CHAT_FORMAT_QWEN3);
}

static void test_pick_by_arch(void **state)
{
	(void)state;
	enum chat_format f;
	assert_int_equal(chat_pick_format("deepseek2", NULL, &f), 0);
	assert_int_equal(f, CHAT_FORMAT_DEEPSEEK);
	assert_int_equal(chat_pick_format("deepseek4", "", &f), 0);
	assert_int_equal(f, CHAT_FORMAT_DEEPSEEK);
	assert_int_equal(chat_pick_format("qwen3moe", NULL, &f), 0);
	assert_int_equal(f, CHAT_FORMAT_QWEN3);
	assert_int_equal(chat_pick_format("gpt-oss", "{{ unknown }}", &f), 0);
	assert_int_equal(f, CHAT_FORMAT_HARMONY);
	assert_int_equal(chat_pick_format("x", "<|start|>{{m}}<|channel|>", &f), 0);
	assert_int_equal(f, CHAT_FORMAT_HARMONY);
	assert_int_equal(chat_pick_format("llama", NULL, &f), ERR_CONFIG);
}

static void test_harmony(void **state)
{
	(void)state;
	struct chat_message m[] = {{"system", "Be terse.", NULL},
				   {"user", "Hi", NULL},
				   {"assistant", "Hello", NULL},
				   {"user", "Bye", NULL}};
	struct chat_options o = {.add_generation_prompt = 1,
				 .enable_thinking = -1,
				 .date = "2025-01-02",
				 .reasoning_effort = "low"};
	char *got = NULL;
	size_t len;
	assert_int_equal(chat_render(CHAT_FORMAT_HARMONY, m, 4, &o, &got, &len, NULL, 0), 0);
	const char *want =
	    "<|start|>system<|message|>You are ChatGPT, a large language model trained by "
	    "OpenAI.\nKnowledge cutoff: 2024-06\nCurrent date: 2025-01-02\n\nReasoning: low\n\n"
	    "# Valid channels: analysis, commentary, final. Channel must be included for every "
	    "message.<|end|><|start|>developer<|message|># Instructions\n\nBe terse.\n\n<|end|>"
	    "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>Hello"
	    "<|end|><|start|>user<|message|>Bye<|end|><|start|>assistant";
	assert_string_equal(got, want);
	free(got);
}

static void test_bad_input(void **state)
{
	(void)state;
	struct chat_message m[] = {{"user", "Hi", NULL}, {"robot", "x", NULL}};
	struct chat_options o = {.add_generation_prompt = 1, .enable_thinking = -1};
	char *got = NULL, err[128] = "";
	size_t len;
	assert_int_equal(chat_render(CHAT_FORMAT_QWEN3, m, 2, &o, &got, &len, err, sizeof(err)),
			 ERR_CONFIG);
	assert_null(got);
	assert_non_null(strstr(err, "messages[1].role"));
	assert_int_equal(chat_render(CHAT_FORMAT_QWEN3, m, 0, &o, &got, &len, err, sizeof(err)),
			 ERR_CONFIG);
	struct chat_message nul[] = {{NULL, "x", NULL}};
	assert_int_equal(chat_render(CHAT_FORMAT_DEEPSEEK, nul, 1, &o, &got, &len, NULL, 0),
			 ERR_CONFIG);
}

/* Feeds text in pieces cut at `cut` (0: whole), returns content|reasoning. */
static void parse(enum chat_format f, const char *text, size_t cut, char *content, char *reasoning)
{
	chat_parser *p = NULL;
	assert_int_equal(chat_parser_new(f, &p), 0);
	struct chat_split o = {0};
	size_t n = strlen(text);
	for (size_t i = 0; i < n; i += cut ? cut : n) {
		size_t k = cut && i + cut < n ? cut : n - i;
		assert_int_equal(chat_parser_push(p, text + i, k, 0, &o), 0);
	}
	assert_int_equal(chat_parser_push(p, "", 0, 1, &o), 0);
	snprintf(content, 256, "%.*s", (int)o.content_len, o.content ? o.content : "");
	snprintf(reasoning, 256, "%.*s", (int)o.reasoning_len, o.reasoning ? o.reasoning : "");
	chat_split_free(&o);
	chat_parser_destroy(&p);
}

static void test_parser(void **state)
{
	(void)state;
	static const struct {
		enum chat_format f;
		const char *text, *content, *reasoning;
	} cases[] = {
	    {CHAT_FORMAT_QWEN3, "<think>\nLet me see.\n</think>\n\nThe answer.", "The answer.",
	     "Let me see.\n"},
	    {CHAT_FORMAT_QWEN3, "No thinking here.", "No thinking here.", ""},
	    {CHAT_FORMAT_QWEN3, "<thin", "<thin", ""},
	    {CHAT_FORMAT_QWEN3, "<think>unfinished", "", "unfinished"},
	    {CHAT_FORMAT_QWEN3, "a <think> b", "a <think> b", ""},
	    {CHAT_FORMAT_HARMONY,
	     "<|channel|>analysis<|message|>User says hi.<|start|>assistant<|channel|>final"
	     "<|message|>Hello!",
	     "Hello!", "User says hi."},
	    {CHAT_FORMAT_HARMONY, "plain <|chan", "plain <|chan", ""},
	    {CHAT_FORMAT_HARMONY, "<|channel|>final<|message|>x < y", "x < y", ""},
	    {CHAT_FORMAT_DEEPSEEK, "<think>kept</think>", "<think>kept</think>", ""},
	};
	for (size_t c = 0; c < sizeof(cases) / sizeof(cases[0]); c++) {
		for (size_t cut = 0; cut <= 9; cut++) {
			char content[256], reasoning[256];
			parse(cases[c].f, cases[c].text, cut, content, reasoning);
			if (strcmp(content, cases[c].content) ||
			    strcmp(reasoning, cases[c].reasoning))
				print_message("case %zu cut %zu: content '%s' reasoning '%s'\n", c,
					      cut, content, reasoning);
			assert_string_equal(content, cases[c].content);
			assert_string_equal(reasoning, cases[c].reasoning);
		}
	}
}

int main(void)
{
	log_set_quiet(1);
	const struct CMUnitTest tests[] = {
	    cmocka_unit_test(test_deepseek_template), cmocka_unit_test(test_qwen3_template),
	    cmocka_unit_test(test_pick_by_arch),      cmocka_unit_test(test_harmony),
	    cmocka_unit_test(test_bad_input),	      cmocka_unit_test(test_parser),
	};
	return cmocka_run_group_tests_name("chat", tests, NULL, NULL);
}
