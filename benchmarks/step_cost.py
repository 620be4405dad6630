"""Cost of a MeanFlow training step relative to flow matching, per du/dt strategy.

For each strategy it prints the time of one MeanFlow step (loss + backward) divided by one
flow-matching step on the same backbone and batch, the bytes saved for backward (activation
memory) relative to flow matching, and on CUDA the peak allocated memory ratio. The floor for a
matmul-bound net is about 4/3: the JVP adds one forward's work to FM's forward + backward.

It also counts the matrix products of one JVP pass against one forward pass, to show whether
the parameters' zero tangents cost an extra GEMM per layer (the eager PyTorch behaviour noted in
JVP-NOTES): the tangent needs exactly one extra product per Linear layer, the zero-tangent path
would need two.

    python benchmarks/step_cost.py [--model mlp] [--batch 256] [--device cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref

import torch
from torch.autograd import forward_ad

from meanflow import JVP_STRATEGIES, FlowMatchingLoss, MeanFlowLoss
from meanflow.models import build_model

PRESETS = {  # backbone options per benchmark size (later backbones add theirs here)
    "mlp": {"dim": 2, "width": 256, "depth": 4, "emb_dim": 64},
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
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
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
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = build_model(args.model, **PRESETS[args.model]).to(device)
    x = torch.randn(args.batch, PRESETS[args.model]["dim"], device=device)

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
    print(f"# {args.model} {PRESETS[args.model]}, batch {args.batch}, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
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

    t = torch.rand(args.batch, device=device)
    v = torch.randn_like(x)

    def forward_ad_pass() -> None:
        with forward_ad.dual_level():
            out = net(forward_ad.make_dual(x, v), forward_ad.make_dual(t, torch.ones_like(t)),
                      forward_ad.make_dual(t, torch.ones_like(t)))
            forward_ad.unpack_dual(out)

    with torch.no_grad():
        n_fwd = _count_products(lambda: net(x, t, t))
        n_func = _count_products(lambda: torch.func.jvp(
            lambda z, tt: net(z, tt, tt), (x, t), (v, torch.ones_like(t))))
        n_fad = _count_products(forward_ad_pass)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in net.modules())
    print(f"matrix products for {n_linear} Linear layers: forward {n_fwd}, "
          f"func.jvp {n_func}, forward_ad {n_fad}")
    print("  a JVP needs 2 per layer (primal + input tangent); 3 or more means the weights' "
          "zero tangent is multiplied too")


if __name__ == "__main__":
    main()
