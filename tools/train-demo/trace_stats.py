#!/usr/bin/python3
"""Expert load skew and co-activation in a moefleet routing trace.

    /usr/bin/python3 tools/train-demo/trace_stats.py run.trace... [--workers 2]

Reads --trace-routing files (length-prefixed TraceRecord messages,
proto/moefleet.proto; several runs of one model pool their tokens) and prints, per MoE layer, the expert load skew
(busiest / mean, idlest / mean, coefficient of variation, normalised entropy)
and the co-activation within the layer (pairs of experts chosen for the same
token, against independence); across layers, how well a token's experts at
layer L predict its experts at layer L + 1.  Then it compares, for --workers
W, the workers a token's experts reach per layer (the messages it costs)
under the trace's placement and under a placement that groups co-activated
experts, fitted on the first half of the tokens and measured on the second.
"""
import argparse
import collections
import itertools
import math
import struct
import sys

import numpy as np


def varint(b, i):
    v = s = 0
    while True:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << s
        s += 7
        if c < 0x80:
            return v, i


def zigzag(v):
    return (v >> 1) ^ -(v & 1)


def parse_record(b):
    """The fields of one TraceRecord as {field: value or list}."""
    out = collections.defaultdict(list)
    i = 0
    while i < len(b):
        key, i = varint(b, i)
        f, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(b, i)
            out[f].append(v)
        elif wt == 5:
            out[f].append(struct.unpack_from("<f", b, i)[0])
            i += 4
        elif wt == 1:
            out[f].append(struct.unpack_from("<Q", b, i)[0])
            i += 8
        elif wt == 2:
            n, i = varint(b, i)
            chunk = b[i:i + n]
            i += n
            if f == 7:  # packed floats
                out[f].extend(struct.unpack(f"<{n // 4}f", chunk))
            else:  # packed varints
                j = 0
                while j < len(chunk):
                    v, j = varint(chunk, j)
                    out[f].append(v)
        else:
            raise ValueError(f"wire type {wt} in a trace record")
    for f in (6, 8, 13):  # sint32
        out[f] = [zigzag(v) for v in out[f]]
    return out


def read_trace(path):
    data = open(path, "rb").read()
    i, recs = 0, []
    while i < len(data):
        if i + 4 > len(data):
            raise ValueError(f"{path}: truncated length at byte {i}")
        (n,) = struct.unpack_from("<I", data, i)
        i += 4
        if i + n > len(data):
            raise ValueError(f"{path}: truncated record at byte {i}")
        recs.append(parse_record(data[i:i + n]))
        i += n
    return recs


def tokens_by_layer(recs, run, toks):
    """Adds run's tokens to toks, {(run, step, row): {layer: tuple of expert ids}};
    returns the expert table and the placement."""
    head = recs[0]
    n_layer, n_expert = head[9][0], head[10][0]
    n_rep = head[12][0] if head[12] else 0
    holders = np.array(head[13]).reshape(n_layer, n_expert, n_rep) if n_rep else None
    for r in recs:
        rows, k = r[4][0] if r[4] else 0, r[5][0] if r[5] else 0
        ids = r[6]
        step, layer = r[2][0] if r[2] else 0, r[3][0] if r[3] else 0
        for row in range(rows):
            sel = tuple(e for e in ids[row * k:(row + 1) * k] if e >= 0)
            toks[(run, step, row)][layer] = sel
    return n_layer, n_expert, holders


def skew(load):
    m = load.mean()
    p = load / load.sum()
    ent = -(p[p > 0] * np.log(p[p > 0])).sum() / math.log(len(load))
    return load.max() / m, load.min() / m, load.std() / m, ent


