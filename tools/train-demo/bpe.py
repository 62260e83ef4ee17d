"""Byte-level BPE in the GPT-2 style (bytes-to-unicode mapping, ranked merges).

Learns merges from a corpus and encodes text the way llama.cpp's "gpt2"
tokenizer does with the "qwen2" pre-tokenizer: the text is split by the
pre-tokenizer regex, each piece is mapped byte by byte to GPT-2's printable
characters, and the merges are applied lowest rank first.

Python's re module has no \\p{L} / \\p{N}, so the regex here is written for
ASCII text: learn() and encode() refuse anything else, which keeps the split
identical to the Unicode one for every text they accept.
"""
import collections
import re

# qwen2's pre-tokenizer (llama.cpp LLAMA_VOCAB_PRE_TYPE_QWEN2) with \p{L} =
# [A-Za-z] and \p{N} = [0-9], exact for ASCII input
PRETOK = re.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\nA-Za-z0-9]?[A-Za-z]+|[0-9]"
    r"| ?[^\sA-Za-z0-9]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable code point."""
    bs = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


B2U = bytes_to_unicode()


def _check_ascii(text):
    if not text.isascii():
        bad = next(c for c in text if ord(c) > 127)
        raise ValueError(f"non-ASCII character {bad!r}: this BPE handles ASCII text only")


def pieces(text):
    _check_ascii(text)
    return [m.group(0) for m in PRETOK.finditer(text)]


def _symbols(piece):
    return tuple(B2U[b] for b in piece.encode("ascii"))


def learn(text, n_merges):
    """Learns n_merges merges; returns them as (left, right) string pairs in rank order."""
    counts = collections.Counter(pieces(text))
    words = [list(_symbols(p)) for p in counts]
    freq = [counts[p] for p in counts]
    pair_count = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words holding it
    for i, w in enumerate(words):
        for a, b in zip(w, w[1:]):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)
    merges = []
    while len(merges) < n_merges and pair_count:
        # most frequent pair; ties go to the lexically smallest, for a stable result
        best = min(pair_count.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        if pair_count[best] < 2:
            break
        merges.append(best)
        a, b = best
        joined = a + b
        for i in list(where[best]):
            w = words[i]
            f = freq[i]
            for x, y in zip(w, w[1:]):  # remove this word's pairs
                pair_count[(x, y)] -= f
                if pair_count[(x, y)] <= 0:
                    del pair_count[(x, y)]
                where[(x, y)].discard(i)
            out = []
            j = 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == a and w[j + 1] == b:
                    out.append(joined)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for x, y in zip(out, out[1:]):
                pair_count[(x, y)] += f
                where[(x, y)].add(i)
        where.pop(best, None)
    return merges


class Tokenizer:
    """Tokens 0..255: the bytes (as GPT-2 characters, id = byte value); then one
    token per merge in rank order; then the special tokens."""

    def __init__(self, merges, specials):
        self.merges = merges
        self.rank = {m: r for r, m in enumerate(merges)}
        self.tokens = [B2U[b] for b in range(256)] + [a + b for a, b in merges]
        self.n_normal = len(self.tokens)
        self.tokens += specials
        self.id = {t: i for i, t in enumerate(self.tokens)}
        if len(self.id) != len(self.tokens):
            raise ValueError("duplicate token strings")
        self.cache = {}
        self.u2b = {u: b for b, u in B2U.items()}

    def _encode_piece(self, piece):
        ids = self.cache.get(piece)
        if ids is not None:
            return ids
        syms = list(_symbols(piece))
        while len(syms) > 1:
            best = None
            for k in range(len(syms) - 1):
                r = self.rank.get((syms[k], syms[k + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, k)
            if best is None:
                break
            k = best[1]
            syms[k:k + 2] = [syms[k] + syms[k + 1]]
        ids = [self.id[s] for s in syms]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        out = []
        for p in pieces(text):
            out.extend(self._encode_piece(p))
        return out

    def decode(self, ids):
        return bytes(self.u2b[c] for i in ids if i < self.n_normal
                     for c in self.tokens[i]).decode("utf-8", "replace")
