"""Pictures of density and attention (matplotlib, PNG).

Every function draws on its own ``matplotlib.figure.Figure`` with an Agg canvas created inside the
call: no pyplot, no global backend switch, nothing changes at import (a notebook's backend is left as it
was). Each returns the path(s) it wrote.
- ``density_heatmap``: layer x head density, each cell labelled.
- ``density_by_position``: density and keys read per query against query position.
- ``attention_patterns``: one PNG per layer, a row per head: the dense base model's pattern P next to the
  sparse model's weights A = P * M (dots mark open gates), tokens on both axes.
- ``attention_graph``: the paper's Figure 1 view: tokens in a row per layer, a line from each key to
  each query that reads it, dense base (left) next to sparse (right), one colour per head.
"""

from __future__ import annotations

from pathlib import Path

HEAD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                "tab:olive", "tab:cyan", "tab:gray")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)  # atomic, like every artifact
    return path


def density_heatmap(result, path, *, title: str = "attention density") -> Path:
    """Heatmap of ``result.per_head`` (n_layers, n_heads) of a density.DensityResult."""
    import numpy as np

    dens = result.per_head.numpy()  # (n_layers, n_heads)
    n_layers, n_heads = dens.shape
    fig = _figure(max(4.0, 0.6 * n_heads + 2.0), max(3.0, 0.45 * n_layers + 1.5))
    ax = fig.add_subplot()
    im = ax.imshow(dens, cmap="viridis", vmin=0.0, vmax=max(float(dens.max()), 1e-6), aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(np.arange(n_heads))
    ax.set_yticks(np.arange(n_layers))
    ax.set_title(f"{title}\noverall {result.density:.2%}, {len(result.heads_shut)} of {n_layers * n_heads} heads shut")
    if n_layers * n_heads <= 400:
        for layer in range(n_layers):
            for head in range(n_heads):
                v = dens[layer, head]
                ax.text(head, layer, f"{v:.1%}" if v >= 0.001 or v == 0 else f"{v:.2%}", ha="center", va="center",
                        fontsize=7, color="white" if v < 0.6 * dens.max() else "black")
    fig.colorbar(im, ax=ax, label="open gates / allowed pairs")
    return _save(fig, path)


def density_by_position(result, path, *, title: str = "density by query position") -> Path:
    """Density (left axis) and mean keys read per query (right axis) against query position."""
    import numpy as np

    d = result.to_dict()["by_position"]
    pos = np.arange(len(d["density"]))
    fig = _figure(6.5, 3.5)
    ax = fig.add_subplot()
    ax.plot(pos, d["density"], color="tab:blue", label="density (all layers)")
    for layer, row in enumerate(d["per_layer_density"]):
        ax.plot(pos, row, color="tab:blue", alpha=0.25, linewidth=0.8)
    ax.set_xlabel("query position")
    ax.set_ylabel("open / allowed keys", color="tab:blue")
    top = max([max(d["density"], default=0.0)] + [max(row, default=0.0) for row in d["per_layer_density"]])
    ax.set_ylim(0, min(1.02, max(top * 1.1, 1e-3)))  # a sparse model's curve would hug 0 on a 0..1 axis
    ax2 = ax.twinx()
    ax2.plot(pos, d["mean_keys_per_query"], color="tab:orange", label="mean keys read")
    ax2.set_ylabel("keys read per query", color="tab:orange")
    ax.set_title(f"{title} (faint: each layer)")
    return _save(fig, path)


def _labels(tokens: list[str]) -> list[str]:
    return [t.replace("\n", "\\n").replace(" ", "\u00b7") or "\u2205" for t in tokens]


def _panel(ax, weights, tokens, *, title: str, gates=None):
    import numpy as np

    pos = weights.shape[-1]
    w = np.ma.masked_where(np.triu(np.ones((pos, pos), dtype=bool), k=1), weights)  # above the diagonal: not allowed
    cmap = _cmap()
    ax.imshow(w, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
    if gates is not None:
        q, k = np.nonzero(gates)
        ax.scatter(k, q, s=6, c="tab:red", marker="o", linewidths=0)
    step = max(1, pos // 48)
    ticks = np.arange(0, pos, step)
    labels = _labels(tokens)
    ax.set_xticks(ticks)
    ax.set_xticklabels([labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(ticks)
    ax.set_yticklabels([labels[i] for i in ticks], fontsize=7)
    ax.set_xlabel("key", fontsize=7)
    ax.set_ylabel("query", fontsize=7)
    ax.set_title(title, fontsize=8)


def _cmap():
    import matplotlib

    return matplotlib.colormaps["Blues"].with_extremes(bad="0.85")  # grey: pairs a query may not see


def attention_patterns(prompt, out_dir, *, prefix: str = "attention_layer") -> list[Path]:
    """One PNG per layer of a density.PromptAttention: per head, base P (if any) | sparse A = P * M."""
    weights = prompt.weights.numpy()  # (n_layers, n_heads, pos, pos)
    gates = prompt.gates.numpy()
    base = None if prompt.base_pattern is None else prompt.base_pattern.numpy()
    n_layers, n_heads, pos, _ = weights.shape
    cols = 1 if base is None else 2
    side = min(max(2.6, 0.22 * pos + 1.0), 9.0)
    paths = []
    per_head = prompt.per_head
    for layer in range(n_layers):
        fig = _figure(side * cols + 0.5, side * n_heads)
        axes = fig.subplots(n_heads, cols, squeeze=False)
        for head in range(n_heads):
            if base is not None:
                _panel(axes[head, 0], base[layer, head], prompt.tokens, title=f"base (dense) a{layer}.h{head}")
            _panel(axes[head, cols - 1], weights[layer, head], prompt.tokens, gates=gates[layer, head],
                   title=f"sparse a{layer}.h{head}: {int(gates[layer, head].sum())} open ({per_head[layer, head]:.1%})")
        fig.suptitle(f"layer {layer}: attention on {prompt.text!r}\nblue: weight; red dots: open gates; grey: not allowed",
                     fontsize=9)
        paths.append(_save(fig, Path(out_dir) / f"{prefix}{layer}.png"))
    return paths


def attention_graph(prompt, path, *, min_weight: float = 0.05) -> Path:
    """Figure-1-style graph: per layer, lines key -> query with alpha = weight (>= ``min_weight``),
    coloured by head; the dense base on the left, the sparse model on the right."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    weights = prompt.weights.numpy()  # (n_layers, n_heads, pos, pos)
    panels = [("sparse (open gates)", weights)]
    if prompt.base_pattern is not None:
        panels.insert(0, ("base (dense)", prompt.base_pattern.numpy()))
    n_layers, n_heads, pos, _ = weights.shape
    fig = _figure(max(4.0, 0.32 * pos + 1.5) * len(panels), 1.1 * n_layers + 1.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    labels = _labels(prompt.tokens)
    for ax, (title, w) in zip(axes, panels):
        segments, colours = [], []
        for layer in range(n_layers):
            for head in range(n_heads):
                rgba = to_rgba(HEAD_COLOURS[head % len(HEAD_COLOURS)])
                q, k = (w[layer, head] >= min_weight).nonzero()
                for qi, ki in zip(q, k):
                    segments.append([(ki, layer), (qi, layer + 1)])
                    colours.append((*rgba[:3], float(min(1.0, w[layer, head, qi, ki]))))  # alpha = weight
        ax.add_collection(LineCollection(segments, colors=colours, linewidths=1.2))
        for level in range(n_layers + 1):
            ax.scatter(range(pos), [level] * pos, s=10, c="black", zorder=3)
        ax.set_xticks(range(pos))
        ax.set_xticklabels(labels, fontsize=8, rotation=90 if pos > 24 else 0)
        ax.set_yticks(range(n_layers + 1))
        ax.set_yticklabels(["input"] + [f"after layer {i}" for i in range(n_layers)], fontsize=7)
        ax.set_title(f"{title}: weight >= {min_weight}", fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
    handles = [fig.axes[0].plot([], [], color=HEAD_COLOURS[h % len(HEAD_COLOURS)], label=f"head {h}")[0]
               for h in range(n_heads)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(n_heads, 8), fontsize=7)
    fig.suptitle(f"attention on {prompt.text!r}: a line from each key (below) to each query (above) reading it", fontsize=9)
    return _save(fig, path)


def _constraint(record: dict) -> float:
    """What the multiplier read at a step: the KL to the dense model, else the CE gap to it on the same rows
    (deterministic-gate CE when the run measured one, else the training CE)."""
    if record.get("kl") is not None:
        return record["kl"]
    ce = record["det_ce"] if record.get("det_ce") is not None else record["ce"]
    return ce - record["ref_ce"]


def trajectory(records: list[dict], path, *, title: str = "sparsify trajectory") -> Path:
    """The run's course from its ``train_log.jsonl`` records, over steps: density (log axis; sampled-gate
    batches and deterministic held-out evaluations), CE against the target tau, the constraint the
    multiplier reads (the CE gap to the dense model on the same rows, or the KL to it) against its slack,
    when the run had one, and beta (log)."""
    steps = [r["step"] for r in records]
    evals = [r for r in records if r.get("heldout_ce") is not None]
    gaps = [(r["step"], _constraint(r), r.get("slack")) for r in records
            if r.get("kl") is not None or r.get("ref_ce") is not None]
    fig = _figure(7.0, 9.5 if gaps else 7.5)
    panels = fig.subplots(4 if gaps else 3, 1, sharex=True)
    dens, ce, beta = panels[0], panels[1], panels[-1]
    dens.plot(steps, [max(r["density"], 1e-6) for r in records], lw=1, color="tab:blue", label="training batch")
    if evals:
        dens.plot([r["step"] for r in evals], [max(r["heldout_density"], 1e-6) for r in evals], "o-", ms=3,
                  color="tab:red", label="held out (deterministic gates)")
        final = evals[-1]
        target = final.get("heldout_tau") or final["tau"]
        dens.set_title(f"{title}\nfinal held-out density {final['heldout_density']:.2%}, "
                       f"CE {final['heldout_ce']:.4f} vs target {target:.4f}")
    dens.set_yscale("log")
    dens.set_ylabel("attention density")
    dens.legend(fontsize=8)
    ce.plot(steps, [r["ce"] for r in records], lw=1, color="tab:blue", label="training CE (sampled gates)")
    if evals:
        ce.plot([r["step"] for r in evals], [r["heldout_ce"] for r in evals], "o-", ms=3, color="tab:red",
                label="held-out CE")
    ce.plot(steps, [r["tau"] for r in records], "--", color="black", lw=1, label="target tau")
    capped = [r for r in evals if r.get("heldout_tau") is not None and abs(r["heldout_tau"] - r["tau"]) > 1e-9]
    if capped:  # eval_batches capped the periodic evaluation: its own target, on the same rows
        ce.plot([r["step"] for r in capped], [r["heldout_tau"] for r in capped], "x", color="tab:red",
                label="target on the evaluated rows")
    ce.set_ylabel("CE (nats/token)")
    ce.legend(fontsize=8)
    if gaps:
        con = panels[2]
        kl = any(r.get("kl") is not None for r in records)
        con.plot([g[0] for g in gaps], [g[1] for g in gaps], lw=0.8, color="tab:orange",
                 label="KL to the dense model" if kl else "CE gap to the dense model, same rows")
        if any(g[2] is not None for g in gaps):
            con.plot([g[0] for g in gaps], [g[2] for g in gaps], "--", color="black", lw=1, label="slack")
        con.axhline(0.0, color="gray", lw=0.5)
        con.set_ylabel("constraint (nats)")
        con.legend(fontsize=8)
    beta.plot(steps, [r["beta"] for r in records], color="tab:green", lw=1)
    beta.set_yscale("log")
    beta.set_ylabel("beta (sparsity weight)")
    beta.set_xlabel("step")
    return _save(fig, path)
