"""The GPU check: one command for the first minutes on a CUDA machine (docs/gpu.md).

    python -m bench.gpu [--out DIR]          # DIR: $OUT if set, else out/gpu
    python -m bench.gpu --only tiles fsdp    # a rerun of some steps

Each step runs in its own process, with its own time limit and log in DIR; all of it ends
within 8 minutes (the limits are cut to what is left). The order puts first what no CPU run
can check:
  tiles    the default Triton tiles at the real LLaVA shapes, bf16 and fp16, vs fp32
  fsdp     tests/test_fsdp.py, with FSDP's CUDA side-stream path (2 gloo ranks on the GPU)
  train    toy stage 1 (6 steps) then stage 2 with the vision tower trained (4 steps), on CUDA
  bench    python -m nanollava.kernels.bench: Triton vs SDPA and nn.RMSNorm at the LLaVA-1.5 shapes
  kernels  the rest of tests/test_kernels.py (small tiles, every feature) on CUDA
Then it prints one table and writes DIR/benchmarks.md, a dated section with the machine, the
commands and their numbers, for BENCHMARKS.md. It needs the repository, torch and triton (no
network, no easy-vqa) and, for `train`, the git-ignored toy inputs data/toy, out/toy/clip and
out/toy/llama. Without CUDA it says so and exits 0.
"""
import argparse
import datetime
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET_S = 450                     # every step together: the whole command ends within 8 minutes
TOY_INPUTS = ("data/toy", "out/toy/clip", "out/toy/llama")
TILE_TESTS = "default_tiles or llama_shapes"


def steps(work):
    """(name, commands run one after the other, time limit s, what it checks)."""
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=5"]
    # kernel tests spend their time compiling: 4 pytest-xdist workers compile 4 kernels at a time
    kernel_tests = pytest + (["-n", "4"] if importlib.util.find_spec("xdist") else []) + ["tests/test_kernels.py"]
    train = [sys.executable, "train.py", "--device", "cuda", "--global-batch", "32", "--micro-batch", "8"]
    s1, s2 = os.path.join(work, "stage1"), os.path.join(work, "stage2")
    return [
        ("tiles", [kernel_tests + ["-k", TILE_TESTS]], 170, "default tiles, real shapes"),
        ("fsdp", [pytest + ["tests/test_fsdp.py"]], 70, "FSDP incl. CUDA side streams"),
        ("train", [train + ["--stage", "1", "--max-steps", "6", "--out", s1],
                   train + ["--stage", "2", "--stage1-out", s1, "--max-steps", "4", "--out", s2,
                            "--train-vision-tower", "--grad-checkpointing"]], 100, "toy stage 1 + 2"),
        ("bench", [[sys.executable, "-m", "nanollava.kernels.bench"]], 100, "nanollava.kernels.bench"),
        ("kernels", [kernel_tests + ["-k", f"not ({TILE_TESTS})"]], 240, "kernel tests"),
    ]


def run_step(name, cmds, limit, out):
    """Run a step's commands while they succeed, within the time limit; their stdout + stderr go
    to OUT/<name>.log. Returns (exit status or "timeout", seconds)."""
    t0, rc = time.time(), 0
    env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1", CI="true")
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        for cmd in cmds:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            # its own process group: on timeout, its children (ranks, workers) end with it
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    preexec_fn=os.setpgrp)
            try:
                rc = proc.wait(timeout=max(1, limit - (time.time() - t0)))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
            if rc != 0:
                break
    return rc, time.time() - t0


def summary(name, rc, out, work):
    """One line for the table: pytest's last line, or the training's last step."""
    text = open(os.path.join(out, f"{name}.log"), errors="replace").read()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    if rc == "timeout":
        return f"TIMEOUT (last: {lines[-1][:80] if lines else 'no output'})"
    if name == "train":
        recs = []
        for stage in ("stage1", "stage2"):
            path = os.path.join(work, stage, "metrics.jsonl")
            if os.path.isfile(path):
                recs.append((stage, [json.loads(l) for l in open(path)]))
        parts = [f"{s}: {len(r)} steps, loss {r[0]['loss']:.3f} -> {r[-1]['loss']:.3f}, "
                 f"{sorted(x['tokens_per_s'] for x in r)[len(r) // 2]:,.0f} tok/s" for s, r in recs if r]
        return ("ok" if rc == 0 else f"FAILED rc={rc}") + ("; " + "; ".join(parts) if parts else "")
    if name == "bench":
        return "ok" if rc == 0 else f"FAILED rc={rc}"
    return next((l.strip("= ") for l in reversed(lines)
                 if " in " in l and any(w in l for w in ("passed", "failed", "skipped", "error"))), f"rc={rc}")


def machine():
    props = torch.cuda.get_device_properties(0)
    import triton
    return (f"{torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}, "
            f"{props.multi_processor_count} SMs), torch {torch.__version__}, Triton {triton.__version__}, "
            f"Python {platform.python_version()}")


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu"),
                   help="where the logs and benchmarks.md go")
    p.add_argument("--only", nargs="+", choices=[step[0] for step in steps("")], help="run these steps only")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check.")
        return 0
    os.makedirs(args.out, exist_ok=True)
    started, when = time.time(), datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"bench.gpu {when}: {machine()}; logs in {args.out}", flush=True)
    missing = [p for p in TOY_INPUTS if not os.path.isdir(os.path.join(ROOT, p))]
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as work:                # training outputs stay out of OUT
        for name, cmd, limit, what in steps(work):
            if args.only and name not in args.only:
                continue
            left = BUDGET_S - (time.time() - started)
            if name == "train" and missing:
                rows.append((name, what, f"SKIPPED: copy the git-ignored {', '.join(missing)} here", 0.0))
            elif left < 20:
                rows.append((name, what, "SKIPPED: out of time", 0.0))
            else:
                rc, secs = run_step(name, cmd, min(limit, left), args.out)
                rows.append((name, what, summary(name, rc, args.out, work), secs))
                failed += [name] if rc != 0 else []
            print(f"{rows[-1][0]:8s} {rows[-1][3]:6.0f}s  {rows[-1][2]}", flush=True)
        with open(os.path.join(args.out, "train_metrics.jsonl"), "w") as f:   # both stages, one file
            for stage in ("stage1", "stage2"):
                path = os.path.join(work, stage, "metrics.jsonl")
                if os.path.isfile(path):
                    f.writelines(json.dumps({"stage": stage, **json.loads(l)}) + "\n" for l in open(path))

    table = ["| step | checks | result | s |", "|---|---|---|---:|"]
    table += [f"| {n} | {w} | {r} | {s:.0f} |" for n, w, r, s in rows]
    bench_log = os.path.join(args.out, "bench.log")
    bench = open(bench_log).read().strip() if os.path.isfile(bench_log) else "(not run)"
    with open(os.path.join(args.out, "benchmarks.md"), "w") as f:
        f.write(f"## GPU check, {when}\n\n{machine()}, commit {commit()}.\n\n"
                f"```\npython3 -m bench.gpu{' --only ' + ' '.join(args.only) if args.only else ''}"
                f"      # {time.time() - started:.0f} s in all\n```\n\n"
                + "\n".join(table) + f"\n\n`python -m nanollava.kernels.bench`:\n\n```\n{bench}\n```\n")
    print("\n" + "\n".join(table))
    print(f"\n{time.time() - started:.0f} s; {os.path.join(args.out, 'benchmarks.md')} is ready for BENCHMARKS.md"
          + (f"; FAILED: {', '.join(failed)} (see their logs)" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