def mutual_info(pairs):
    """Mutual information in bits of the empirical joint distribution of pairs."""
    n = len(pairs)
    joint = collections.Counter(pairs)
    pa = collections.Counter(x for x, _ in pairs)
    pb = collections.Counter(y for _, y in pairs)
    return sum(c / n * math.log2(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())


def workers_per_token(tokens, layer, place):
    """Mean number of distinct workers holding a token's experts at this layer."""
    n = [len({place[e] for e in t[layer]}) for t in tokens if t.get(layer)]
    return float(np.mean(n)) if n else 0.0


def coactivation_placement(tokens, layer, n_expert, W):
    """Experts in W equal groups, each expert (busiest first) joining the group
    with room that it was chosen together with most often (ties: lightest group)."""
    co = np.zeros((n_expert, n_expert))
    load = np.zeros(n_expert)
    for t in tokens:
        sel = t.get(layer, ())
        for e in sel:
            load[e] += 1
        for a, b in itertools.combinations(sel, 2):
            co[a, b] += 1
            co[b, a] += 1
    cap = math.ceil(n_expert / W)
    groups = [[] for _ in range(W)]
    gload = [0.0] * W
    for e in np.argsort(-load, kind="stable"):
        best = max((g for g in range(W) if len(groups[g]) < cap),
                   key=lambda g: (sum(co[e, x] for x in groups[g]), -gload[g]))
        groups[best].append(e)
        gload[best] += load[e]
    place = {}
    for g, members in enumerate(groups):
        for e in members:
            place[e] = g
    return place


def worker_balance(tokens, layer, place, W):
    load = np.zeros(W)
    for t in tokens:
        for e in t.get(layer, ()):
            load[place[e]] += 1
    return load.max() / load.mean() if load.sum() else 0.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", nargs="+")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    toks = collections.defaultdict(dict)
    shapes = set()
    for run, path in enumerate(a.trace):
        try:
            recs = read_trace(path)
        except (OSError, ValueError, IndexError, struct.error) as e:
            sys.exit(f"trace_stats: {path}: {e}")
        if not recs or not recs[0][9] or not recs[0][10]:
            sys.exit(f"trace_stats: {path}: no expert table in the first record")
        n_layer, n_expert, h = tokens_by_layer(recs, run, toks)
        holders = h if run == 0 else holders
        shapes.add((n_layer, n_expert))
    if len(shapes) > 1:
        sys.exit("trace_stats: the traces are of different models")
    tokens = [toks[k] for k in sorted(toks)]
    layers = sorted({L for t in tokens for L in t})
    k = max(len(s) for t in tokens for s in t.values())
    print(f"{len(tokens)} tokens, {len(layers)} MoE layers, {n_expert} experts, up to {k} per token")

    print("\n| layer | busiest / mean | idlest / mean | CV | entropy | top pair lift | pairs > 2x independent |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for L in layers:
        load = np.zeros(n_expert)
        co = collections.Counter()
        n = 0
        for t in tokens:
            sel = t.get(L)
            if not sel:
                continue
            n += 1
            for e in sel:
                load[e] += 1
            for p in itertools.combinations(sorted(sel), 2):
                co[p] += 1
        p1 = load / n
        lifts = {p: c / (n * p1[p[0]] * p1[p[1]]) for p, c in co.items() if c >= 5}
        top = max(lifts.values()) if lifts else float("nan")
        many = sum(1 for v in lifts.values() if v > 2)
        mx, mn, cv, ent = skew(load)
        print(f"| {L} | {mx:.2f} | {mn:.2f} | {cv:.2f} | {ent:.3f} | {top:.2f} | "
              f"{many} of {n_expert * (n_expert - 1) // 2} |")

    half = len(tokens) // 2
    fit, test = tokens[:half], tokens[half:]
    print("\n| layers | top-1 at L+1 predicted from top-1 at L | predicted as the most "
          "frequent | mutual information of the top-1s (bits) | same, shuffled tokens |")
    print("| --- | --- | --- | --- | --- |")
    rng = np.random.default_rng(1)
    for L, M in zip(layers, layers[1:]):
        pairs = [(t[L][0], t[M][0]) for t in tokens if t.get(L) and t.get(M)]
        fitp = [(t[L][0], t[M][0]) for t in fit if t.get(L) and t.get(M)]
        testp = [(t[L][0], t[M][0]) for t in test if t.get(L) and t.get(M)]
        joint = collections.Counter(fitp)
        best = {}
        for (x, y), c in joint.items():
            if c > best.get(x, (0, None))[0]:
                best[x] = (c, y)
        common = collections.Counter(y for _, y in fitp).most_common(1)[0][0]
        hit = np.mean([best.get(x, (0, common))[1] == y for x, y in testp])
        base = np.mean([y == common for _, y in testp])
        ys = [y for _, y in pairs]
        shuffled = list(zip([x for x, _ in pairs], rng.permutation(ys)))
        print(f"| {L} -> {M} | {hit:.3f} | {base:.3f} | {mutual_info(pairs):.3f} | "
              f"{mutual_info(shuffled):.3f} |")

    W = a.workers
    print(f"\nworkers per token and layer ({W} workers; co-activation placement fitted on the "
          f"first {half} tokens, measured on the other {len(tokens) - half}):\n")
    traced_ok = holders is not None and holders[:, :, 0].max() + 1 == W
    first = "trace placement" if traced_ok else "round robin"
    print(f"| layer | {first} | balance | co-activation placement | balance | "
          "contiguous blocks | balance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    tot = np.zeros(3)
    for L in layers:
        if traced_ok and (holders[L, :, 0] >= 0).all():
            traced = {e: int(holders[L, e, 0]) for e in range(n_expert)}
        else:
            traced = {e: e % W for e in range(n_expert)}
        blocks = {e: e * W // n_expert for e in range(n_expert)}
        coact = coactivation_placement(fit, L, n_expert, W)
        row = []
        for i, pl in enumerate((traced, coact, blocks)):
            wpt = workers_per_token(test, L, pl)
            tot[i] += wpt
            row += [f"{wpt:.3f}", f"{worker_balance(test, L, pl, W):.3f}"]
        print(f"| {L} | " + " | ".join(row) + " |")
    t = tot / len(layers)
    print(f"| mean | {t[0]:.3f} | | {t[1]:.3f} | | {t[2]:.3f} | |")


if __name__ == "__main__":
    main()
