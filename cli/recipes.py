"""Served-model recipes (``recipes/*.yaml``): what a model is, and how to serve it on a slice.

A recipe holds the model's shape numbers (enough for memory arithmetic), serving
defaults, and per-slice overrides keyed by generation (``v6e``) or slice (``v6e-8``).
``plan_serving`` turns recipe + slice into concrete engine settings, or refuses
with the arithmetic that shows why the model cannot be served there.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from sgljax.cli.slices import GIB, Slice

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}
DEFAULT_MODEL = "smollm2-135m"  # the engine's embedded default model

# Per-chip HBM kept free for what the arithmetic does not count: activations, logits,
# compiled programs, XLA scratch. 10% of HBM, at least 2 GiB.
RESERVE_FRACTION, RESERVE_MIN_GIB = 0.10, 2.0

SERVING_KEYS = {"tp_size", "dtype", "page_size", "chunked_prefill_size", "max_running_requests",
                "context_length", "max_total_tokens", "precompile_bs_paddings",
                "precompile_token_paddings"}
SHAPE_KEYS = {"params", "layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim",
              "vocab", "tie_embeddings", "max_context", "experts", "experts_per_token",
              "moe_intermediate", "extra_params"}
RECIPE_KEYS = {"name", "hf_repo", "architecture", "dtype", "local_source", "notes", "shape",
               "serving", "slices", "parsers"}
# What the server reads out of the model's answers (sgljax serve's flags of these names).
PARSER_KEYS = {"tool_call_parser", "reasoning_parser"}


class RecipeError(ValueError):
    """A recipe that is missing, malformed, or inconsistent."""


class DoesNotFit(ValueError):
    """The model cannot be served on the slice; ``kind`` is memory, sharding or disk."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Shape:
    params: int  # total parameters, as published (checked against the formula in tests)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_embeddings: bool
    max_context: int
    experts: int = 0  # MoE: routed experts per layer (0 = dense)
    experts_per_token: int = 0
    moe_intermediate: int = 0
    extra_params: int = 0  # parameters outside the decoder, e.g. an audio encoder

    def formula_params(self, qk_norm: bool) -> int:
        """Parameters computed from the shape (decoder + embeddings + extra)."""
        d, hd = self.hidden, self.head_dim
        attn = d * hd * (self.heads + 2 * self.kv_heads) + self.heads * hd * d
        if self.experts:
            ffn = d * self.experts + self.experts * 3 * d * self.moe_intermediate
        else:
            ffn = 3 * d * self.intermediate
        per_layer = attn + ffn + 2 * d + (2 * hd if qk_norm else 0)
        emb = self.vocab * d * (1 if self.tie_embeddings else 2)
        return self.layers * per_layer + emb + d + self.extra_params

    @property
    def active_params(self) -> int:
        """Parameters one token goes through (MoE: only its experts)."""
        idle = self.experts - self.experts_per_token
        return self.params - self.layers * idle * 3 * self.hidden * self.moe_intermediate

    def stored_kv_heads(self, tp: int) -> int:
        """KV heads the engine stores: replicated up to tp (engine/loader.py kv_heads_for)."""
        return max(self.kv_heads, tp)

    def kv_bytes_per_token(self, tp: int, dtype_bytes: int) -> int:
        return self.layers * 2 * self.stored_kv_heads(tp) * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class Recipe:
    name: str
    hf_repo: str
    architecture: str
    dtype: str
    shape: Shape
    serving: dict
    slices: dict
    local_source: str | None = None
    notes: str = ""
    parsers: dict = dataclasses.field(default_factory=dict)  # PARSER_KEYS → the model's format

    @property
    def qk_norm(self) -> bool:
        return self.architecture.startswith("Qwen3")

    def settings_for(self, sl: Slice) -> dict:
        """Serving defaults, then the generation's overrides, then the slice's."""
        merged = {"dtype": self.dtype, **self.serving}
        for key in (sl.generation, sl.name):
            merged.update(self.slices.get(key) or {})
        return merged


@dataclass(frozen=True)
class ServingPlan:
    """Concrete engine settings for one recipe on one slice, with the memory arithmetic."""
    tp_size: int
    dtype: str
    page_size: int
    chunked_prefill_size: int
    max_running_requests: int
    context_length: int
    max_total_tokens: int
    precompile_bs_paddings: tuple[int, ...]
    precompile_token_paddings: tuple[int, ...]
    weights_gib_per_chip: float
    kv_gib_per_chip: float
    reserve_gib_per_chip: float
    hbm_gib_per_chip: float

    def memory_line(self) -> str:
        used = self.weights_gib_per_chip + self.kv_gib_per_chip + self.reserve_gib_per_chip
        return (f"per chip: weights {self.weights_gib_per_chip:.1f} GiB + KV "
                f"{self.kv_gib_per_chip:.1f} GiB ({self.max_total_tokens:,} tokens) + reserve "
                f"{self.reserve_gib_per_chip:.1f} GiB = {used:.1f} of "
                f"{self.hbm_gib_per_chip:g} GiB (tp {self.tp_size})")


