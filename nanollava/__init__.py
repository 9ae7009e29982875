"""nanollava: a minimal, readable LLaVA-1.5 / LLaVA-NeXT in PyTorch."""
from nanollava.config import LLaVAConfig, TextConfig, VisionConfig
from nanollava.llava import LLaVA
