"""Model-card templates, shipped as package data of ``hf_instruct_tune``."""