def _load(path: Path) -> Recipe:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping")
    unknown = set(raw) - RECIPE_KEYS
    if unknown:
        raise RecipeError(f"{path}: unknown keys {sorted(unknown)}")
    for section, allowed in (("shape", SHAPE_KEYS), ("serving", SERVING_KEYS),
                             ("parsers", PARSER_KEYS)):
        bad = set(raw.get(section) or {}) - allowed
        if bad:
            raise RecipeError(f"{path}: unknown {section} keys {sorted(bad)}")
    for key, override in (raw.get("slices") or {}).items():
        bad = set(override or {}) - SERVING_KEYS
        if bad:
            raise RecipeError(f"{path}: slices.{key}: unknown keys {sorted(bad)}")
    try:
        recipe = Recipe(name=raw["name"], hf_repo=raw["hf_repo"], architecture=raw["architecture"],
                        dtype=raw.get("dtype", "bfloat16"), shape=Shape(**raw["shape"]),
                        serving=dict(raw.get("serving") or {}), slices=dict(raw.get("slices") or {}),
                        local_source=raw.get("local_source"), notes=raw.get("notes", ""),
                        parsers=dict(raw.get("parsers") or {}))
    except (KeyError, TypeError) as e:
        raise RecipeError(f"{path}: missing or wrong field ({e})") from None
    if recipe.name != path.stem:
        raise RecipeError(f"{path}: name {recipe.name!r} differs from the file name")
    if recipe.dtype not in DTYPE_BYTES:
        raise RecipeError(f"{path}: dtype {recipe.dtype!r} is not one of {sorted(DTYPE_BYTES)}")
    return recipe


# Settings for a model folder that has no recipe: the engine's CPU-friendly defaults.
FOLDER_SERVING = {"tp_size": "auto", "dtype": "float32", "page_size": 16,
                  "chunked_prefill_size": 512, "max_running_requests": 16, "context_length": 4096,
                  "max_total_tokens": "auto", "precompile_bs_paddings": [1, 2, 4, 8, 16],
                  "precompile_token_paddings": [32, 64, 128, 256, 512]}


def recipe_from_folder(path: Path) -> Recipe:
    """A recipe for a local HF model folder (e.g. a tiny test model), from its config.json."""
    from sgljax.engine.config import ModelConfig

    cfg = ModelConfig.from_dir(path)
    shape = Shape(params=0, layers=cfg.num_layers, hidden=cfg.hidden_size,
                  intermediate=cfg.intermediate_size, heads=cfg.num_heads,
                  kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, vocab=cfg.vocab_size,
                  tie_embeddings=cfg.tie_word_embeddings, max_context=cfg.max_position_embeddings,
                  experts=cfg.num_experts, experts_per_token=cfg.experts_per_token,
                  moe_intermediate=cfg.moe_intermediate_size)
    qk_norm = cfg.architecture.startswith("Qwen3")
    # MoE: the engine's own count (every expert, dense layers' and shared experts' MLPs),
    # which the recipe formula's every-layer-sparse shape cannot express.
    params = cfg.param_count() if cfg.is_moe else shape.formula_params(qk_norm)
    shape = dataclasses.replace(shape, params=params)
    serving = dict(FOLDER_SERVING, context_length=min(4096, cfg.max_position_embeddings))
    name = re.sub(r"[^a-z0-9.-]+", "-", path.name.lower()).strip("-") or "model"
    return Recipe(name=name, hf_repo=str(path), architecture=cfg.architecture,
                  dtype="float32", shape=shape, serving=serving, slices={},
                  local_source=str(path))


