#!/usr/bin/python3
"""Held-out perplexity of a GGUF model as moefleet computes it.

    /usr/bin/python3 tools/train-demo/perplexity.py --model tests/data/demo-kjv.gguf \
        --ids /tmp/train-demo/val.npy [--windows 48] [-- --routing topp:0.7 ...]

Cuts the held-out token ids (train.py writes them as val.npy) into windows of
--ctx tokens, runs `moefleet logits` on each (one batch; arguments after --
are passed on), and prints the mean next-token loss, its perplexity and, when
moefleet reports it (--routing topp, --stats), the mean routed experts per
token.  The last position of a window predicts the next window's first token,
as train.py's held-out loss does.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="held-out token ids (.npy)")
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--moefleet", default="./moefleet")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("extra", nargs="*", help="more moefleet options (after --)")
    a = ap.parse_args()
    ids = np.load(a.ids).astype(np.int64)
    T = a.ctx
    n = min(a.windows, (len(ids) - 1) // T)
    if n < 1:
        sys.exit("perplexity: fewer held-out tokens than one window")
    total, count, experts = 0.0, 0, []
    with tempfile.TemporaryDirectory() as tmp:
        tok_path, out_path = os.path.join(tmp, "ids.txt"), os.path.join(tmp, "l.f32")
        for w in range(n):
            x = ids[w * T:w * T + T]
            y = ids[w * T + 1:w * T + T + 1]
            with open(tok_path, "w") as f:
                f.write(",".join(map(str, x)))
            r = subprocess.run([a.moefleet, "logits", "-m", a.model, "--tokens", "@" + tok_path,
                                "--out", out_path, "--threads", str(a.threads)] + a.extra,
                               capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"perplexity: moefleet logits failed:\n{r.stderr}")
            m = re.search(r"^routing: all layers: ([0-9.]+) experts per token", r.stderr, re.M)
            if m:
                experts.append(float(m.group(1)))
            lg = np.fromfile(out_path, np.float32).astype(np.float64)
            if lg.size % T:
                sys.exit(f"perplexity: {lg.size} logits are not {T} rows")
            lg = lg.reshape(T, -1)
            mx = lg.max(axis=1)
            lse = mx + np.log(np.exp(lg - mx[:, None]).sum(axis=1))
            total += float((lse - lg[np.arange(T), y]).sum())
            count += T
    loss = total / count
    ex = f", {np.mean(experts):.3f} experts per token" if experts else ""
    print(f"{count} tokens in {n} windows of {T}: loss {loss:.4f}, perplexity {np.exp(loss):.3f}{ex}")


if __name__ == "__main__":
    main()
