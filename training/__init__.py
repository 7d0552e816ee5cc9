"""Asymmetric vision-language hashing: encoders, hash heads, losses and training."""