def available() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name: str) -> Recipe:
    """A recipe by name, or one made from a local model folder's config.json."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return recipe_from_folder(folder)
    path = RECIPES_DIR / f"{name.strip().lower()}.yaml"
    if not path.is_file():
        raise RecipeError(f"no recipe for {name!r}; recipes: {', '.join(available())}")
    return _load(path)


def pick_tp(shape: Shape, sl: Slice, requested) -> int:
    """The tensor-parallel size: all chips on multi-host slices, else the largest that splits."""
    def splits(tp: int) -> bool:
        kv_ok = shape.kv_heads % tp == 0 if shape.kv_heads >= tp else tp % shape.kv_heads == 0
        return shape.heads % tp == 0 and kv_ok

    if requested not in (None, "auto"):
        tp = int(requested)
        if not 1 <= tp <= sl.chips:
            raise DoesNotFit("sharding", f"tp_size {tp} needs {tp} chips; {sl.name} has {sl.chips}")
    elif sl.hosts > 1:
        tp = sl.chips  # every host's chips join one mesh
    else:
        tp = max(t for t in range(1, sl.chips + 1) if splits(t))
    if sl.hosts > 1 and tp != sl.chips:
        raise DoesNotFit("sharding", f"{sl.name} spans {sl.hosts} hosts, so tp must be all "
                         f"{sl.chips} chips, not {tp}; serve it on a single-host slice")
    if not splits(tp):
        raise DoesNotFit("sharding", f"{shape.heads} attention heads / {shape.kv_heads} KV heads "
                         f"do not split over tp={tp} on {sl.name}; use a smaller slice")
    return tp


def _check_buckets(name: str, s: dict) -> None:
    bs, tok = s["precompile_bs_paddings"], s["precompile_token_paddings"]
    if max(bs) < s["max_running_requests"]:
        raise RecipeError(f"{name}: largest precompile_bs_paddings {max(bs)} < "
                          f"max_running_requests {s['max_running_requests']}")
    if max(tok) < s["chunked_prefill_size"]:
        raise RecipeError(f"{name}: largest precompile_token_paddings {max(tok)} < "
                          f"chunked_prefill_size {s['chunked_prefill_size']}")


def plan_serving(recipe: Recipe, sl: Slice, **overrides) -> ServingPlan:
    """Engine settings for ``recipe`` on ``sl``; DoesNotFit with the arithmetic otherwise."""
    s = recipe.settings_for(sl)
    s.update({k: v for k, v in overrides.items() if v is not None})
    shape = recipe.shape
    missing = SERVING_KEYS - set(s) - {"tp_size", "max_total_tokens"}
    if missing:
        raise RecipeError(f"{recipe.name}: serving settings lack {sorted(missing)}")
    _check_buckets(recipe.name, s)
    context = int(s["context_length"])
    if context > shape.max_context:
        raise RecipeError(f"{recipe.name}: context_length {context} > the model's {shape.max_context}")
    tp = pick_tp(shape, sl, s.get("tp_size"))
    nbytes = DTYPE_BYTES[s["dtype"]]
    hbm = sl.hbm_gib_per_chip
    reserve = max(RESERVE_MIN_GIB, RESERVE_FRACTION * hbm)
    weights = shape.params * nbytes / GIB / tp
    kv_token = shape.kv_bytes_per_token(tp, nbytes) / GIB / tp  # per chip
    room = hbm - weights - reserve
    head = (f"{recipe.name} on {sl.name} ({sl.chips} x {hbm:g} GiB): weights "
            f"{shape.params * nbytes / GIB:.1f} GiB ({shape.params / 1e9:.2f}B params x {nbytes} B) "
            f"/ tp {tp} = {weights:.1f} GiB per chip, + reserve {reserve:.1f} GiB")
    if room <= 0:
        raise DoesNotFit("memory", f"{head} = {weights + reserve:.1f} GiB > {hbm:g} GiB HBM per chip")
    page = int(s["page_size"])
    requested = s.get("max_total_tokens")
    if requested in (None, "auto"):
        # Fill what is left, up to every running request at full context.
        tokens = min(int(room / kv_token), int(s["max_running_requests"]) * context)
        tokens -= tokens % page
    else:
        tokens = int(requested)
        if tokens * kv_token > room:
            raise DoesNotFit("memory", f"{head}, + KV {tokens:,} tokens x "
                             f"{kv_token * GIB / 1024:.0f} KiB = {tokens * kv_token:.1f} GiB > "
                             f"{hbm:g} GiB HBM per chip")
    if tokens < context:
        raise DoesNotFit("memory", f"{head}, leaves {room:.1f} GiB for KV = {tokens:,} tokens "
                         f"(x {kv_token * GIB / 1024:.0f} KiB) < one {context:,}-token request; "
                         "lower context_length or use a larger slice")
    return ServingPlan(
        tp_size=tp, dtype=s["dtype"], page_size=page,
        chunked_prefill_size=int(s["chunked_prefill_size"]),
        max_running_requests=int(s["max_running_requests"]), context_length=context,
        max_total_tokens=tokens,
        precompile_bs_paddings=tuple(sorted(s["precompile_bs_paddings"])),
        precompile_token_paddings=tuple(sorted(s["precompile_token_paddings"])),
        weights_gib_per_chip=weights, kv_gib_per_chip=tokens * kv_token,
        reserve_gib_per_chip=reserve, hbm_gib_per_chip=hbm)


def fitting_slices(recipe: Recipe, slices: list[Slice]) -> list[str]:
    """The slices (of ``slices``) the recipe can be served on: for suggestions."""
    ok = []
    for sl in slices:
        try:
            plan_serving(recipe, sl)
            ok.append(sl.name)
        except DoesNotFit:
            pass
    return ok

