"""The paper's Table 1 ablations at toy scale, on the 8-Gaussian ring where the truth is known.

For a Gaussian mixture the marginal velocity is closed-form, so the exact average velocity
u(z, r, t) and the exact 1-step map (noise to data) follow by integrating the ODE finely
(:mod:`meanflow.exact`). Small MLPs are trained with the library (``meanflow.train.train``),
all with the same steps, batch, learning rate, model size and seeds, for

- the fraction of samples with r != t: 0, 25, 50, 75, 100 % (correct tangent (v, 0, 1));
- the JVP tangent (dz, dr, dt): (v,0,1) correct, (v,0,0), (v,1,0), (v,1,1) (fraction 25 %;
  the wrong ones are no config setting: the run's objective is built with
  ``MeanFlowLoss(tangent=...)`` and given to ``train(loss_fn=...)``);
  both groups at p = 0 (plain L2, which estimates the conditional mean, so the comparison with
  the exact u is meaningful) and at p = 1 (the paper's default);
- the adaptive-weight power p in {0, 0.5, 1, 1.5} (fraction 25 %, correct tangent);
- flow matching, sampled with 1, 2, 10 and 100 Euler steps.

Metrics per run, from the EMA weights, on fixed seeded evaluation sets: the RMSE of the learned
u against the exact u on held-out (z, r < t) from the training time distribution and on a
uniform (r, t) grid, the RMSE of v = u(z, t, t), the RMSE of the 1- and 2-step samples against
the exact 1-step map of the same noise, and the energy distance of those samples to fresh data.
RMSE is sqrt(mean ||error||²) over points (the norm over the two coordinates).

    python experiments/toy_ablations.py [--steps N] [--seeds 0 1] [--quick]
        [--out docs/data/toy_ablations.json] [--figure docs/toy-ablations.png] [--runs-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meanflow.objective import MeanFlowLoss

from meanflow.data import build_dataset
from meanflow.exact import GaussianMixtureFlow
from meanflow.fileio import atomic_path, atomic_write_text
from meanflow.metrics import energy_distance
from meanflow.objective import TimeSampler
from meanflow.runs import RunConfig, load_model
from meanflow.sampling import euler_sample, sample, seeded_noise
from meanflow.train import train

# --- the fixed settings shared by every run (only the ablated field changes) ---------------
FULL = dict(steps=800, width=128, depth=3, emb_dim=64, batch=256, lr=1e-3, warmup=100,
            ema=0.995, n_map=4000, n_u=4000, grid_points=100, exact_steps=200, n_figure=1500)
# --quick: a smoke test of the whole pipeline (a few seconds), not a measurement
QUICK = dict(steps=30, width=32, depth=1, emb_dim=16, batch=64, lr=1e-3, warmup=10,
             ema=0.9, n_map=256, n_u=256, grid_points=8, exact_steps=40, n_figure=256)
FM_STEPS = (1, 2, 10, 100)
GRID = [i / 10 for i in range(11)]          # (r, t) grid: r < t, both on 0, 0.1, ..., 1
NOISE_SEED0 = 1_000_000                     # sampling noise seeds (as in meanflow demo)
DATA_SEED, FLOOR_SEED, HELDOUT_SEED, GRID_SEED = 7, 8, 11, 12


@dataclass(frozen=True)
class Variant:
    kind: str = "meanflow"
    fraction: float = 0.25
    tangent: str = "v01"
    p: float = 0.0

    @property
    def name(self) -> str:
        if self.kind == "flow_matching":
            return "flow_matching"
        return f"f{self.fraction:g}_{self.tangent}_p{self.p:g}"


TANGENT_LABEL = {"v01": "(v,0,1) correct", "v00": "(v,0,0)", "v10": "(v,1,0)",
                 "v11": "(v,1,1)"}


def groups(quick: bool) -> dict[str, list[tuple[str, Variant]]]:
    """Ablation group -> [(row label, variant)]; variants shared between groups train once."""
    if quick:
        return {
            "fraction r!=t (p=0)": [(f"{f:.0%}", Variant(fraction=f)) for f in (0.0, 0.25)],
            "JVP tangent (p=0)": [(TANGENT_LABEL[k], Variant(tangent=k)) for k in ("v01", "v10")],
            "loss power p": [(f"p={p:g}", Variant(p=p)) for p in (0.0, 1.0)],
            "flow matching": [("flow matching", Variant(kind="flow_matching", fraction=0.0))],
        }
    out: dict[str, list[tuple[str, Variant]]] = {}
    for p in (0.0, 1.0):
        out[f"fraction r!=t (p={p:g})"] = [(f"{f:.0%}", Variant(fraction=f, p=p))
                                           for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
        out[f"JVP tangent (p={p:g})"] = [(TANGENT_LABEL[k], Variant(tangent=k, p=p))
                                         for k in ("v01", "v00", "v10", "v11")]
    out["loss power p"] = [(f"p={p:g}", Variant(p=p)) for p in (0.0, 0.5, 1.0, 1.5)]
    out["flow matching"] = [("flow matching", Variant(kind="flow_matching", fraction=0.0))]
    return out


def run_config(v: Variant, seed: int, s: dict[str, Any]) -> RunConfig:
    """The run's config; its objective is the variant's except the tangent (:func:`loss_of`)."""
    objective: dict[str, Any] = {"kind": v.kind}
    if v.kind == "meanflow":
        objective.update(fraction_r_neq_t=v.fraction, p=v.p)
    return RunConfig.from_dict({
        "model": {"name": "mlp", "options": {"width": s["width"], "depth": s["depth"],
                                             "emb_dim": s["emb_dim"]}},
        "data": {"name": "8gaussians"},
        "objective": objective,
        "optim": {"lr": s["lr"], "warmup_steps": s["warmup"]},
        "train": {"steps": s["steps"], "batch_size": s["batch"], "seed": seed,
                  "ema_decays": [s["ema"]], "checkpoint_every": s["steps"],
                  "log_every": max(1, s["steps"] // 10), "progress": False,
                  "sample_count": 0, "device": "cpu"},
    }).validate()


def loss_of(v: Variant, cfg: RunConfig) -> MeanFlowLoss | None:
    """The loss to train with instead of the config's objective: that objective with a wrong
    tangent of paper Tab. 1b (not a config setting), or None for the config's own."""
    if v.kind != "meanflow" or v.tangent == "v01":
        return None
    return cfg.objective.build(None, tangent=v.tangent)


