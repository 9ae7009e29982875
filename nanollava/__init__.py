"""nanollava: a minimal, readable LLaVA-1.5 / LLaVA-NeXT in PyTorch."""
from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
from nanollava.llava import LLaVA
from nanollava import checkpoint

# The loading boundary depends on the model, never the reverse: the model's HF-style entry points
# are the loader's functions, attached here (LLaVA.from_pretrained(path, dtype=, device=, ...)).
LLaVA.from_pretrained = staticmethod(checkpoint.load)
LLaVA.save_pretrained = checkpoint.save
