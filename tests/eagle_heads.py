"""Tiny random EAGLE and EAGLE3 draft heads in the HF layout, a numpy reference of what a
head proposes (written from the papers' description, not from engine code), targets
built for the tests' needs, and a count of the overlap schedule's carried rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HEAD = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=1024, model_type="llama", torch_dtype="float32")


def _normal(rng, *shape, scale=0.15):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _layer(rng, prefix: str, d_in: int, norms: tuple[str, ...]) -> dict[str, np.ndarray]:
    H, I = HEAD["hidden_size"], HEAD["intermediate_size"]
    q, kv = HEAD["num_attention_heads"] * HEAD["head_dim"], HEAD["num_key_value_heads"] * HEAD["head_dim"]
    w = {f"{prefix}self_attn.q_proj.weight": _normal(rng, q, d_in),
         f"{prefix}self_attn.k_proj.weight": _normal(rng, kv, d_in),
         f"{prefix}self_attn.v_proj.weight": _normal(rng, kv, d_in),
         f"{prefix}self_attn.o_proj.weight": _normal(rng, H, q),
         f"{prefix}mlp.gate_proj.weight": _normal(rng, I, H),
         f"{prefix}mlp.up_proj.weight": _normal(rng, I, H),
         f"{prefix}mlp.down_proj.weight": _normal(rng, H, I)}
    for norm in norms:
        w[f"{prefix}{norm}.weight"] = (1 + _normal(rng, H, scale=0.1)).astype(np.float32)
    return w


def build_eagle3_head(out: Path, target_dir: Path, seed: int = 0, draft_vocab: int = 512,
                      aux_layer_ids: list[int] | None = None,
                      constant: int | list[int] | None = None) -> Path:
    """An EAGLE3 head for the target at ``target_dir``. ``constant``: a head whose final
    norm is zero, so it always proposes draft id 0, mapped by d2t to target id ``constant``
    (a list: draft ids 0, 1, ... to those, its top-k in that order, all equally likely)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    target = json.loads((target_dir / "config.json").read_text())
    H, V = HEAD["hidden_size"], target["vocab_size"]
    assert target["hidden_size"] == H
    cfg = dict(HEAD, architectures=["LlamaForCausalLMEagle3"], num_hidden_layers=1,
               vocab_size=V, draft_vocab_size=draft_vocab, tie_word_embeddings=False)
    if aux_layer_ids is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layer_ids}
    w = _layer(rng, "midlayer.", 2 * H, ("input_layernorm", "hidden_norm",
                                         "post_attention_layernorm"))
    hot = np.sort(rng.choice(np.arange(1, V), size=draft_vocab, replace=False))
    if constant is not None:
        fixed = [constant] if isinstance(constant, int) else list(constant)
        rest = [t for t in hot.tolist() if t not in fixed]
        hot = np.asarray(fixed + rest[:draft_vocab - len(fixed)])
    w.update({"fc.weight": _normal(rng, H, 3 * H), "lm_head.weight": _normal(rng, draft_vocab, H),
              "norm.weight": (np.zeros(H) if constant is not None else 1 + _normal(rng, H, scale=0.1)).astype(np.float32),
              "d2t": (hot - np.arange(draft_vocab)).astype(np.int64),
              "t2d": np.isin(np.arange(V), hot)})
    return _save(out, cfg, w, save_file)


