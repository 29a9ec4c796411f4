"""How sparse a gated model's attention is, and what each query reads (docs/method.md, "Density").

``density(model, blocks)``:
1. Run every held-out block through the model in eval mode, no grad, gates deterministic: M = 1[g > 0].
2. As each attention module returns, read its gate logits g (batch, n_heads, q, k), -inf on pairs a
   query may not see (``scopes.keeping_gate_logits``), reduce them to counts and drop them, so memory
   holds one layer's g at a time (a forward hook, removed on exit).
3. Counts per (layer, head): open gates, allowed (causal, unpadded) pairs, queries, queries that read
   no key, most keys any query read; per (layer, query position): open and allowed pairs, queries.
4. Everything reported derives from the counts: density = open / allowed overall, per layer and per
   head; keys read per query (mean, max); heads shut on every block (zero open gates); the share of
   queries reading nothing; density and keys read by query position.
The CE of the same forwards is reported beside it (``measure``), and the open-gate totals are checked
against ``measure``'s own counts.

``prompt_attention(model, ids)`` keeps, for one prompt, the sparse model's attention weights A = P * M
and gates, and optionally the dense base model's pattern P, for pictures (plots.py) and open-key lists.

Report metrics (beside the header of report.py): overall {density, open_pairs, allowed_pairs,
mean_keys_per_query, max_keys_per_query, heads_shut, heads, share_heads_shut, share_queries_reading_nothing,
sequences, seq_len, ce, tokens}; per_layer [{layer, density, mean_keys_per_query, max_keys_per_query,
heads_shut}]; per_head {density, mean_keys_per_query, max_keys_per_query} as (n_layers, n_heads) lists;
heads_shut [[layer, head], ...]; by_position {density, mean_keys_per_query, allowed_keys} per query
position and per_layer_density (n_layers, pos); counts (the raw counts, read back by from_dict);
data; gates; and, with a prompt, prompt {text, tokens, density, per_head, open_keys}.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import torch

from spartan_cli.blocks import TokenBlocks
from spartan_cli.errors import ConfigError
from spartan_cli.gating.scopes import evaluating, gates_open, keeping_gate_logits

log = logging.getLogger(__name__)

OPEN_KEYS_MAX_POS = 64  # list each query's open keys in the prompt report up to this many tokens


# ------------------------------------------------------------------------------------------- counts
@dataclass(frozen=True)
class DensityResult:
    """Raw counts over a held-out set (every reported number derives from them), with the CE."""

    open_pairs: torch.Tensor  # (n_layers, n_heads) int64: open deterministic gates on allowed pairs
    allowed_pairs: torch.Tensor  # (n_layers, n_heads) int64: allowed (causal, unpadded) pairs
    query_rows: torch.Tensor  # (n_layers, n_heads) int64: queries with at least one allowed key
    empty_rows: torch.Tensor  # (n_layers, n_heads) int64: of those, queries whose gates are all shut
    max_keys: torch.Tensor  # (n_layers, n_heads) int64: most keys one query read
    open_by_pos: torch.Tensor  # (n_layers, pos) int64: open gates of the queries at each position, all heads
    allowed_by_pos: torch.Tensor  # (n_layers, pos) int64
    rows_by_pos: torch.Tensor  # (n_layers, pos) int64: queries at each position, all heads
    sequences: int
    ce: float | None = None  # nats per scored token of the same forwards (deterministic gates)
    tokens: int = 0

    # ----- derived
    @property
    def density(self) -> float:
        return _ratio(self.open_pairs.sum(), self.allowed_pairs.sum())

    @property
    def per_layer(self) -> torch.Tensor:
        return self.open_pairs.sum(1).double() / self.allowed_pairs.sum(1).clamp_min(1)  # (n_layers,)

    @property
    def per_head(self) -> torch.Tensor:
        return self.open_pairs.double() / self.allowed_pairs.clamp_min(1)  # (n_layers, n_heads)

    @property
    def mean_keys_per_query(self) -> float:
        return _ratio(self.open_pairs.sum(), self.query_rows.sum())

    @property
    def heads_shut(self) -> list[tuple[int, int]]:
        """(layer, head) of heads with no open gate on any block."""
        return [tuple(x) for x in (self.open_pairs == 0).nonzero().tolist()]

    def to_dict(self) -> dict:
        n_layers, n_heads = self.open_pairs.shape
        shut = self.heads_shut
        keys_head = self.open_pairs.double() / self.query_rows.clamp_min(1)  # (n_layers, n_heads)
        overall = {
            "density": self.density, "open_pairs": int(self.open_pairs.sum()),
            "allowed_pairs": int(self.allowed_pairs.sum()), "mean_keys_per_query": self.mean_keys_per_query,
            "max_keys_per_query": int(self.max_keys.max()), "heads_shut": len(shut), "heads": n_layers * n_heads,
            "share_heads_shut": len(shut) / (n_layers * n_heads),
            "share_queries_reading_nothing": _ratio(self.empty_rows.sum(), self.query_rows.sum()),
            "sequences": self.sequences, "seq_len": self.open_by_pos.shape[1], "ce": self.ce, "tokens": self.tokens,
        }
        per_layer = [{"layer": layer, "density": float(self.per_layer[layer]),
                      "mean_keys_per_query": _ratio(self.open_pairs[layer].sum(), self.query_rows[layer].sum()),
                      "max_keys_per_query": int(self.max_keys[layer].max()),
                      "heads_shut": int((self.open_pairs[layer] == 0).sum())} for layer in range(n_layers)]
        by_pos = {
            "density": (self.open_by_pos.sum(0).double() / self.allowed_by_pos.sum(0).clamp_min(1)).tolist(),
            "mean_keys_per_query": (self.open_by_pos.sum(0).double() / self.rows_by_pos.sum(0).clamp_min(1)).tolist(),
            "allowed_keys": (self.allowed_by_pos.sum(0).double() / self.rows_by_pos.sum(0).clamp_min(1)).tolist(),
            "per_layer_density": (self.open_by_pos.double() / self.allowed_by_pos.clamp_min(1)).tolist(),
        }
        counts = {k: v.tolist() for k, v in asdict(self).items() if isinstance(v, torch.Tensor)}
        return {"overall": overall, "per_layer": per_layer,
                "per_head": {"density": self.per_head.tolist(), "mean_keys_per_query": keys_head.tolist(),
                             "max_keys_per_query": self.max_keys.tolist()},
                "heads_shut": [list(x) for x in shut], "by_position": by_pos,
                "counts": {**counts, "sequences": self.sequences}}

    @classmethod
    def from_dict(cls, d: dict) -> "DensityResult":
        c = d["counts"]
        tensors = {k: torch.tensor(c[k], dtype=torch.long) for k in
                   ("open_pairs", "allowed_pairs", "query_rows", "empty_rows", "max_keys", "open_by_pos",
                    "allowed_by_pos", "rows_by_pos")}
        overall = d.get("overall", {})
        return cls(**tensors, sequences=int(c["sequences"]), ce=overall.get("ce"), tokens=int(overall.get("tokens", 0)))


def _ratio(a, b) -> float:
    return float(a) / max(float(b), 1.0)


class _Counter:
    """Accumulates one layer's counts from its gate logits, batch after batch."""

    def __init__(self, n_heads: int, seq_len: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.long)  # noqa: E731
        self.open, self.allowed, self.rows, self.empty, self.max_keys = (z(n_heads) for _ in range(5))
        self.open_pos, self.allowed_pos, self.rows_pos = z(seq_len), z(seq_len), z(seq_len)

    def add(self, g: torch.Tensor) -> None:
        g = g.detach()  # (batch, n_heads, q, k), -inf where the query may not see the key
        open_ = g > 0  # M = 1[g > 0], (batch, n_heads, q, k); -inf pairs are never open
        allowed = g > float("-inf")  # (batch, n_heads, q, k)
        keys = open_.sum(-1)  # (batch, n_heads, q): keys each query reads
        has_keys = allowed.any(-1)  # (batch, n_heads, q)
        self.open += open_.sum((0, 2, 3)).cpu()
        self.allowed += allowed.sum((0, 2, 3)).cpu()
        self.rows += has_keys.sum((0, 2)).cpu()
        self.empty += (has_keys & (keys == 0)).sum((0, 2)).cpu()
        self.max_keys = torch.maximum(self.max_keys, keys.amax((0, 2)).cpu())
        q = g.shape[2]
        self.open_pos[-q:] += keys.sum((0, 1)).cpu()  # queries are the last q positions
        self.allowed_pos[-q:] += allowed.sum((0, 1, 3)).cpu()
        self.rows_pos[-q:] += has_keys.sum((0, 1)).cpu()


