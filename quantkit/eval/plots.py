"""PNG plots (matplotlib, the optional `plot` extra): KLD distribution + per-chunk PPL ratio, and bits per weight
per layer and tensor kind."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import BadInput


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise BadInput("--plot needs matplotlib: pip install 'quantkit[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _int_ticks():
    from matplotlib.ticker import MaxNLocator
    return MaxNLocator(integer=True)


def _save(fig, path: Path) -> None:
    from ..atomic import atomic_output
    with atomic_output(Path(path), force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def plot_kld(result: dict, kld, path: Path) -> None:
    """Left: histogram of per-token KLD (log x axis). Right: PPL(Q)/PPL(base) per chunk."""
    if kld is None:
        raise BadInput("--plot shows KL divergence: it needs --base")
    plt = _pyplot()
    import numpy as np
    k = kld.double().clamp_min(1e-10).numpy()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.hist(k, bins=np.logspace(np.log10(max(k.min(), 1e-10)), np.log10(max(k.max(), 1e-9)), 60), color="#4477aa")
    a.set_xscale("log")
    a.set_xlabel("KL divergence per token (nats)")
    a.set_ylabel("tokens")
    for name, v, c in (("mean", result["kld_mean"], "#cc3311"), ("median", result["kld_median"], "#228833"),
                       ("99%", result["kld_p99"], "#aa3377")):
        a.axvline(max(v, 1e-10), color=c, ls="--", label=f"{name} {v:.4g}")
    a.legend()
    a.set_title("KLD distribution")
    ratios = [c["ppl"] / c["base_ppl"] for c in result["per_chunk"]]
    b.plot(range(len(ratios)), ratios, marker="o", ms=3, color="#4477aa")
    b.axhline(1.0, color="gray", lw=0.8)
    b.axhline(result["ppl_ratio"], color="#cc3311", ls="--", label=f"overall {result['ppl_ratio']:.4f}")
    b.set_xlabel("chunk")
    b.xaxis.set_major_locator(_int_ticks())
    b.set_ylabel("PPL(Q) / PPL(base)")
    b.legend()
    b.set_title("per-chunk PPL ratio")
    fig.suptitle(f"{Path(str(result['model'])).name} vs {Path(str(result['base'])).name}")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


_LAYER = re.compile(r"^blk\.(\d+)\.(.+?)(?:\.weight)?$")


def plot_bpw(info: dict, path: Path) -> None:
    """Bits per weight of each layer's tensors, one line per tensor kind (attn_q, ffn_down ...); the
    non-layer tensors (token_embd, output) as labelled points at the right."""
    plt = _pyplot()
    kinds: dict[str, dict[int, float]] = {}
    other = []
    for t in info["tensors"]:
        if len(t["shape"]) < 2:
            continue
        m = _LAYER.match(t["name"])
        if m:
            kinds.setdefault(m.group(2), {})[int(m.group(1))] = t["bpw"]
        else:
            other.append((t["name"].removesuffix(".weight"), t["bpw"]))
    if not kinds and not other:
        raise BadInput(f"{info['path']}: no 2-D tensors to plot")
    fig, ax = plt.subplots(figsize=(11, 4.5))
    n_layers = 1 + max((max(v) for v in kinds.values()), default=0)
    for kind, v in sorted(kinds.items()):
        xs = sorted(v)
        ax.plot(xs, [v[x] for x in xs], marker="o", ms=3, label=kind)
    for j, (name, bpw) in enumerate(other):
        ax.scatter([n_layers + 0.5 + j], [bpw], marker="s", color="black")
        ax.annotate(name, (n_layers + 0.5 + j, bpw), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=8)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(_int_ticks())
    ax.set_ylabel("bits per weight")
    ax.set_title(f"{Path(info['path']).name}: {info['bits_per_weight']:.3f} bits per weight overall")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