def build_eagle_head(out: Path, target_dir: Path, seed: int = 0, num_layers: int = 2,
                     with_embed: bool = False) -> Path:
    """An EAGLE head (fc with bias, ``num_layers`` layers, the first without input norm)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    target = json.loads((target_dir / "config.json").read_text())
    H = HEAD["hidden_size"]
    cfg = dict(HEAD, architectures=["LlamaForCausalLM"], num_hidden_layers=num_layers,
               vocab_size=target["vocab_size"], tie_word_embeddings=False)
    w = {"fc.weight": _normal(rng, H, 2 * H), "fc.bias": _normal(rng, H)}
    for i in range(num_layers):
        norms = ("post_attention_layernorm",) if i == 0 else ("input_layernorm",
                                                               "post_attention_layernorm")
        w.update(_layer(rng, f"layers.{i}.", H, norms))
    if with_embed:
        w["embed_tokens.weight"] = _normal(rng, target["vocab_size"], H, scale=0.5)
    return _save(out, cfg, w, save_file)


def build_copying_target(out: Path, embed_scale: float = 2.0) -> Path:
    """A tiny Llama (tied embeddings) whose embeddings outweigh its layers: greedy, it
    mostly repeats its last token, and now and then does not."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models import build_tiny_model

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model("llama", out),
                                                 dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_scale)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_copying_head(out: Path, target_dir: Path, seed: int = 0) -> Path:
    """An EAGLE head that passes the token's embedding through (fc = [I, 0], near-zero
    layers): over a tied-embedding target it drafts the token it is fed, again and again
    (``build_copying_target`` keeps most of them)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    target = json.loads((target_dir / "config.json").read_text())
    H = HEAD["hidden_size"]
    cfg = dict(HEAD, architectures=["LlamaForCausalLM"], num_hidden_layers=1,
               vocab_size=target["vocab_size"], tie_word_embeddings=False)
    fc = np.concatenate([np.eye(H), np.zeros((H, H))], axis=1).astype(np.float32)
    w = {"fc.weight": fc, "fc.bias": np.zeros(H, np.float32)}
    w.update({k: v * 0.01 if v.ndim == 2 else v for k, v in
              _layer(rng, "layers.0.", H, ("post_attention_layernorm",)).items()})
    return _save(out, cfg, w, save_file)


def _save(out: Path, cfg: dict, w: dict, save_file) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(out / "model.safetensors"))
    return out


# -- the reference ------------------------------------------------------------------------
def target_features(target_dir: Path, ids: list[int], capture: tuple[int, ...]) -> np.ndarray:
    """(N, F) float64: the target's features of ``ids`` (transformers, float32): the final
    normed hidden state for ``capture == ()``, else the inputs of those layers (L: the
    last layer's output, before the final norm)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _cached_model(target_dir, AutoModelForCausalLM, torch)
    inner = model.model
    seen: dict[int, torch.Tensor] = {}
    hooks = []
    for i in capture:
        module = inner.layers[i] if i < len(inner.layers) else inner.norm

        def keep(module, args, kwargs, i=i):
            seen[i] = args[0] if args else kwargs["hidden_states"]

        hooks.append(module.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            last = inner(torch.tensor([ids])).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    parts = [seen[i][0] for i in capture] if capture else [last[0]]
    return torch.cat(parts, dim=-1).double().numpy()


_MODELS: dict = {}


def _cached_model(path, cls, torch):
    key = str(path)
    if key not in _MODELS:
        _MODELS[key] = cls.from_pretrained(path, dtype=torch.float32).eval()
    return _MODELS[key]


def _rms(x, w, eps=HEAD["rms_norm_eps"]):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos):
    hd = x.shape[-1]
    inv = 1.0 / (HEAD["rope_theta"] ** (np.arange(0, hd, 2) / hd))
    ang = pos * inv
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)
    return x * cos + rot * sin


class HeadReference:
    """A head run token by token over one sequence, in float64."""

    def __init__(self, head_dir: Path, target_dir: Path, kind: str):
        from safetensors.numpy import load_file
        self.w = {k: v.astype(np.float64) if v.dtype.kind == "f" else v
                  for k, v in load_file(str(head_dir / "model.safetensors")).items()}
        self.kind = kind
        cfg = json.loads((head_dir / "config.json").read_text())
        self.layers = 1 if kind == "EAGLE3" else cfg["num_hidden_layers"]
        tw = load_file(str(next(target_dir.glob("*.safetensors"))))
        tcfg = json.loads((target_dir / "config.json").read_text())
        embed = tw.get("model.embed_tokens.weight")
        self.embed = (self.w["embed_tokens.weight"] if "embed_tokens.weight" in self.w
                      else embed.astype(np.float64))
        self.head = (embed if tcfg.get("tie_word_embeddings") else tw["lm_head.weight"]).astype(np.float64)
        self.cache = [([], []) for _ in range(self.layers)]

    def _attend(self, p, layer, x, pos):
        w, nh, kvh, hd = self.w, HEAD["num_attention_heads"], HEAD["num_key_value_heads"], HEAD["head_dim"]
        q = _rope((w[p + "self_attn.q_proj.weight"] @ x).reshape(nh, hd), pos)
        k = _rope((w[p + "self_attn.k_proj.weight"] @ x).reshape(kvh, hd), pos)
        v = (w[p + "self_attn.v_proj.weight"] @ x).reshape(kvh, hd)
        ks, vs = self.cache[layer]
        ks.append(k)
        vs.append(v)
        K, Vv = np.stack(ks), np.stack(vs)  # (n, kvh, hd)
        out = np.zeros((nh, hd))
        for h in range(nh):
            g = h // (nh // kvh)
            s = K[:, g] @ q[h] / np.sqrt(hd)
            a = np.exp(s - s.max())
            out[h] = (a / a.sum()) @ Vv[:, g]
        return w[p + "self_attn.o_proj.weight"] @ out.reshape(-1)

    def _mlp(self, p, h):
        w = self.w
        x = _rms(h, w[p + "post_attention_layernorm.weight"])
        g, u = w[p + "mlp.gate_proj.weight"] @ x, w[p + "mlp.up_proj.weight"] @ x
        return h + w[p + "mlp.down_proj.weight"] @ (g / (1 + np.exp(-g)) * u)

    def row(self, token: int, hidden: np.ndarray, pos: int, project: bool):
        """One row: (the head's output h, its logits over the target's vocabulary ids)."""
        w, e = self.w, self.embed[token]
        if self.kind == "EAGLE3":
            hid = w["fc.weight"] @ hidden if project else hidden
            x = np.concatenate([_rms(e, w["midlayer.input_layernorm.weight"]),
                                _rms(hid, w["midlayer.hidden_norm.weight"])])
            h = self._mlp("midlayer.", hid + self._attend("midlayer.", 0, x, pos))
            logits = w["lm_head.weight"] @ _rms(h, w["norm.weight"])
            full = np.full(self.head.shape[0], -np.inf)
            full[np.arange(len(logits)) + w["d2t"]] = logits
            return h, full
        h = w["fc.weight"] @ np.concatenate([e, hidden]) + w["fc.bias"]
        for i in range(self.layers):
            p = f"layers.{i}."
            x = h if i == 0 else _rms(h, w[p + "input_layernorm.weight"])
            h = self._mlp(p, h + self._attend(p, i, x, pos))
        return h, self.head @ h


