"""Cost of a MeanFlow training step relative to flow matching, per du/dt strategy.

For each strategy it prints the time of one MeanFlow step (loss + backward) divided by one
flow-matching step on the same backbone and batch, the bytes saved for backward (activation
memory) relative to flow matching, and on CUDA the peak allocated memory ratio. The floor for a
matmul-bound net is about 4/3: the JVP adds one forward's work to FM's forward + backward.

It also counts the matrix products of one loss evaluation per strategy, to show whether the
parameters' zero tangents cost an extra GEMM per layer (the eager PyTorch behaviour noted in
JVP-NOTES): the tangent needs exactly one extra product per Linear layer, the zero-tangent path
two or more.

    python benchmarks/step_cost.py [--model mlp] [--batch 256] [--device cpu] [--repeats 20]
                                   [--threads N] [--native-linear]
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch

from meanflow import JVP_STRATEGIES, FlowMatchingLoss, MeanFlowLoss
from meanflow.models import build_model

# backbone name -> (options, shape of one sample); small enough for a CPU
PRESETS = {
    "mlp": ({"dim": 2, "width": 256, "depth": 4, "emb_dim": 64}, (2,)),
    "dit-s/2": ({"in_channels": 4, "input_size": 8}, (4, 8, 8)),
    "unet-small": ({"in_channels": 1, "input_size": 28}, (1, 28, 28)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _saved_bytes(fn) -> int:
    """Bytes of distinct tensor storages that ``fn``'s autograd graph keeps for backward.

    Tensors packed by a no-grad pass (the split strategies' JVP) are freed when it ends, so
    only what is still alive while the graph exists is counted.
    """
    packed: list[weakref.ref] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        keep = fn()  # noqa: F841  (holds the graph while we count)
    storages = {}
    for ref in packed:
        t = ref()
        if t is not None:
            try:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a forward-AD dual's storage cannot be inspected: count it
                storages[id(t)] = t.numel() * t.element_size()
    del keep
    return sum(storages.values())


def _time(step, repeats: int, device: torch.device) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _count_products(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::addmm", "aten::bmm", "aten::convolution")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mlp", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=None,
                        help="default 256 for mlp, 16 for DiT")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--native-linear", action="store_true",
                        help="build the backbone with torch.nn.Linear instead of meanflow's "
                        "JVP-lean Linear, to measure what the lean rule saves")
    args = parser.parse_args()
    if args.native_linear:
        import meanflow.models.embeddings
        import meanflow.models.mlp
        meanflow.models.mlp.Linear = torch.nn.Linear
        meanflow.models.embeddings.Linear = torch.nn.Linear
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 256 if args.model == "mlp" else 16
    device = torch.device(args.device)
    torch.manual_seed(0)
    options, shape = PRESETS[args.model]
    net = build_model(args.model, **options).to(device)
    if args.model != "mlp":  # zero-initialised outputs start at u = 0; use a trained-like net
        with torch.no_grad():
            for p in net.parameters():
                p.normal_(0.0, 0.02)
    x = torch.randn(args.batch, *shape, device=device)

    def make_step(loss_fn):
        def step() -> None:
            loss, _ = loss_fn(net, x)
            loss.mean().backward()
            net.zero_grad(set_to_none=True)
        return step

    def peak(step) -> int:
        if device.type != "cuda":
            return 0
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device)

    fm = FlowMatchingLoss()
    fm_step = make_step(fm)
    fm_time = _time(fm_step, args.repeats, device)
    fm_saved = _saved_bytes(lambda: fm(net, x))
    fm_peak = peak(fm_step)
    print(f"# {args.model} {options}, batch {args.batch}, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'torch.nn.Linear' if args.native_linear else 'meanflow Linear'}")
    print(f"flow matching step: {fm_time * 1e3:.2f} ms, "
          f"{args.batch / fm_time:.0f} samples/s")
    print(f"{'strategy':18s} {'ms/step':>9s} {'time/FM':>8s} {'/(4/3)':>6s} "
          f"{'saved/FM':>9s} {'peak/FM':>8s}")
    for strategy in JVP_STRATEGIES:
        mf = MeanFlowLoss(jvp=strategy, fraction_r_neq_t=1.0)
        mf_step = make_step(mf)
        mf_time = _time(mf_step, args.repeats, device)
        saved = _saved_bytes(lambda: mf(net, x)) / max(fm_saved, 1)
        peak_ratio = f"{peak(mf_step) / fm_peak:8.2f}" if fm_peak else f"{'n/a':>8s}"
        ratio = mf_time / fm_time
        print(f"{strategy:18s} {mf_time * 1e3:9.2f} {ratio:8.2f} {ratio / (4 / 3):6.2f} "
              f"{saved:9.2f} {peak_ratio}")

    # Matrix products of one loss evaluation (no backward). FM's is one forward; a MeanFlow
    # step adds the JVP, which needs exactly one more product per Linear layer (the input
    # tangent times the weights) when the weights' zero tangent is skipped.
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    n_attn = sum(type(m).__name__ == "Attention" for m in net.modules())
    counts = {"flow matching": _count_products(lambda: fm(net, x))}
    for strategy in JVP_STRATEGIES:
        mf = MeanFlowLoss(jvp=strategy, fraction_r_neq_t=1.0)
        counts[strategy] = _count_products(lambda: mf(net, x))
    print(f"matrix products per loss evaluation, {n_linear} Linear layers"
          + (f" and {n_attn} attention layers (whose own products add to these)" if n_attn
             else f" (least possible: split {3 * n_linear} = JVP {2 * n_linear} + grad "
                  f"forward {n_linear}; joint {2 * n_linear})") + ":")
    print("  " + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
