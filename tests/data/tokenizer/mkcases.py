# Builds the escaped case list: every corpus line, the whole corpus, and hard cases.
# usage: mkcases.py OUT.txt [CORPUS.txt]
import sys
def esc(b: bytes) -> str:
    out = []
    i = 0
    while i < len(b):
        c = b[i]
        if c == 0x5c: out.append('\\\\'); i += 1; continue
        if c == 0x0a: out.append('\\n'); i += 1; continue
        if c == 0x09: out.append('\\t'); i += 1; continue
        if c == 0x0d: out.append('\\r'); i += 1; continue
        if c < 0x20 or c == 0x7f: out.append('\\x%02x' % c); i += 1; continue
        if c < 0x80: out.append(chr(c)); i += 1; continue
        # valid UTF-8 sequence?
        for n in (4, 3, 2):
            try:
                s = b[i:i+n].decode('utf-8')
                if len(s) == 1:
                    out.append(s); i += n; break
            except UnicodeDecodeError:
                pass
        else:
            out.append('\\x%02x' % c); i += 1
    return ''.join(out)

corpus = open(sys.argv[2] if len(sys.argv) > 2 else '/tmp/oracle/tokenizer_corpus.txt', 'rb').read()
lines = corpus.split(b'\n')
if lines and lines[-1] == b'': lines.pop()
cases = list(lines) + [corpus]
U = lambda s: s.encode('utf-8')
hard = [
 "", " ", "  ", "   ", "\t", "\t\t", " \t ", "a  b", "a   b", "a \t b", "a\t\tb", "trailing   ", "x \t",
 "\n", "\n\n", "\r\n", " \n ", "a\n\nb", "a \n b", "\n\n\n   \n", "\u00a0", "a\u00a0b", "a \u00a0b", "\u3000x",
 "\u2028", "a\u180eb", "\u180e \u180e", "\u0085", "x\u0085 y", "\x1c\x1d\x1e\x1f", "a\x0bb\x0cc",
 "I'm", "'s'S'T 're'RE", "don't'll've'd'm", "'", "''", "'s", "x's", " 's", "'ll've", "y'all'd've", "it’s",
 "1", "12", "123", "1234", "12345", "1234567", "12345678901234567890", "3.14159", "1,234,567", " 123 456",
 "a1b2c3", "0x7fffffff", "\u0660\u0661\u0662\u0663\u0664", "\uff11\uff12\uff13\uff14", "\u00bd\u00be", "\u216b", "\u2460\u2461",
 "x123y", "$100.00", "1e-10", "2024-01-02T03:04:05Z",
 "!!!", "...", "?!", "a+b=c", "<=>", "^~|", "`code`", "{[()]}", "@#%&*", "--", "\u2014", "\u00ab\u00bb", "\u00bf\u00a1",
 "a.b,c;d:e", "(x)", "\"q\"", "#!/bin/sh", "C++ & C#", "http://a.b/c?d=e&f=g#h",
 "caf\u00e9", "na\u00efve", "e\u0301", "\u00dcn\u00efc\u00f6d\u00e9", "\u65e5\u672c\u8a9e", "\u4e2d\u6587\u5b57\u7b26", "\ud55c\uad6d\uc5b4",
 "\u041f\u0440\u0438\u0432\u0435\u0442 \u043c\u0438\u0440", "\u0645\u0631\u062d\u0628\u0627", "\u05e9\u05dc\u05d5\u05dd", "\u0e44\u0e17\u0e22",
 "\U0001d573\U0001d58a\U0001d591\U0001d591\U0001d594", "\U00020000", "\U0002ebf0\U0002ebf1 x", "\U0001fae8", "a\u0cf3b", "\U0001e030b",
 "x\U00031350y", "\u31ef!", "\U0001f6dc.", "\U00011f50\U00011f51", "a\u0300\u0301\u0302", "\u0915\u094d\u0937",
 "\U0001f44d", "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466", "\U0001f1fa\U0001f1f8", "\U0001f44b\U0001f3fd", "1\ufe0f\u20e3",
 "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f", "\ufeffBOM", "\u200b\u200c\u200d", "\ufffd", "\uffff\ufffe", "\U0010ffff", "\ue000",
 "<|endoftext|>", "<|bos|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|>", "<|endoftext|", "<| endoftext|>",
 "<|reserved_0|>", "<|reserved_10|>", "<|reserved_1|>0|>", "<|endoftext|><|bos|> hi", " <|endoftext|> ", "<|endoftext|>\n<|bos|>",
 "x<|endoftext|", "<<|endoftext|>>", "</s>", "<s>",
 # special-token text of the real vocabularies (deepseek-v3, qwen2, gpt-4o)
 "<\uff5cbegin\u2581of\u2581sentence\uff5c>Hello<\uff5cend\u2581of\u2581sentence\uff5c>",
 "<\uff5cUser\uff5c>hi<\uff5cAssistant\uff5c><think>\n</think>",
 "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
 "<tool_call>{\"a\":1}</tool_call> <think>x</think>",
 "<|start|>assistant<|channel|>final<|message|>Hi<|end|><|return|>",
 "<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
 "</s> <s> [PAD129279] <|endoftext|> <|reserved_200000|>",
 "<|constrain|>json<|call|>",
 "a" * 1000, " " * 500, "1" * 100, "ab" * 300, "antidisestablishmentarianism" * 20, "\n" * 50, " \n" * 40,
 "\U0001f600" * 30, "!" * 200,
]
for h in hard: cases.append(U(h))
raw = [
 b"\xff", b"a\xffb", b"\xc3", b"a\xc3", b"\xc3(", b"\xe2\x82", b"\xe2\x82\xac", b"\xed\xa0\x80", b"x\xed\xbf\xbfy",
 b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xf0\x80\x80\x80", b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff",
 b"\x00", b"a\x00b", b"\xe2\x82 \xac", b"\xf0\x9f\x98", b"\xf0\x9f\x98 x", b"<|endoftext\xff|>", b"\xc3<|endoftext|>\xa9",
 b"caf\xc3\xa9\xff caf\xe9", b"\xef\xbb\xbf", b"\xf4\x8f\xbf\xbf",
]
cases += raw
# random mixtures of hard pieces and random bytes (fixed seed)
import random
random.seed(7)
atoms = [b' ', b'  ', b'\t', b'\n', b'\r\n', b'\r', b'a', b'Z', b'e', b's', b't', b"'", b"'s", b"'LL", b'0', b'12', b'999',
 b'.', b',', b'!', b'?', b'$', b'+', b'<', b'>', b'|', b'^', b'~', b'`', b'/', b'(', b')', b'-', b'_', b'"',
 '\u00e9'.encode(), 'e\u0301'.encode(), '\u65e5\u672c'.encode(), '\u3042\u30a2'.encode(), '\u0660'.encode(), '\uff11'.encode(),
 '\u00a0'.encode(), '\u3000'.encode(), '\u2028'.encode(), '\u0085'.encode(), '\u180e'.encode(), '\U0001f600'.encode(), '\u200d'.encode(),
 '\U0002ebf0'.encode(), '\U0001fae8'.encode(), '\u0915\u094d'.encode(), 'Ω'.encode(), 'ß'.encode(), 'İ'.encode(), 'ǅ'.encode(),
 b'<|endoftext|>', b'<|bos|>', b'<|im_start|>', b'<|im_end|>', b'<think>', b'<|channel|>', b'<|end|>', '<\uff5cend\u2581of\u2581sentence\uff5c>'.encode(),
 b'\xff', b'\x80', b'\xc3', b'\xe6\x97', b'\xed\xa0\x80', b'\xc0\xaf', b'\xf0\x9f', b'\x00', b'\x7f', b'\x1f',
 b'hello', b' world', b'HTTP', b'camelCase', b'snake_case', b'x86_64', b'3.14', b'1e9']
def gen():
    n = random.randint(0, 40)
    return b''.join(random.choice(atoms) for _ in range(n))
fuzz = []
for i in range(200):
    s = gen()
    if random.random() < 0.2:
        s = bytes(random.getrandbits(8) for _ in range(random.randint(0, 30)))
    # drop what makes llama.cpp abort: 4-byte forms above U+10FFFF
    ok = True
    for j in range(len(s)):
        c = s[j]
        if 0xF0 <= c <= 0xF7 and j + 3 < len(s) and all((s[j+k] & 0xC0) == 0x80 for k in (1,2,3)):
            cp = ((c & 7) << 18) | ((s[j+1] & 63) << 12) | ((s[j+2] & 63) << 6) | (s[j+3] & 63)
            if cp > 0x10FFFF: ok = False
    if ok: fuzz.append(s)
cases += fuzz

with open(sys.argv[1], 'w', encoding='utf-8') as f:
    for c in cases: f.write(esc(c) + '\n')
print(len(cases), 'cases')
