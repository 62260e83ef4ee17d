#!/usr/bin/python3
"""Trains moefleet's demo model: a small qwen3moe on the King James Bible.

    /usr/bin/python3 tools/train-demo/train.py --work /tmp/train-demo \
        --minutes 32 --out tests/data/demo-kjv.gguf

Steps (each cached in --work, so a rerun resumes at the first missing one):
  1. the corpus: every verse of the bible-kjv package, one per line, via its
     `bible` program; the last 5 % of the lines are held out;
  2. a byte-level BPE vocabulary learned on the training part (bpe.py);
  3. both parts tokenised;
  4. training for --minutes of wall-clock time (the learning rate follows the
     elapsed fraction of it), printing the loss every --log-every steps;
  5. held-out perplexity of the trained weights and of the weights as stored
     (MXFP4 experts, Q8_0 dense), and the GGUF file (gguf.py).

The forward pass is llama.cpp's qwen3moe (src/models/qwen3moe.cpp): RMSNorm,
per-head RMSNorm of q and k, NEOX RoPE, grouped-query causal attention,
softmax router over all experts, the top K renormalised, SwiGLU experts.
Embeddings are tied (no output.weight: llama.cpp and moefleet then use
token_embd).  Needs python3-torch and python3-numpy (Debian) and bible-kjv.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bpe  # noqa: E402
import gguf  # noqa: E402

EOT = "<|endoftext|>"


class Config:
    def __init__(self, **kw):
        self.n_vocab = 4096
        self.n_embd = 256
        self.n_layer = 4
        self.n_head = 4
        self.n_head_kv = 2
        self.head_dim = 64
        self.n_expert = 16
        self.n_expert_used = 4
        self.n_ff_exp = 128
        self.n_ctx = 256
        self.eps = 1e-6
        self.rope_base = 10000.0
        self.__dict__.update(kw)


# ------------------------------------------------------------------ corpus

def dump_corpus(path):
    """Every verse of the King James Bible, one per line, without references."""
    out = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], check=True, capture_output=True,
                         text=True).stdout
    lines = []
    ref = re.compile(r"^\s*(?:[1-3] ?)?[A-Za-z]+ ?\d+:\d+:?\s*")
    for raw in out.splitlines():
        if not raw.strip():
            continue
        if ref.match(raw):
            lines.append(ref.sub("", raw).strip())
        elif lines:  # a verse continued on the next line
            lines[-1] += " " + raw.strip()
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def load_data(work, n_vocab):
    os.makedirs(work, exist_ok=True)
    cpath = os.path.join(work, "kjv.txt")
    text = open(cpath).read() if os.path.exists(cpath) else dump_corpus(cpath)
    lines = text.splitlines(keepends=True)
    n_val = len(lines) // 20
    train_text, val_text = "".join(lines[:-n_val]), "".join(lines[-n_val:])
    print(f"corpus: {len(lines)} verses, {len(text)} bytes; held out: the last {n_val} verses "
          f"({len(val_text)} bytes)", flush=True)

    mpath = os.path.join(work, "merges.json")
    if os.path.exists(mpath):
        merges = [tuple(m) for m in json.load(open(mpath))]
    else:
        t0 = time.time()
        merges = bpe.learn(train_text, n_vocab - 256 - 1)
        json.dump(merges, open(mpath, "w"))
        print(f"bpe: {len(merges)} merges in {time.time() - t0:.0f} s", flush=True)
    tok = bpe.Tokenizer(merges, [EOT])

    tpath, vpath = os.path.join(work, "train.npy"), os.path.join(work, "val.npy")
    if os.path.exists(tpath) and os.path.exists(vpath):
        train, val = np.load(tpath), np.load(vpath)
    else:
        train = np.array(tok.encode(train_text), np.int32)
        val = np.array(tok.encode(val_text), np.int32)
        np.save(tpath, train)
        np.save(vpath, val)
    print(f"tokens: train {len(train)}, held out {len(val)}, vocabulary {len(tok.tokens)} "
          f"({len(train_text) / len(train):.2f} bytes per token)", flush=True)
    return tok, train, val


# ------------------------------------------------------------------ model

def rmsnorm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_neox(x, base):
    """x: (B, heads, T, D); pairs (i, i + D/2) rotated by pos * base^(-2i/D)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, D // 2, dtype=torch.float32) * 2.0 / D)
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., :D // 2], x[..., D // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Qwen3Moe(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        E, H, Hkv, D, X, Fe = c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_ff_exp
        P = torch.nn.Parameter
        std = 0.02
        out_std = std / math.sqrt(2 * c.n_layer)
        self.tok_embd = P(torch.randn(c.n_vocab, E) * std)
        self.output_norm = P(torch.ones(E))
        self.layers = torch.nn.ModuleList()
        for _ in range(c.n_layer):
            m = torch.nn.Module()
            m.attn_norm = P(torch.ones(E))
            m.wq = P(torch.randn(H * D, E) * std)
            m.wk = P(torch.randn(Hkv * D, E) * std)
            m.wv = P(torch.randn(Hkv * D, E) * std)
            m.q_norm = P(torch.ones(D))
            m.k_norm = P(torch.ones(D))
            m.wo = P(torch.randn(E, H * D) * out_std)
            m.ffn_norm = P(torch.ones(E))
            m.router = P(torch.randn(X, E) * std)
            m.gate = P(torch.randn(X, Fe, E) * std)
            m.up = P(torch.randn(X, Fe, E) * std)
            m.down = P(torch.randn(X, E, Fe) * out_std)
            self.layers.append(m)

    def moe(self, m, h):
        """h: (N, E) -> (N, E) output, the router probabilities and the chosen ids."""
        c = self.c
        probs = torch.softmax(h @ m.router.t(), dim=-1)
        w, ids = torch.topk(probs, c.n_expert_used, dim=-1)
        w = w / w.sum(-1, keepdim=True).clamp_min(6.103515625e-5)
        out = torch.zeros_like(h)
        flat_ids = ids.reshape(-1)
        flat_w = w.reshape(-1)
        rows = torch.arange(h.shape[0]).repeat_interleave(c.n_expert_used)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=c.n_expert).tolist()
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            sel = order[start:start + n]
            start += n
            r = rows[sel]
            x = h[r]
            y = (F.silu(x @ m.gate[e].t()) * (x @ m.up[e].t())) @ m.down[e].t()
            out.index_add_(0, r, y * flat_w[sel, None])
        return out, probs, ids

    def forward(self, tokens):
        """tokens: (B, T) -> logits (B, T, V) and the load-balancing loss."""
        c = self.c
        B, T = tokens.shape
        H, Hkv, D = c.n_head, c.n_head_kv, c.head_dim
        x = self.tok_embd[tokens]
        aux = 0.0
        for m in self.layers:
            h = rmsnorm(x, m.attn_norm, c.eps)
            q = (h @ m.wq.t()).view(B, T, H, D).transpose(1, 2)
            k = (h @ m.wk.t()).view(B, T, Hkv, D).transpose(1, 2)
            v = (h @ m.wv.t()).view(B, T, Hkv, D).transpose(1, 2)
            q = rope_neox(rmsnorm(q, m.q_norm, c.eps), c.rope_base)
            k = rope_neox(rmsnorm(k, m.k_norm, c.eps), c.rope_base)
            # query head j reads KV head j / (H / Hkv), as ggml broadcasts
            k = k.repeat_interleave(H // Hkv, dim=1)
            v = v.repeat_interleave(H // Hkv, dim=1)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
            a = torch.softmax(s, dim=-1) @ v
            x = x + a.transpose(1, 2).reshape(B, T, H * D) @ m.wo.t()
            h = rmsnorm(x, m.ffn_norm, c.eps).reshape(B * T, -1)
            y, probs, ids = self.moe(m, h)
            x = x + y.view(B, T, -1)
            # Switch-style balance loss: X * sum_e (share of assignments) * (mean probability)
            share = torch.bincount(ids.reshape(-1), minlength=c.n_expert).float() / ids.numel()
            aux = aux + c.n_expert * (share * probs.mean(0)).sum()
        x = rmsnorm(x, self.output_norm, c.eps)
        return x @ self.tok_embd.t(), aux / c.n_layer


# ------------------------------------------------------------------ training

def batches(data, B, T, gen):
    while True:
        starts = torch.randint(0, len(data) - T - 1, (B,), generator=gen)
        idx = starts[:, None] + torch.arange(T + 1)[None, :]
        chunk = torch.from_numpy(data)[idx].long()
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def heldout_loss(model, val, T, limit=None):
    """Mean next-token loss over the held-out tokens in windows of T (or the first limit)."""
    model.eval()
    n = (len(val) - 1) // T
    if limit:
        n = min(n, limit)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = range(i, min(n, i + 8))
        x = torch.stack([torch.from_numpy(val[r * T:r * T + T]).long() for r in rows])
        y = torch.stack([torch.from_numpy(val[r * T + 1:r * T + T + 1]).long() for r in rows])
        logits, _ = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def train(model, train_data, val, a, log):
    c = model.c
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(a.seed)
    budget = a.minutes * 60.0
    t0 = time.time()
    step, run_loss, run_n = 0, 0.0, 0
    for x, y in batches(train_data, a.batch, c.n_ctx, gen):
        frac = (time.time() - t0) / budget
        if frac >= 1.0:
            break
        warm = min(1.0, (step + 1) / a.warmup)
        lr = a.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits, aux = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        (loss + a.aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        run_loss += loss.item()
        run_n += 1
        if step % a.log_every == 0:
            vl = heldout_loss(model, val, c.n_ctx, limit=32)
            row = {"step": step, "minutes": round((time.time() - t0) / 60, 2),
                   "tokens": step * a.batch * c.n_ctx, "lr": lr,
                   "train_loss": round(run_loss / run_n, 4), "heldout_loss": round(vl, 4),
                   "balance": round(float(aux), 4)}
            print(json.dumps(row), flush=True)
            log.append(row)
            run_loss, run_n = 0.0, 0
    return step, time.time() - t0


# ------------------------------------------------------------------ export

def stored_weights(model):
    """A copy of the model with the weights as the GGUF stores them."""
    import copy
    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.layers:
            for name in ("gate", "up", "down"):
                p = getattr(m, name)
                p.copy_(torch.from_numpy(gguf.dequant_mxfp4(p.detach().numpy())))
        for p, _ in dense_tensors(q):
            blob = np.frombuffer(gguf.quant_q8_0(p.detach().numpy()), np.uint8)
            blob = blob.reshape(-1, 34)
            d = blob[:, :2].copy().view(np.float16).astype(np.float32)
            v = blob[:, 2:].view(np.int8).astype(np.float32) * d
            p.copy_(torch.from_numpy(v.reshape(p.shape)))
    return q


def dense_tensors(model):
    out = [(model.tok_embd, "token_embd.weight")]
    for i, m in enumerate(model.layers):
        b = f"blk.{i}."
        out += [(m.wq, b + "attn_q.weight"), (m.wk, b + "attn_k.weight"),
                (m.wv, b + "attn_v.weight"), (m.wo, b + "attn_output.weight")]
    return out


def export(model, tok, path):
    c = model.c
    A = "qwen3moe."
    types = [1] * tok.n_normal + [3] * (len(tok.tokens) - tok.n_normal)
    eot = tok.id[EOT]
    kvs = [
        ("general.architecture", "str", "qwen3moe"),
        ("general.type", "str", "model"),
        ("general.name", "str", "moefleet-demo-kjv"),
        ("general.file_type", "u32", 38),  # LLAMA_FTYPE_MOSTLY_MXFP4_MOE
        ("general.quantization_version", "u32", 2),
        (A + "vocab_size", "u32", len(tok.tokens)),
        (A + "context_length", "u32", c.n_ctx),
        (A + "embedding_length", "u32", c.n_embd),
        (A + "block_count", "u32", c.n_layer),
        (A + "feed_forward_length", "u32", c.n_ff_exp * c.n_expert_used),
        (A + "attention.head_count", "u32", c.n_head),
        (A + "attention.head_count_kv", "u32", c.n_head_kv),
        (A + "attention.key_length", "u32", c.head_dim),
        (A + "attention.value_length", "u32", c.head_dim),
        (A + "attention.layer_norm_rms_epsilon", "f32", c.eps),
        (A + "rope.freq_base", "f32", c.rope_base),
        (A + "expert_count", "u32", c.n_expert),
        (A + "expert_used_count", "u32", c.n_expert_used),
        (A + "expert_feed_forward_length", "u32", c.n_ff_exp),
        ("tokenizer.ggml.model", "str", "gpt2"),
        ("tokenizer.ggml.pre", "str", "qwen2"),
        ("tokenizer.ggml.tokens", "arr_str", tok.tokens),
        ("tokenizer.ggml.token_type", "arr_i32", types),
        ("tokenizer.ggml.merges", "arr_str", [a + " " + b for a, b in tok.merges]),
        ("tokenizer.ggml.bos_token_id", "u32", eot),
        ("tokenizer.ggml.eos_token_id", "u32", eot),
        ("tokenizer.ggml.add_bos_token", "bool", False),
        ("tokenizer.ggml.add_eos_token", "bool", False),
    ]
    npy = lambda p: p.detach().float().numpy()  # noqa: E731
    tensors = [("token_embd.weight", npy(model.tok_embd), gguf.Q8_0),
               ("output_norm.weight", npy(model.output_norm), gguf.F32)]
    for i, m in enumerate(model.layers):
        b = f"blk.{i}."
        tensors += [
            (b + "attn_norm.weight", npy(m.attn_norm), gguf.F32),
            (b + "attn_q.weight", npy(m.wq), gguf.Q8_0),
            (b + "attn_k.weight", npy(m.wk), gguf.Q8_0),
            (b + "attn_v.weight", npy(m.wv), gguf.Q8_0),
            (b + "attn_output.weight", npy(m.wo), gguf.Q8_0),
            (b + "attn_q_norm.weight", npy(m.q_norm), gguf.F32),
            (b + "attn_k_norm.weight", npy(m.k_norm), gguf.F32),
            (b + "ffn_norm.weight", npy(m.ffn_norm), gguf.F32),
            (b + "ffn_gate_inp.weight", npy(m.router), gguf.F32),
            (b + "ffn_gate_exps.weight", npy(m.gate), gguf.MXFP4),
            (b + "ffn_up_exps.weight", npy(m.up), gguf.MXFP4),
            (b + "ffn_down_exps.weight", npy(m.down), gguf.MXFP4),
        ]
    return gguf.write(path, kvs, tensors)


@torch.no_grad()
def sample(model, tok, prompt, n, seed=1):
    model.eval()
    ids = tok.encode(prompt)
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        logits, _ = model(torch.tensor([ids[-model.c.n_ctx:]]))
        p = torch.softmax(logits[0, -1] / 0.8, -1)
        ids.append(int(torch.multinomial(p, 1, generator=g)))
    model.train()
    return tok.decode(ids)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="cache directory (corpus, tokens, checkpoint)")
    ap.add_argument("--out", help="the GGUF file to write (required unless --logits)")
    ap.add_argument("--minutes", type=float, default=32.0, help="training time budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--aux", type=float, default=0.01, help="load-balancing loss weight")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--export-only", action="store_true", help="export the saved checkpoint")
    ap.add_argument("--logits", nargs=2, metavar=("IDS", "OUT"),
                    help="write the saved checkpoint's logits (weights as stored) for the "
                         "comma-separated token ids in file IDS to OUT (float32 rows), and exit")
    a = ap.parse_args()
    if not a.out and not a.logits:
        ap.error("--out is required")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    c = Config()
    tok, train_data, val = load_data(a.work, c.n_vocab)
    c.n_vocab = len(tok.tokens)
    model = Qwen3Moe(c)
    n_params = sum(p.numel() for p in model.parameters())
    n_active = n_params - c.n_layer * 3 * c.n_embd * c.n_ff_exp * (c.n_expert - c.n_expert_used)
    print(f"model: {n_params / 1e6:.2f} M parameters, {n_active / 1e6:.2f} M active per token",
          flush=True)
    ckpt = os.path.join(a.work, "model.pt")
    log = []
    if a.logits:
        model.load_state_dict(torch.load(ckpt))
        ids = [int(t) for t in open(a.logits[0]).read().replace(",", " ").split()]
        with torch.no_grad():
            logits, _ = stored_weights(model)(torch.tensor([ids]))
        logits[0].numpy().astype("<f4").tofile(a.logits[1])
        return
    if a.export_only:
        model.load_state_dict(torch.load(ckpt))
        log = json.load(open(os.path.join(a.work, "log.json")))["log"]
    else:
        steps, secs = train(model, train_data, val, a, log)
        torch.save(model.state_dict(), ckpt)
        json.dump({"log": log, "steps": steps, "seconds": secs,
                   "tokens": steps * a.batch * c.n_ctx},
                  open(os.path.join(a.work, "log.json"), "w"), indent=1)
        print(f"trained {steps} steps ({steps * a.batch * c.n_ctx} tokens) in "
              f"{secs / 60:.1f} min", flush=True)
    vl = heldout_loss(model, val, c.n_ctx)
    ql = heldout_loss(stored_weights(model), val, c.n_ctx)
    print(f"held-out loss {vl:.4f} (perplexity {math.exp(vl):.2f}); as stored (MXFP4 experts, "
          f"Q8_0 dense): {ql:.4f} (perplexity {math.exp(ql):.2f})", flush=True)
    size = export(model, tok, a.out)
    print(f"wrote {a.out}: {size} bytes", flush=True)
    print("sample: " + sample(model, tok, "And God said", 40), flush=True)


if __name__ == "__main__":
    main()
