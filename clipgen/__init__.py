"""clipgen: when and how does CLIP generalize to unseen domains and unseen class x domain combinations."""

__version__ = "0.1.0"
