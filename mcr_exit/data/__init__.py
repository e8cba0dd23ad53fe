"""Prompt sources and the built-in corpus."""

from mcr_exit.data.sources import PromptSet, load_prompts

__all__ = ["PromptSet", "load_prompts"]