def reference_drafts(head_dir: Path, target_dir: Path, kind: str, ids: list[int], k: int,
                     capture: tuple[int, ...]) -> tuple[list[int], list[np.ndarray]]:
    """The k drafts a head proposes once the target has emitted ``ids[-1]``: the head over
    every earlier row (the token after it, the target's features), then k - 1 passes of
    its own. Returns (drafts, the logits each was the argmax of)."""
    feats = target_features(target_dir, ids[:-1], capture)
    ref = HeadReference(head_dir, target_dir, kind)
    for r in range(len(ids) - 1):
        h, logits = ref.row(ids[r + 1], feats[r], r, project=True)
    drafts, all_logits = [int(np.argmax(logits))], [logits]
    for i in range(1, k):
        h, logits = ref.row(drafts[-1], h, len(ids) - 2 + i, project=False)
        drafts.append(int(np.argmax(logits)))
        all_logits.append(logits)
    return drafts, all_logits


# -- a target small enough for exact marginals -------------------------------------------
SMALL_PROMPT, SMALL_VOCAB = [5, 9, 11, 3, 20], 48


def small_target_marginals(out: Path, temperature: float):
    """A 48-token Llama target and the exact marginals (transformers, float64) of its 2nd
    and 3rd sampled tokens after SMALL_PROMPT: (target dir, p2, p3)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny_models import build_tiny_model

    target = build_tiny_model("llama", out, vocab_size=SMALL_VOCAB, bos_token_id=1,
                              eos_token_id=2, initializer_range=0.5)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    prompt, V = SMALL_PROMPT, SMALL_VOCAB

    def next_probs(seqs):
        with torch.no_grad():
            logits = model(torch.tensor(seqs)).logits[:, -1].double() / temperature
        return torch.softmax(logits, -1).numpy()

    p1 = next_probs([prompt])[0]
    joint12 = p1[:, None] * next_probs([prompt + [a] for a in range(V)])  # (x1, x2)
    p3_given = next_probs([prompt + [a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return target, joint12.sum(0), (joint12[:, :, None] * p3_given).sum((0, 1))


def assert_follows_marginals(outs, p2, p3) -> None:
    """Chi-square: each output's 2nd and 3rd tokens against p2 and p3 (cells expected
    under 5 times pooled)."""
    from scipy import stats

    n = len(outs)
    for pos, probs in ((1, p2), (2, p3)):
        counts = np.bincount([o["token_ids"][pos] for o in outs], minlength=len(probs))
        big = probs * n >= 5
        obs = np.append(counts[big], counts[~big].sum())
        exp = np.append(probs[big], probs[~big].sum()) * n
        assert stats.chisquare(obs, exp).pvalue > 1e-3, (pos, obs, exp)


def carried_rows(eng) -> list[int]:
    """Counts, per step, the verify rows packed before the step before them landed."""
    counts, pack = [], eng.runner.pack

    def counting(sched):
        packed = pack(sched)
        batch = packed[0]
        counts.append(int(np.sum((batch.prev_rows >= 0) & (batch.num_drafts > 0))))
        return packed

    eng.runner.pack = counting
    return counts