@contextmanager
def _counting(model, counters: list[_Counter]):
    """Within ``keeping_gate_logits``: each attention module's g goes to its counter and is dropped."""
    from spartan_cli.gating.attention import gate_states
    from spartan_cli.hf.models import adapter_for

    states = gate_states(model)

    def hook_for(layer):
        def hook(_module, _args, _output):
            counters[layer].add(states[layer].gate_logits)
            states[layer].gate_logits = None  # memory: one layer's g at a time

        return hook

    handles = [m.register_forward_hook(hook_for(layer))
               for layer, m in enumerate(adapter_for(model).attention_modules(model))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------------- verbs
@torch.no_grad()
def density(model, blocks: TokenBlocks, *, batch_size: int = 8, max_batches: int | None = None,
            on_progress: Callable | None = None) -> DensityResult:
    """Density counts of gated ``model`` on ``blocks`` (batch, pos); see the module docstring.

    ``on_progress(progress.Progress)`` is called after each batch.
    """
    from spartan_cli.gating.attention import gate_states
    from spartan_cli.progress import Progress
    from spartan_cli.measure.heldout import measure
    from spartan_cli.hf.models import model_shape

    gate_states(model)  # ModelError if the model is not gated
    shape = model_shape(model)
    counters = [_Counter(shape.n_heads, blocks.seq_len) for _ in range(shape.n_layers)]
    n_batches = -(-len(blocks) // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    nll, tokens, seqs, measured = 0.0, 0, 0, 0
    with keeping_gate_logits(model), _counting(model, counters):
        for i in range(n_batches):
            m = measure(model, blocks.slice(i * batch_size, (i + 1) * batch_size), batch_size=batch_size)
            nll, tokens, seqs = nll + m.ce * m.tokens, tokens + m.tokens, seqs + m.sequences
            measured += int(m.open_pairs.sum())
            if on_progress is not None:
                on_progress(Progress("density", i + 1, n_batches))
    result = DensityResult(
        open_pairs=torch.stack([c.open for c in counters]), allowed_pairs=torch.stack([c.allowed for c in counters]),
        query_rows=torch.stack([c.rows for c in counters]), empty_rows=torch.stack([c.empty for c in counters]),
        max_keys=torch.stack([c.max_keys for c in counters]), open_by_pos=torch.stack([c.open_pos for c in counters]),
        allowed_by_pos=torch.stack([c.allowed_pos for c in counters]),
        rows_by_pos=torch.stack([c.rows_pos for c in counters]), sequences=seqs, ce=nll / max(tokens, 1), tokens=tokens,
    )
    assert int(result.open_pairs.sum()) == measured, "gate-logit counts disagree with measure()'s open-gate counts"
    return result


@dataclass(frozen=True)
class PromptAttention:
    """One prompt's attention, per layer and head."""

    text: str
    tokens: list[str]  # decoded token labels, (pos,)
    input_ids: torch.Tensor  # (pos,) int64
    weights: torch.Tensor  # (n_layers, n_heads, pos, pos) A = P * M of the gated model (0 above the diagonal)
    gates: torch.Tensor  # (n_layers, n_heads, pos, pos) bool: open deterministic gates
    base_pattern: torch.Tensor | None = None  # (n_layers, n_heads, pos, pos) P of the dense base model

    @property
    def per_head(self) -> torch.Tensor:
        pos = self.gates.shape[-1]
        return self.gates.sum((-1, -2)).double() / (pos * (pos + 1) / 2)  # (n_layers, n_heads)

    def to_dict(self) -> dict:
        n_layers, n_heads, pos, _ = self.gates.shape
        out = {"text": self.text, "tokens": self.tokens, "density": float(self.gates.sum()) / (
            n_layers * n_heads * pos * (pos + 1) / 2), "per_head": self.per_head.tolist(), "open_keys": None}
        if pos <= OPEN_KEYS_MAX_POS:  # which keys each query reads, per head ("a{layer}.h{head}" as EAP-IG names heads)
            out["open_keys"] = {f"a{layer}.h{head}": [row.nonzero().flatten().tolist() for row in self.gates[layer, head]]
                                for layer in range(n_layers) for head in range(n_heads)}
        return out


def encode_prompt(tokenizer, text: str) -> torch.Tensor:
    """Token ids (pos,) of ``text`` the way training blocks are made (no special tokens, data.py)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError(f"--prompt {text!r} gives no tokens; pass some text")
    return torch.tensor(ids, dtype=torch.long)


def _attention(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate logits g and softmax pattern P of gated ``model`` on one sequence ``ids`` (pos,):
    each (n_layers, n_heads, pos, pos) on the CPU, g = -inf above the diagonal."""
    device = next(model.parameters()).device
    with torch.no_grad(), evaluating(model), keeping_gate_logits(model, pattern=True) as states:
        model(input_ids=ids[None].to(device))
        g = torch.stack([s.gate_logits[0] for s in states]).cpu()  # (n_layers, n_heads, pos, pos)
        p = torch.stack([s.pattern[0] for s in states]).float().cpu()  # (n_layers, n_heads, pos, pos)
    return g, p


def prompt_attention(model, tokenizer, text: str) -> PromptAttention:
    """Attention weights A = P * M and open gates of gated ``model`` on ``text`` (no base pattern yet)."""
    from spartan_cli.hf.models import model_shape

    ids = encode_prompt(tokenizer, text)  # (pos,)
    max_pos = model_shape(model).max_positions
    if max_pos is not None and ids.numel() > max_pos:
        raise ConfigError(f"--prompt has {ids.numel()} tokens, more than the model's {max_pos} positions; shorten it")
    g, pattern = _attention(model, ids)
    gates = g > 0  # (n_layers, n_heads, pos, pos)
    tokens = [tokenizer.decode([i]) for i in ids.tolist()]
    return PromptAttention(text=text, tokens=tokens, input_ids=ids, weights=pattern * gates, gates=gates)


def dense_pattern(base, ids: torch.Tensor) -> torch.Tensor:
    """The dense attention pattern P (n_layers, n_heads, pos, pos) of ``base`` on ``ids`` (pos,).

    Gates are attached to ``base`` if it has none, and forced open for the call: that computes exactly
    its dense attention (tests/test_attention.py)."""
    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.gating.attention import is_gated

    if not is_gated(base):
        attach_gates(base)
    with gates_open(base):
        return _attention(base, ids)[1]


# ------------------------------------------------------------------------------------------ the run
@dataclass(frozen=True)
class DensityConfig:
    """Settings of ``spartan density``."""

    model: str  # checkpoint directory (or a plain model: gates attached with gate_bias, untrained)
    data: str | None = None  # text to measure on (every block); None: the checkpoint's held-out blocks
    seq_len: int | None = None
    text_field: str = "text"
    prompt: str | None = None  # one text whose attention is kept for pictures and open-key lists
    baseline: str | None = None  # dense model for the prompt pictures; None: spartan.json base_model
    compare_base: bool = True
    batch_size: int = 8
    max_batches: int | None = None
    gate_bias: float | None = None  # plain models only: b of the attached gates (None: GateConfig default)
    device: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self):
        from spartan_cli.config import check_batching

        check_batching(self.batch_size, self.max_batches)
        if self.prompt is not None and not self.prompt:
            raise ConfigError("--prompt is empty; pass some text")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DensityConfig":
        from spartan_cli.config import strict_from_dict

        return strict_from_dict(cls, d, where="density")


@dataclass(frozen=True)
class DensityRun:
    result: DensityResult | None  # None when only a prompt was given and the model stores no data
    prompt: PromptAttention | None
    data: dict | None  # evaluate.EvalData.to_dict()
    gates: dict  # {kind, bias, source: "checkpoint" | "attached (untrained)"}
    config: dict  # resolved settings for the report

    def metrics(self) -> dict:
        out: dict[str, Any] = self.result.to_dict() if self.result is not None else {}
        out["data"] = self.data
        out["gates"] = self.gates
        if self.prompt is not None:
            out["prompt"] = self.prompt.to_dict()
        return out


def density_run(cfg: DensityConfig, *, on_progress: Callable | None = None) -> DensityRun:
    """Load the model, measure density on its held-out data, and keep a prompt's attention."""
    import gc

    from spartan_cli.gating.attention import attach_gates
    from spartan_cli.config import GateConfig
    from spartan_cli.hf.subjects import base_model_name, load_base, load_subject
    from spartan_cli.measure.evaluate import eval_data
    from spartan_cli.progress import Progress
    from spartan_cli.training.train import resolve_device

    say = on_progress or (lambda p: log.info(p.stage))
    device = resolve_device(cfg.device)
    say(Progress(f"loading {cfg.model}", 0, None))
    subject = load_subject(cfg.model, device=device, trust_remote_code=cfg.trust_remote_code)
    if subject.gated:
        if cfg.gate_bias is not None:
            raise ConfigError(f"--gate-bias applies to plain models only; {cfg.model!r} is a checkpoint whose gates "
                              "were trained at its own bias: drop --gate-bias")
        gates = {**subject.meta["gate"], "source": "checkpoint"}
    else:
        gate_cfg = GateConfig() if cfg.gate_bias is None else GateConfig(bias=cfg.gate_bias)
        attach_gates(subject.model, gate_cfg)
        gates = {**gate_cfg.to_dict(), "source": "attached (untrained)"}
    max_tokens = None
    if cfg.max_batches is not None and cfg.data is not None:
        seq = cfg.seq_len or ((subject.meta or {}).get("data") or {}).get("seq_len") or 128
        max_tokens = cfg.max_batches * cfg.batch_size * seq
    data = eval_data(subject, data=cfg.data, seq_len=cfg.seq_len, text_field=cfg.text_field, max_tokens=max_tokens)
    if data is None and cfg.prompt is None:
        raise ConfigError(f"nothing to measure {cfg.model!r} on: it stores no data config; pass --data FILE "
                          "and/or --prompt TEXT")
    result = None
    if data is not None:
        result = density(subject.model, data.blocks, batch_size=cfg.batch_size, max_batches=cfg.max_batches,
                         on_progress=on_progress)
    prompt = base_name = None
    if cfg.prompt is not None:
        say(Progress("attention on the prompt", 0, None))
        prompt = prompt_attention(subject.model, subject.tokenizer, cfg.prompt)
        if cfg.compare_base:
            base_name = base_model_name(subject, cfg.baseline)
            if base_name is None:  # a plain model: its own dense attention is its base
                base_name, base = cfg.model, subject.model
            else:
                subject = replace(subject, model=None)
                gc.collect()  # one model in memory at a time
                say(Progress(f"loading base model {base_name}", 0, None))
                base, _ = load_base(base_name, subject, device=device, trust_remote_code=cfg.trust_remote_code)
            prompt = replace(prompt, base_pattern=dense_pattern(base, prompt.input_ids))
    resolved = {**cfg.to_dict(), "baseline": base_name, "device": str(device)}
    return DensityRun(result=result, prompt=prompt, data=None if data is None else data.to_dict(), gates=gates,
                      config=resolved)