# --- evaluation sets and metrics -------------------------------------------------------------

def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).sum(1).mean().sqrt())


def on_mode(points: torch.Tensor, centers: torch.Tensor, std: float) -> float:
    """Share of points within 3 std of a mode centre (98.9 % for the data itself)."""
    d = torch.cdist(points.double(), centers.double()).min(1).values
    return float((d < 3 * std).double().mean())


def build_eval(s: dict[str, Any]) -> dict[str, Any]:
    """Fixed, seeded evaluation sets with their exact answers (computed once for all runs)."""
    ds = build_dataset("8gaussians")
    exact = GaussianMixtureFlow.from_eight_gaussians(ds)
    n, steps = s["n_map"], s["exact_steps"]
    noise = seeded_noise(range(NOISE_SEED0, NOISE_SEED0 + n), (2,), dtype=torch.float64)
    data = ds.batch(n, torch.Generator().manual_seed(DATA_SEED))[0]
    floor = ds.batch(n, torch.Generator().manual_seed(FLOOR_SEED))[0]
    exact_map = exact.one_step_map(noise, steps)
    # held-out (z, r < t) from the training distribution of (r, t): LN(-0.4, 1), t = max, r = min
    g = torch.Generator().manual_seed(HELDOUT_SEED)
    x = ds.batch(s["n_u"], g)[0].double()
    e = torch.randn(s["n_u"], 2, generator=g, dtype=torch.float64)
    r, t = TimeSampler(fraction_r_neq_t=1.0)(s["n_u"], generator=g)
    r, t = r.double(), t.double()
    z = (1 - t[:, None]) * x + t[:, None] * e
    # the uniform grid: every pair r < t on {0, 0.1, ..., 1}, grid_points z_t's per pair
    g = torch.Generator().manual_seed(GRID_SEED)
    pairs = [(a, b) for b in GRID for a in GRID if a < b - 1e-9]
    m = s["grid_points"]
    gr = torch.tensor([a for a, _ in pairs], dtype=torch.float64).repeat_interleave(m)
    gt = torch.tensor([b for _, b in pairs], dtype=torch.float64).repeat_interleave(m)
    gx = ds.batch(gr.numel(), g)[0].double()
    ge = torch.randn(gr.numel(), 2, generator=g, dtype=torch.float64)
    gz = (1 - gt[:, None]) * gx + gt[:, None] * ge
    ev = {
        "exact": exact, "centers": exact.means, "std": ds.std,
        "noise": noise, "data": data, "exact_map": exact_map,
        "heldout": (z, r, t, exact.average_velocity(z, r, t, steps // 2)),
        "heldout_v": exact.marginal_velocity(z, t),
        "grid": (gz, gr, gt, exact.average_velocity(gz, gr, gt, steps // 2)),
        "floor": energy_distance(floor, data),
    }
    # references: the exact map's own energy distance, and Euler on the *exact* velocity
    ref = {"exact_map_energy": energy_distance(exact_map, data),
           "data_vs_data_energy": ev["floor"],
           "exact_map_on_mode": on_mode(exact_map, exact.means, ds.std),
           "data_on_mode": on_mode(floor, exact.means, ds.std)}
    for k in FM_STEPS:
        xk = euler_sample(lambda zz, tt, hh, y=None: exact.marginal_velocity(zz, tt), noise, k)
        ref[f"exact_v_euler{k}_map_rmse"] = rmse(xk, exact_map)
        ref[f"exact_v_euler{k}_energy"] = energy_distance(xk, data)
    ev["reference"] = ref
    return ev


@torch.no_grad()
def evaluate(net: torch.nn.Module, v: Variant, ev: dict[str, Any]) -> dict[str, Any]:
    net = net.double()      # the trained float32 weights, evaluated in float64
    z, r, t, u_true = ev["heldout"]
    out: dict[str, Any] = {"v_rmse": rmse(net(z, t, torch.zeros_like(t)), ev["heldout_v"])}
    noise, data = ev["noise"], ev["data"]
    centers, std = ev["centers"], ev["std"]
    if v.kind == "flow_matching":
        for k in FM_STEPS:
            xk = euler_sample(net, noise, k)
            out[f"euler{k}_map_rmse"] = rmse(xk, ev["exact_map"])
            out[f"euler{k}_energy"] = energy_distance(xk, data)
            out[f"euler{k}_on_mode"] = on_mode(xk, centers, std)
        return out
    out["u_rmse_heldout"] = rmse(net(z, t, t - r), u_true)
    gz, gr, gt, gu = ev["grid"]
    out["u_rmse_grid"] = rmse(net(gz, gt, gt - gr), gu)
    for k in (1, 2):
        xk = sample(net, noise, k)
        out[f"step{k}_map_rmse"] = rmse(xk, ev["exact_map"])
        out[f"step{k}_energy"] = energy_distance(xk, data)
        out[f"step{k}_on_mode"] = on_mode(xk, centers, std)
    return out


# --- reporting ----------------------------------------------------------------------------------

def summarize(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / 2
    return {"mean": mean, "half_range": spread, "values": values}


def fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['half_range']:.{digits}f}"


MF_COLUMNS = [("u RMSE held-out", "u_rmse_heldout"), ("u RMSE grid", "u_rmse_grid"),
              ("v RMSE", "v_rmse"), ("1-step map RMSE", "step1_map_rmse"),
              ("2-step map RMSE", "step2_map_rmse"), ("ED 1-step", "step1_energy"),
              ("ED 2-step", "step2_energy"), ("on-mode 1-step", "step1_on_mode")]


def markdown(results: dict[str, Any]) -> str:
    lines = []
    seeds = results["seeds"]
    agg = results["aggregate"]
    lines.append(f"Seeds {seeds}; mean ± half-range over seeds. RMSE = sqrt(mean ||error||²); "
                 "ED = energy distance to fresh data (floor: data vs data "
                 f"{results['reference']['data_vs_data_energy']:.4f}; exact 1-step map "
                 f"{results['reference']['exact_map_energy']:.4f}).")
    for group, rows in results["groups"].items():
        lines.append("")
        lines.append(f"**{group}**")
        lines.append("")
        if group == "flow matching":
            name = rows[0][1]
            lines.append("| Euler steps | map RMSE | ED | on-mode | exact-v Euler map RMSE "
                         "| exact-v Euler ED |")
            lines.append("|---|---|---|---|---|---|")
            for k in FM_STEPS:
                ref = results["reference"]
                lines.append(f"| {k} | {fmt(agg[name][f'euler{k}_map_rmse'])} "
                             f"| {fmt(agg[name][f'euler{k}_energy'], 4)} "
                             f"| {fmt(agg[name][f'euler{k}_on_mode'])} "
                             f"| {ref[f'exact_v_euler{k}_map_rmse']:.3f} "
                             f"| {ref[f'exact_v_euler{k}_energy']:.4f} |")
            lines.append(f"\n(flow matching v RMSE {fmt(agg[name]['v_rmse'])})")
            continue
        lines.append("| setting | " + " | ".join(c for c, _ in MF_COLUMNS) + " |")
        lines.append("|---" * (len(MF_COLUMNS) + 1) + "|")
        for label, name in rows:
            cells = [fmt(agg[name].get(key), 4 if "energy" in key else 3)
                     for _, key in MF_COLUMNS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(path: Path, samples: dict[str, torch.Tensor], results: dict[str, Any],
           ev: dict[str, Any], n: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec

    agg = results["aggregate"]
    # each noise point is coloured by the angle of its *exact* destination, so a learned map
    # that sends it to the wrong mode shows as a mixed-colour cluster
    target = ev["exact_map"][:n]
    colors = plt.cm.hsv(((torch.atan2(target[:, 1], target[:, 0]) + math.pi)
                         / (2 * math.pi)).numpy())
    panels = [("exact 1-step map", target)] + [
        (title, samples[name][:n]) for title, name in results["figure_panels"]
        if name in samples]
    ncols = 6
    nrows = math.ceil(len(panels) / ncols)
    fig = plt.figure(figsize=(3.0 * ncols, 3.1 * nrows + 3.4))
    gs = GridSpec(nrows + 1, 12, figure=fig, height_ratios=[1] * nrows + [1.15])
    for i, (title, pts) in enumerate(panels):
        ax = fig.add_subplot(gs[i // ncols, 2 * (i % ncols):2 * (i % ncols) + 2])
        ax.scatter(pts[:, 0], pts[:, 1], s=1.2, c=colors, linewidths=0)
        ax.set_title(title, fontsize=8.5)
        ax.set_xlim(-6.5, 6.5)
        ax.set_ylim(-6.5, 6.5)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    bars = [g for g in results["groups"] if g != "flow matching"]
    width = 12 // max(1, len(bars) + 1)
    for j, group in enumerate(bars + ["flow matching"]):
        ax = fig.add_subplot(gs[nrows, j * width:(j + 1) * width])
        rows = results["groups"][group]
        if group == "flow matching":
            name = rows[0][1]
            labels = [f"FM {k}" for k in FM_STEPS]
            keys = [f"euler{k}_map_rmse" for k in FM_STEPS]
        else:
            labels = [label.replace(" correct", "") for label, _ in rows]
            keys = ["step1_map_rmse"] * len(rows)
        stats = [agg[name if group == "flow matching" else rows[i][1]][keys[i]]
                 for i in range(len(labels))]
        means = [st["mean"] for st in stats]
        errs = [st["half_range"] for st in stats]
        ax.bar(range(len(labels)), means, yerr=errs, color="tab:blue", capsize=2)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
        what = "map RMSE vs exact, K Euler steps" if group == "flow matching" \
            else "1-step map RMSE vs exact"
        ax.set_title(f"{group}\n{what}", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)


FIGURE_PANELS = [("fraction 0 % (p=0)", "f0_v01_p0"), ("fraction 25 % (p=0)", "f0.25_v01_p0"),
                 ("fraction 50 % (p=0)", "f0.5_v01_p0"), ("fraction 75 % (p=0)", "f0.75_v01_p0"),
                 ("fraction 100 % (p=0)", "f1_v01_p0"), ("tangent (v,0,0) (p=0)", "f0.25_v00_p0"),
                 ("tangent (v,1,0) (p=0)", "f0.25_v10_p0"),
                 ("tangent (v,1,1) (p=0)", "f0.25_v11_p0"),
                 ("p = 0.5", "f0.25_v01_p0.5"), ("p = 1", "f0.25_v01_p1"),
                 ("p = 1.5", "f0.25_v01_p1.5"), ("flow matching, 1 Euler step", "flow_matching")]


# --- main -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke-test run (seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default docs/data/toy_ablations.json; with --quick "
                             "runs/toy_ablations_quick/toy_ablations.json)")
    parser.add_argument("--figure", type=Path, default=None,
                        help="figure PNG (default docs/toy-ablations.png, or beside --quick's)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the trained runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny nets: one thread is as fast, and shares the machine

    s = dict(QUICK if args.quick else FULL)
    if args.steps is not None:
        s["steps"] = args.steps
    default_dir = Path("runs/toy_ablations_quick") if args.quick else None
    out = args.out or (default_dir / "toy_ablations.json" if default_dir
                       else Path("docs/data/toy_ablations.json"))
    fig_path = args.figure or (out.parent / "toy-ablations.png" if args.quick or args.out
                               else Path("docs/toy-ablations.png"))
    start = time.perf_counter()
    grp = groups(args.quick)
    variants: dict[str, Variant] = {}
    for rows in grp.values():
        for _, v in rows:
            variants.setdefault(v.name, v)

    t_eval = time.perf_counter()
    ev = build_eval(s)
    eval_setup_s = time.perf_counter() - t_eval
    print(f"exact fields and evaluation sets ready in {eval_setup_s:.1f} s", flush=True)

    per_run: dict[str, dict[str, Any]] = {name: {} for name in variants}
    samples: dict[str, torch.Tensor] = {}
    total = len(variants) * len(args.seeds)
    count = 0
    tmp = tempfile.TemporaryDirectory(prefix="toy_ablations_") if args.runs_dir is None else None
    runs_root = Path(tmp.name) if tmp is not None else args.runs_dir
    try:
        for seed in args.seeds:
            for name, v in variants.items():
                count += 1
                run_dir = runs_root / f"{name}_seed{seed}"
                t0 = time.perf_counter()
                cfg = run_config(v, seed, s)
                train(cfg, run_dir, resume=True, loss_fn=loss_of(v, cfg))
                train_s = time.perf_counter() - t0
                net = load_model(run_dir).net
                metrics = evaluate(net, v, ev)
                metrics["train_seconds"] = round(train_s, 2)
                metrics["eval_seconds"] = round(time.perf_counter() - t0 - train_s, 2)
                per_run[name][str(seed)] = metrics
                if seed == args.seeds[0]:
                    noise = ev["noise"][:s["n_figure"]]
                    samples[name] = (euler_sample(net, noise, 1) if v.kind == "flow_matching"
                                     else sample(net, noise, 1))
                key = "euler1" if v.kind == "flow_matching" else "step1"
                print(f"[{count}/{total}] {name} seed {seed}: train {train_s:.1f} s, "
                      f"1-step map RMSE {metrics[key + '_map_rmse']:.3f}, "
                      f"ED {metrics[key + '_energy']:.4f}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    aggregate = {name: {key: summarize([per_run[name][str(sd)][key] for sd in args.seeds])
                        for key in per_run[name][str(args.seeds[0])]}
                 for name in variants}
    results: dict[str, Any] = {
        "description": "MeanFlow Table 1 ablations on the 8-Gaussian ring against the exact "
                       "average velocity and 1-step map (experiments/toy_ablations.py)",
        "command": "python experiments/toy_ablations.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "seeds": args.seeds,
        "settings": s,
        "base_config": run_config(Variant(), args.seeds[0], s).to_dict(),
        "variants": {name: vars(v) | {"name": name} for name, v in variants.items()},
        "groups": {g: [[label, v.name] for label, v in rows] for g, rows in grp.items()},
        "figure_panels": [[t, n] for t, n in FIGURE_PANELS if n in variants],
        "metrics_definition": {
            "u_rmse_heldout": "RMSE of net u(z_t, r, t) vs exact u, (r < t) = (min, max) of two "
                              "LN(-0.4, 1) draws, z_t = (1-t) x + t e",
            "u_rmse_grid": "the same on all pairs r < t of {0, 0.1, ..., 1}, "
                           f"{s['grid_points']} z_t per pair",
            "v_rmse": "RMSE of net u(z_t, t, t) vs the exact marginal velocity v(z_t, t)",
            "stepK_map_rmse": "RMSE of the K-step MeanFlow sample vs the exact 1-step map "
                              "of the same noise",
            "eulerK_map_rmse": "RMSE of K Euler steps of flow matching vs the exact map",
            "energy": "energy distance (U-statistic) to fresh data, n_map points each",
            "on_mode": "share of samples within 3 std of a mode centre",
        },
        "reference": ev["reference"],
        "per_run": per_run,
        "aggregate": aggregate,
        "eval_setup_seconds": round(eval_setup_s, 2),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    figure(fig_path, samples, results, ev, s["n_figure"])
    results["figure"] = str(fig_path)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    print(table)
    print(f"\nwall time {results['wall_seconds']:.0f} s; results {out}; figure {fig_path}")
    return results


if __name__ == "__main__":
    main()
