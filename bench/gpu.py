"""The GPU check: one command for the first minutes on a CUDA machine (docs/gpu.md).

    python -m bench.gpu [--out DIR]          # DIR: $OUT if set, else out/gpu
    python -m bench.gpu --only toy engines   # a rerun of some steps

Each step runs in its own process group, with its own time limit and log in DIR; all of it ends
within 8 minutes (the limits are cut to what is left). The order puts first what no CPU run
can check:
  tiles    the default Triton tiles at the real LLaVA shapes, bf16 and fp16, vs fp32
  fsdp     tests/test_fsdp.py, with FSDP's CUDA side-stream path (2 gloo ranks on the GPU)
  toy      toy stage 2 (tower trained, checkpointing) in bf16 with the Triton kernels, then with
           PyTorch's: the two loss curves must agree
  engines  the same with --fsdp nano and --fsdp torch under torchrun, NCCL, one rank: they must agree
  mfu      training steps of a 1.4B LLaVA (CLIP-L/336 + a 1.1B LLaMA): MFU (target >= 40%)
  decode   batch-1 decoding of a Vicuna-7B-shaped LLM: tokens/s vs the HBM bound (target >= 70%)
  bench    python -m nanollava.kernels.bench: Triton vs SDPA and nn.RMSNorm at the LLaVA-1.5 shapes,
           against the targets (attention >= 1.0x SDPA at ViT, >= 0.9x at Vicuna; RMSNorm >= 70%
           of HBM bandwidth and faster than nn.RMSNorm)
  kernels  the rest of tests/test_kernels.py (small tiles, every feature) on CUDA
Then it prints one table and writes DIR/benchmarks.md, a dated section with the machine, the
commit, the table and the kernel benchmark's output, to paste into BENCHMARKS.md. It needs the
repository, torch and triton, nothing else: no network, no easy-vqa, no model files (the toy
inputs and the big models are made up on the spot, bench/gpu_checks.py). Without CUDA it says
so and exits 0.
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
TILE_TESTS = "default_tiles or llama_shapes"


def steps(work):
    """(name, commands run one after the other, time limit s, what it checks). A step whose last
    command writes WORK/<name>.json (bench/gpu_checks.py --rows) gives those rows to the table;
    a pytest step gives pytest's summary line."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--durations=5"]
    # kernel tests spend their time compiling: 4 pytest-xdist workers compile 4 kernels at a time
    kernel_tests = pytest + (["-n", "4"] if importlib.util.find_spec("xdist") else []) + ["tests/test_kernels.py"]
    checks = [py, "-m", "bench.gpu_checks"]
    toy = os.path.join(work, "toy")
    make_toy = checks + ["toy", toy]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]

    def train(out, kernels, launcher=(py,), *flags):
        return ["env", f"NANOLLAVA_KERNELS={kernels}", *launcher, "train.py", "--stage", "2", "--device", "cuda",
                "--dtype", "bfloat16", "--vision-tower", f"{toy}/clip", "--llm", f"{toy}/llama",
                "--data", f"{toy}/stage2.json", "--image-folder", f"{toy}/images",
                "--stage1-out", f"{toy}/mm_projector.safetensors", "--global-batch", "16", "--micro-batch", "8",
                "--epochs", "2", "--lr", "1e-3", "--train-vision-tower", "--grad-checkpointing",
                "--out", os.path.join(work, out), *flags]

    def compare(name, a, b, rtol, check):
        return checks + ["compare", os.path.join(work, a), os.path.join(work, b), "--rtol", str(rtol),
                         "--check", check, "--rows", os.path.join(work, f"{name}.json")]

    bench_json = os.path.join(work, "kernels_bench.json")
    return [
        ("tiles", [kernel_tests + ["-k", TILE_TESTS]], 150, "default tiles, real shapes"),
        ("fsdp", [pytest + ["tests/test_fsdp.py"]], 60, "FSDP incl. CUDA side streams"),
        ("toy", [make_toy, train("toy_triton", "triton"), train("toy_torch", "torch"),
                 compare("toy", "toy_triton", "toy_torch", 0.02, "toy stage 2, bf16: Triton vs PyTorch kernels")],
         120, "toy stage 2, Triton vs PyTorch"),
        ("engines", [make_toy, train("fsdp_nano", "auto", torchrun, "--fsdp", "nano"),
                     train("fsdp_torch", "auto", torchrun, "--fsdp", "torch"),
                     compare("engines", "fsdp_nano", "fsdp_torch", 0.005, "toy stage 2, bf16, NCCL: --fsdp nano vs torch")],
         90, "--fsdp nano vs torch"),
        ("mfu", [checks + ["mfu", "--shape", "1b", "--rows", os.path.join(work, "mfu.json")]], 90, "training MFU"),
        ("decode", [checks + ["decode", "--shape", "7b", "--rows", os.path.join(work, "decode.json")]], 60,
         "7B decode"),
        ("bench", [[py, "-m", "nanollava.kernels.bench", "--json", bench_json],
                   checks + ["kernels", bench_json, "--rows", os.path.join(work, "bench.json")]], 100, "nanollava.kernels.bench"),
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


def summary(name, what, rc, secs, out, work):
    """The step's table rows (step, check, result, target, s): the rows its last command wrote,
    else pytest's last line."""
    text = open(os.path.join(out, f"{name}.log"), errors="replace").read()
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    rows_path = os.path.join(work, f"{name}.json")
    pytest_line = next((l.strip("= ") for l in reversed(lines) if " in " in l and any(
        w in l for w in ("passed", "failed", "skipped", "error"))), None)
    if rc == "timeout":
        rows = [[what, f"TIMEOUT (last: {lines[-1][:80] if lines else 'no output'})", "-"]]
    elif os.path.isfile(rows_path):
        rows = json.load(open(rows_path))
    elif pytest_line:
        rows = [[what, pytest_line, "all pass"]]
    else:
        rows = [[what, f"FAILED rc={rc} (last: {lines[-1][:80] if lines else 'no output'})" if rc else "ok", "-"]]
    return [(name if i == 0 else "", *row, f"{secs:.0f}" if i == 0 else "") for i, row in enumerate(rows)]


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
    rows, failed = [], []
    with tempfile.TemporaryDirectory() as work:                # toy inputs and runs stay out of OUT
        for name, cmd, limit, what in steps(work):
            if args.only and name not in args.only:
                continue
            left = BUDGET_S - (time.time() - started)
            if left < 20:
                rows.append((name, what, "SKIPPED: out of time", "-", "0"))
            else:
                rc, secs = run_step(name, cmd, min(limit, left), args.out)
                rows += summary(name, what, rc, secs, args.out, work)
                failed += [name] if rc != 0 else []
            for row in rows[[r[0] for r in rows].index(name):]:
                print(f"{row[0]:8s} {row[4]:>4s}s  {row[1]}: {row[2]} (target {row[3]})", flush=True)
        with open(os.path.join(args.out, "train_metrics.jsonl"), "w") as f:   # every training run, one file
            for run in sorted(os.listdir(work)):
                path = os.path.join(work, run, "metrics.jsonl")
                if os.path.isfile(path):
                    f.writelines(json.dumps({"run": run, **json.loads(l)}) + "\n" for l in open(path))

    table = ["| step | check | result | target | s |", "|---|---|---|---|---:|"]
    table += ["| " + " | ".join(row) + " |" for row in rows]
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
