#!/usr/bin/env python3
"""Cuts a real vocabulary down to a small one with the same pre-tokenizer:
the 256 byte tokens, the first K merges (and the tokens they make), and every
non-NORMAL token (CONTROL, USER_DEFINED, UNUSED), in their original order.
Writes a tensor-less GGUF carrying the source's other metadata.

usage: mkmini.py SRC.gguf K OUT.gguf"""
import struct, sys

T_U8, T_I8, T_U16, T_I16, T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR, T_U64, T_I64, T_F64 = range(13)
FMT = {T_U8: '<B', T_I8: '<b', T_U16: '<H', T_I16: '<h', T_U32: '<I', T_I32: '<i', T_F32: '<f',
       T_BOOL: '<?', T_U64: '<Q', T_I64: '<q', T_F64: '<d'}

def read_gguf_kv(path):
    f = open(path, 'rb')
    data = f.read(64 << 20)
    off = 0
    def rd(fmt):
        nonlocal off
        v = struct.unpack_from(fmt, data, off); off += struct.calcsize(fmt); return v[0]
    def rstr():
        nonlocal off
        n = rd('<Q'); s = data[off:off + n]; off += n; return s
    def rval(t):
        if t == T_STR: return rstr()
        if t == T_ARR:
            et = rd('<I'); n = rd('<Q')
            return (et, [rval(et) for _ in range(n)])
        return rd(FMT[t])
    assert data[:4] == b'GGUF'; off = 4
    rd('<I'); rd('<Q'); nkv = rd('<Q')
    kv = []
    for _ in range(nkv):
        k = rstr().decode(); t = rd('<I'); kv.append((k, t, rval(t)))
    return kv

def write_gguf(path, kv):
    out = bytearray(b'GGUF') + struct.pack('<IQQ', 3, 0, len(kv))
    def wstr(s): out.extend(struct.pack('<Q', len(s))); out.extend(s)
    def wval(t, v):
        if t == T_STR: wstr(v)
        elif t == T_ARR:
            et, vals = v; out.extend(struct.pack('<IQ', et, len(vals)))
            for x in vals: wval(et, x)
        else: out.extend(struct.pack(FMT[t], v))
    for k, t, v in kv:
        wstr(k.encode()); out.extend(struct.pack('<I', t)); wval(t, v)
    while len(out) % 32: out.append(0)
    open(path, 'wb').write(out)

src, K, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3]
kv = read_gguf_kv(src)
d = {k: (t, v) for k, t, v in kv}
tokens = d['tokenizer.ggml.tokens'][1][1]
types = d['tokenizer.ggml.token_type'][1][1]
merges = d['tokenizer.ggml.merges'][1][1][:K]
keep_text = set()
tid = {t: i for i, t in enumerate(tokens)}
# the 256 byte tokens: single GPT-2 spelled characters
bs = list(range(0x21, 0x7f)) + list(range(0xa1, 0xad)) + list(range(0xae, 0x100))
cs = bs[:]; n = 0
for b in range(256):
    if b not in bs: bs.append(b); cs.append(256 + n); n += 1
for c in cs: keep_text.add(chr(c).encode())
for m in merges:
    a, b = m.split(b' ', 1)
    keep_text.update([a, b, a + b])
keep = [i for i, t in enumerate(tokens) if t in keep_text or types[i] != 1]
remap = {old: new for new, old in enumerate(keep)}
new_tokens = [tokens[i] for i in keep]
new_types = [types[i] for i in keep]
out = []
for k, t, v in kv:
    if k == 'tokenizer.ggml.tokens': v = (T_STR, new_tokens)
    elif k == 'tokenizer.ggml.token_type': v = (T_I32, new_types)
    elif k == 'tokenizer.ggml.merges': v = (T_STR, merges)
    elif k == 'tokenizer.chat_template': continue
    elif k.endswith('_token_id'):
        if v not in remap: print('dropping', k, v); continue
        v = remap[v]
    elif k.endswith('.vocab_size'): v = len(new_tokens)
    out.append((k, t, v))
write_gguf(dst, out)
print(dst, len(new_tokens), 'tokens', len(merges), 'merges')
