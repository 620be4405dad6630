"""A compact table of the JSON-lines records the benchmark scripts write (``--json PATH``).

One table per kind of record: training steps (``step_cost.py``: MeanFlow/FM time, its ratio to
the 4/3 floor, peak memory and its ratio, du/dt error of a compiled or bf16 path), interleaved
ratios (``step_interleaved.py``), sampling (``sample_speed.py``), attention JVP
(``attention_jvp.py``), sharded against one-process samples (the GPU suite's item (g)) and the
suite's skipped or failed items. The GPU suite ends with it:

    python benchmarks/summarize.py PATH.jsonl [MORE.jsonl ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as tm  # noqa: E402


def _mode(r: dict) -> str:
    if not r.get("compile"):
        return "eager"
    return "c-los" if r.get("compile_scope") == "loss" else "c-mod"


def _err(r: dict):
    return r.get("err_vs_eager", r.get("err_bf16_vs_fp32"))


def _note(r: dict) -> str:
    note = r.get("attn_path") or ""
    if r.get("status", "ok") != "ok":
        note = f"{r.get('error')}" + (f" | {note}" if note else "")
    return note[:90]


# per kind of record: (header, width, value of the record, format)
TABLES = {
    "step": [("model", 12, "model", "s"), ("batch", 5, "batch", "d"), ("amp", 4, "amp", "s"),
             ("mode", 5, _mode, "s"), ("strategy", 10, "strategy", "s"),
             ("status", 7, "status", "s"), ("ms FM", 8, "fm_ms", ".2f"),
             ("ms MF", 8, "mf_ms", ".2f"), ("MF/FM", 6, "ratio", ".2f"),
             ("/(4/3)", 6, "ratio_to_floor", ".2f"), ("MiB FM", 7, "fm_peak_mib", ".0f"),
             ("MiB MF", 7, "mf_peak_mib", ".0f"), ("mem", 5, "peak_ratio", ".2f"),
             ("img/s MF", 8, "mf_img_s", ".0f"), ("err", 7, _err, ".1e"),
             ("attention / notes", 0, _note, "s")],
    "step_interleaved": [("model", 12, "model", "s"), ("batch", 5, "batch", "d"),
                         ("config", 20, "config", "s"), ("ms FM", 8, "fm_ms", ".1f"),
                         ("ms MF", 8, "mf_ms", ".1f"), ("MF/FM", 6, "ratio_median", ".2f"),
                         ("min", 5, "ratio_min", ".2f"), ("max", 5, "ratio_max", ".2f")],
    "sample": [("sampling", 12, "model", "s"), ("batch", 5, "batch", "d"),
               ("amp", 4, "amp", "s"), ("mode", 5, _mode, "s"), ("NFE", 3, "steps", "d"),
               ("status", 7, "status", "s"), ("ms", 8, "ms", ".2f"), ("img/s", 8, "img_s", ".0f"),
               ("MiB", 7, "peak_mib", ".0f"), ("attention / notes", 0, _note, "s")],
    "attention_jvp": [("attention JVP", 14, "device", "s"), ("dtype", 5, "dtype", "s"),
                      ("tokens", 6, "tokens", "d"), ("batch", 5, "batch", "d"),
                      ("fwd ms", 8, "fwd_ms", ".3f"), ("math ms", 8, "math_ms", ".3f"),
                      ("chunk ms", 8, "chunk_ms", ".3f"), ("tri ms", 8, "triton_ms", ".3f"),
                      ("MiB math", 8, "math_mib", ".0f"), ("MiB chunk", 9, "chunk_mib", ".0f"),
                      ("err chunk", 9, "chunk_err", ".1e")],
    "attention_jvp_triton": [("triton JVP", 14, "device", "s"), ("dtype", 5, "dtype", "s"),
                             ("tokens", 6, "tokens", "d"), ("batch", 5, "batch", "d"),
                             ("fwd ms", 8, "fwd_ms", ".3f"), ("jvp/fwd", 7, "jvp_per_fwd", ".2f"),
                             ("kern/fwd", 8, "kernel_per_fwd", ".2f"),
                             ("saved/fwd", 9, "saved_per_fwd", ".2f"),
                             ("err jvp", 8, "jvp_err", ".1e")],
    "sharded_sampling": [("sampling ranks", 14, "ranks", "d"), ("n", 5, "n", "d"),
                         ("max |diff| vs 1 process", 23, "max_abs_diff", ".3g")],
    "suite": [("suite item", 30, "item", "s"), ("status", 8, "status", "s"),
              ("seconds", 7, "seconds", "d"), ("note", 0, "note", "s")],
}


def _cell(r: dict, get, fmt: str, width: int) -> str:
    value = get(r) if callable(get) else r.get(get)
    if fmt != "s" and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = format(value, fmt)
    else:
        text = "-" if value is None else str(value)
    return f"{text:>{width}}" if fmt != "s" else f"{text:{width}}"


def main(paths: list[str] | None = None) -> None:
    records = []
    for path in paths if paths is not None else sys.argv[1:]:
        if Path(path).exists():
            records += tm.read_json_lines(path)
        else:
            print(f"# {path}: no such file")
    for d in sorted({f"{r['device']} / torch {r.get('torch')}" for r in records
                     if r.get("device") and r.get("torch")}):
        print(f"# {d}")
    print("# mode: eager, c-mod = torch.compile(model), c-los = the whole loss compiled; "
          "err: compiled du/dt vs eager (else bf16 vs fp32 du/dt)")
    for kind, columns in TABLES.items():
        rows = [r for r in records if r.get("bench") == kind]
        if rows:
            print(" ".join(f"{h:{w}}" if fmt == "s" else f"{h:>{w}}"
                           for h, w, _, fmt in columns).rstrip())
            for r in rows:
                print(" ".join(_cell(r, get, fmt, w) for _, w, get, fmt in columns).rstrip())


if __name__ == "__main__":
    main()
