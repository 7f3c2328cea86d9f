"""Measurement half: drive a real vLLM engine step by step and record prefill/decode latency per position."""

__version__ = "0.1.0"
