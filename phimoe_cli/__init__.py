"""phimoe-cli: chat with Phi-3.5-MoE-instruct on your own hardware."""

__version__ = "0.1.0"
