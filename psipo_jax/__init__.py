"""psipo_jax: learning from pairwise preferences with the ΨPO family.

Azar et al., "A General Theoretical Paradigm to Understand Learning from Human
Preferences", arXiv:2310.12036 (AISTATS 2024).
"""

__version__ = "0.1.0"
