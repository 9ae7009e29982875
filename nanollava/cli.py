"""argparse types shared by train.py, eval.py and sample.py: a bad value is one line from
argparse ("error: argument --max-new-tokens: -5 is not a positive integer"), never a traceback
or a run that starts and then does something silly."""
import argparse

DTYPES = ("float32", "bfloat16", "float16")


def _number(kind, ok, what):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {what}")
        return value
    parse.__name__ = what                                 # argparse names the type in some errors
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0 and v != float("inf"), "a positive number")
non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
fraction = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
probability = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def device(text):
    """A torch device this machine has: cpu, cuda, cuda:N (N < the GPU count), mps."""
    import torch                                          # here: scoring-only eval.py runs without torch
    try:
        d = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: torch sees no GPU on this machine (use --device cpu)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if d.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text}: MPS is not available on this machine")
    return text
